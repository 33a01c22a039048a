"""The FastAPI app: try the model in a browser or over JSON, and review flagged labels.

Consumes a ``Classifier`` (the chosen model), a ``ReviewStore`` (the audit's label_issues.csv
and the review CSV) and ``ServeConfig`` limits. Serves:

- ``GET /``: the predict page (drop or pick images, top-k classes with probability bars);
- ``GET /review``: the review page (flagged images per class: keep / drop / relabel);
- ``POST /predict``: multipart files or a raw image body → top-k classes per image (JSON);
- ``GET /health``, ``GET /model`` (the model card data: classes, input, metrics, training);
- ``GET/POST /api/review``, ``DELETE /api/review/{id}``, ``GET /api/review/images/{id}``;
- ``GET /docs`` and ``/redoc`` with Swagger UI and ReDoc served from the fastapi-offline package
  (no CDN), and ``GET /openapi.json``.

Pages and scripts are plain files in ``static/``; nothing is fetched from outside. The only file
the app writes is the review CSV.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from pipeline import paths
from pipeline.config import ExportConfig, ServeConfig
from pipeline.export.stage import describe_model
from pipeline.serve.classifier import Classifier, ImageRejected, load_classifier
from pipeline.serve.review import ReviewError, ReviewStore
from pipeline.serve.uploads import read_images

STATIC = Path(__file__).parent / "static"
THUMBNAIL_SIZE = 160

UPLOAD_BODY = {
    "requestBody": {
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                }
            },
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
        },
        "required": True,
    }
}


class Decision(BaseModel):
    """A review decision: ``keep``, ``drop``, ``relabel:<class>``, or ``""`` to clear it."""

    id: int
    path: str
    decision: str


def _classify(
    classifier: Classifier, files: list[tuple[str, bytes]], top_k: int
) -> list[list[dict[str, Any]]]:
    pixels = np.stack([classifier.decode(name, data) for name, data in files])
    return classifier.top(classifier.probabilities(pixels), top_k)


def _predict_routes(app: FastAPI, classifier: Classifier, cfg: ServeConfig) -> None:
    @app.post("/predict", openapi_extra=UPLOAD_BODY, tags=["predict"])
    async def predict(
        request: Request, top_k: int = Query(cfg.top_k, ge=1, le=100)
    ) -> dict[str, Any]:
        """Top classes for each uploaded image, most probable first."""
        files = await read_images(request, cfg.max_request_bytes, cfg.max_files)
        try:  # decoding and inference run in a worker thread: the event loop stays free
            tops = await run_in_threadpool(_classify, classifier, files, top_k)
        except ImageRejected as exc:
            raise HTTPException(exc.status, exc.message) from None
        return {
            "model": classifier.name,
            "predictions": [
                {"filename": name, "top": top} for (name, _), top in zip(files, tops, strict=True)
            ],
        }

    @app.get("/health", tags=["model"])
    def health() -> dict[str, Any]:
        """Liveness: the model is loaded."""
        return {"status": "ok", "model": classifier.name, "classes": len(classifier.class_names)}

    @app.get("/model", tags=["model"])
    def model_card() -> dict[str, Any]:
        """The model card data: classes, input and preprocessing, test metrics, training record,
        and this app's upload limits."""
        limits = {
            "max_request_bytes": cfg.max_request_bytes,
            "max_files": cfg.max_files,
            "max_image_pixels": cfg.max_image_pixels,
            "top_k": cfg.top_k,
        }
        return {**describe_model(classifier.chosen, classifier.loaded), "limits": limits}


def _thumbnail(file: Path) -> bytes:
    from PIL import Image

    with Image.open(file) as image:
        image = image.convert("RGB")
        image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
        out = io.BytesIO()
        image.save(out, "PNG")
    return out.getvalue()


def _review_routes(app: FastAPI, store: ReviewStore, class_names: list[str]) -> None:
    @app.get("/api/review", tags=["review"])
    def review_listing() -> dict[str, Any]:
        """Flagged images grouped by given class, with any decision; ``available: false`` and a
        message when the audit has not run."""
        try:
            return store.listing(class_names)
        except ReviewError as exc:
            return {"available": False, "message": exc.message, "groups": [], "classes": []}

    @app.post("/api/review", tags=["review"])
    def review_decide(decision: Decision) -> dict[str, str]:
        """Record a decision in the review CSV (replacing this image's earlier one)."""
        return store.decide(decision.id, decision.path, decision.decision, class_names)

    @app.delete("/api/review/{image_id}", tags=["review"])
    def review_clear(image_id: int, path: str) -> dict[str, str]:
        """Remove the decision on a flagged image."""
        return store.decide(image_id, path, "", class_names)

    @app.get("/api/review/images/{image_id}", tags=["review"], response_class=Response)
    def review_image(image_id: int) -> Response:
        """A PNG thumbnail of flagged image ``image_id`` (only files label_issues.csv names)."""
        image = store.image(image_id)
        if image.file is None:
            raise HTTPException(404, f"{image.path}: image file not found")
        return Response(_thumbnail(image.file), media_type="image/png")


def create_app(classifier: Classifier, store: ReviewStore, cfg: ServeConfig) -> FastAPI:
    """The app for ``classifier`` and ``store`` with ``cfg``'s limits."""
    app = FastAPIOffline(
        title="crawl2model",
        description=f"Classify images with model {classifier.name!r} "
        f"({', '.join(classifier.class_names)}); review the label audit's flagged images.",
        version="1",
    )

    @app.exception_handler(ReviewError)
    async def review_error(request: Request, exc: ReviewError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    app.mount("/assets", StaticFiles(directory=STATIC), name="assets")

    @app.get("/", include_in_schema=False)
    def predict_page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/review", include_in_schema=False)
    def review_page() -> FileResponse:
        return FileResponse(STATIC / "review.html")

    _predict_routes(app, classifier, cfg)
    _review_routes(app, store, classifier.class_names)
    return app


def serve(
    cfg: ServeConfig,
    export_cfg: ExportConfig,
    models_dir: Path = paths.MODELS,
    metrics_dir: Path = paths.MODEL_METRICS,
    clean_dir: Path = paths.CLEAN,
) -> None:
    """Load ``cfg.model`` (``best`` ranks models by ``export.metric``) and run the app with
    uvicorn on ``cfg.host:cfg.port`` until interrupted. Raises StageError naming the file when
    the model cannot be chosen or loaded."""
    import uvicorn

    classifier = load_classifier(
        cfg.model,
        models_dir,
        metrics_dir,
        export_cfg.metric,
        export_cfg.higher_is_better,
        cfg.max_image_pixels,
    )
    store = ReviewStore(cfg.audit_csv, cfg.review_csv, clean_dir)
    print(
        f"serve: model {classifier.name} ({classifier.chosen.reason}); "
        f"open http://{cfg.host}:{cfg.port}/ (review: /review, API docs: /docs)",
        flush=True,
    )
    uvicorn.run(create_app(classifier, store, cfg), host=cfg.host, port=cfg.port)
