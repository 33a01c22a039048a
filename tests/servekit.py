"""Fixtures for the app tests: a tiny model that knows colours, images, and a project layout.

``colour_model`` is Rescaling → global average → Dense with weights set by hand, so a red image
is "red" with near certainty: tests can assert the right top class without training anything.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import keras
import numpy as np
from PIL import Image

from pipeline.config import ServeConfig
from pipeline.serve import Classifier, ReviewStore, create_app, load_classifier

COLOURS = {"blue": (0, 0, 255), "green": (0, 255, 0), "red": (255, 0, 0)}
CLASS_NAMES = sorted(COLOURS)
IMAGE_SIZE = 32


def colour_model() -> keras.Model:
    model = keras.Sequential(
        [
            keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3)),
            keras.layers.Rescaling(1 / 255),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(len(CLASS_NAMES), activation="softmax"),
        ]
    )
    weights = np.zeros((3, len(CLASS_NAMES)), dtype=np.float32)
    for index, name in enumerate(CLASS_NAMES):
        weights[:, index] = 12 * (np.array(COLOURS[name]) / 255) - 4
    model.layers[-1].set_weights([weights, np.zeros(len(CLASS_NAMES), dtype=np.float32)])
    return model


def image_bytes(colour: str, fmt: str = "PNG", size: tuple[int, int] = (40, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, COLOURS[colour]).save(out, fmt)
    return out.getvalue()


def write_project(root: Path) -> Path:
    """models/colours.keras + sidecar, its test metrics, and three clean images with a
    manifest (sha256 = the file stem, as the clean stage names files)."""
    models = root / "models"
    models.mkdir(parents=True)
    colour_model().save(models / "colours.keras")
    sidecar = {"class_names": CLASS_NAMES, "image_size": IMAGE_SIZE, "model": "colours"}
    (models / "colours.json").write_text(json.dumps(sidecar))
    metrics = root / "reports" / "metrics" / "models"
    metrics.mkdir(parents=True)
    (metrics / "colours.json").write_text(json.dumps({"accuracy": 1.0, "macro_f1": 1.0}))
    manifest = []
    for colour in CLASS_NAMES:
        sha = hashlib.sha256(colour.encode()).hexdigest()
        path = root / "data" / "clean" / colour / f"{sha}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image_bytes(colour))
        manifest.append({"path": f"{colour}/{sha}.png", "class": colour, "sha256": sha})
    (root / "data" / "clean" / "manifest.jsonl").write_text(
        "".join(json.dumps(row) + "\n" for row in manifest)
    )
    return root


def write_label_issues(root: Path) -> Path:
    """data/audit/label_issues.csv flagging the red image as labelled green, and the blue one."""
    audit = root / "data" / "audit"
    audit.mkdir(parents=True, exist_ok=True)
    manifest = [
        json.loads(line) for line in (root / "data/clean/manifest.jsonl").read_text().splitlines()
    ]
    by_class = {row["class"]: row["path"] for row in manifest}
    rows = [
        "path,class_given,class_suggested,label_quality,ood_score,split,verdict",
        f"../clean/{by_class['red']},green,red,0.02,0.4,train,mislabelled",
        f"../clean/{by_class['blue']},blue,,0.6,5.1,val,outlier",
    ]
    path = audit / "label_issues.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def build_app(root: Path, **limits: int) -> tuple[object, Classifier]:
    """The app over ``root``'s project, with ServeConfig ``limits`` overridden."""
    cfg = ServeConfig(
        audit_csv=root / "data/audit/label_issues.csv",
        review_csv=root / "data/audit/review.csv",
        **limits,  # type: ignore[arg-type]
    )
    classifier = load_classifier(
        "best",
        root / "models",
        root / "reports/metrics/models",
        max_image_pixels=cfg.max_image_pixels,
    )
    store = ReviewStore(cfg.audit_csv, cfg.review_csv, root / "data" / "clean")
    return create_app(classifier, store, cfg), classifier
