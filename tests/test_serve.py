"""The app's HTTP API and review storage (pipeline/serve/), driven with Starlette's TestClient."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from servekit import build_app, image_bytes, write_label_issues, write_project

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_project(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def client(project: Path) -> Iterator[TestClient]:
    app, _ = build_app(project, max_request_bytes=50_000, max_files=4)
    with TestClient(app) as test_client:
        yield test_client


def _files(*colours: str) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"{c}.png", image_bytes(c), "image/png")) for c in colours]


def _all_files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_predict_classifies_a_batch_of_uploads_in_order(client: TestClient) -> None:
    response = client.post("/predict", files=_files("red", "blue", "green"))

    assert response.status_code == 200
    body = response.json()
    assert body["model"] == "colours"
    assert [p["filename"] for p in body["predictions"]] == ["red.png", "blue.png", "green.png"]
    assert [p["top"][0]["class"] for p in body["predictions"]] == ["red", "blue", "green"]
    assert body["predictions"][0]["top"][0]["probability"] > 0.99


def test_predict_takes_one_image_as_the_raw_body(client: TestClient) -> None:
    response = client.post(
        "/predict?top_k=2",
        content=image_bytes("green", "JPEG"),
        headers={"content-type": "image/jpeg"},
    )

    assert response.status_code == 200
    (prediction,) = response.json()["predictions"]
    assert prediction["top"][0]["class"] == "green"
    assert len(prediction["top"]) == 2


def test_an_oversized_upload_is_refused_with_413(client: TestClient) -> None:
    big = image_bytes("red", size=(400, 400), fmt="BMP")  # ~480 kB > 50 kB

    response = client.post("/predict", files=[("files", ("big.bmp", big, "image/bmp"))])

    assert response.status_code == 413
    assert "serve.max_request_bytes" in response.json()["detail"]


def test_an_oversized_body_without_content_length_is_refused_with_413(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(20):
            yield b"\0" * 10_000

    response = client.post("/predict", content=chunks(), headers={"content-type": "image/png"})

    assert response.status_code == 413


def test_too_many_files_is_refused_naming_the_limit(client: TestClient) -> None:
    response = client.post("/predict", files=_files("red", "red", "red", "red", "red"))

    assert response.status_code == 400
    assert "serve.max_files is 4" in response.json()["detail"]


def test_a_file_that_is_not_an_image_is_refused_with_415_naming_it(client: TestClient) -> None:
    files = [*_files("red"), ("files", ("notes.txt", b"hello, not a picture", "text/plain"))]

    response = client.post("/predict", files=files)

    assert response.status_code == 415
    assert response.json()["detail"].startswith("notes.txt: not an image")


def test_an_unsupported_image_format_is_refused_with_415(client: TestClient) -> None:
    tiff = image_bytes("red", "TIFF")

    response = client.post("/predict", files=[("files", ("scan.tiff", tiff, "image/tiff"))])

    assert response.status_code == 415
    assert "TIFF images are not supported" in response.json()["detail"]


def test_a_damaged_image_is_refused_with_415(client: TestClient) -> None:
    damaged = image_bytes("red", "JPEG")[:40]

    response = client.post("/predict", files=[("files", ("cut.jpg", damaged, "image/jpeg"))])

    assert response.status_code == 415
    assert response.json()["detail"].startswith("cut.jpg:")


def test_a_body_of_another_content_type_is_refused_with_415(client: TestClient) -> None:
    response = client.post("/predict", json={"image": "red"})

    assert response.status_code == 415
    assert "multipart/form-data" in response.json()["detail"]


def test_a_request_without_images_is_refused_with_400(client: TestClient) -> None:
    response = client.post("/predict", content=b"", headers={"content-type": "image/png"})

    assert response.status_code == 400


def test_an_image_over_the_pixel_limit_is_refused_before_decoding(project: Path) -> None:
    app, _ = build_app(project, max_image_pixels=100)
    with TestClient(app) as small:
        response = small.post("/predict", files=_files("red"))

    assert response.status_code == 413
    assert "serve.max_image_pixels" in response.json()["detail"]


def test_health_and_model_card(client: TestClient) -> None:
    health = client.get("/health").json()
    card = client.get("/model").json()

    assert health == {"status": "ok", "model": "colours", "classes": 3}
    assert card["class_names"] == ["blue", "green", "red"]
    assert card["input"]["image_size"] == 32
    assert card["metrics"]["accuracy"] == 1.0
    assert card["limits"]["max_files"] == 4


def test_pages_and_docs_are_served_without_any_cdn(client: TestClient) -> None:
    docs = client.get("/docs").text
    pages = [client.get(path).text for path in ("/", "/review", "/docs", "/redoc")]

    assert all("http://" not in page and "https://" not in page for page in pages)
    assert client.get("/static-offline-docs/swagger-ui-bundle.js").status_code == 200
    assert "/static-offline-docs/swagger-ui-bundle.js" in docs
    assert client.get("/assets/predict.js").status_code == 200
    assert "/predict" in client.get("/openapi.json").json()["paths"]


def test_predicting_writes_no_file(client: TestClient, project: Path) -> None:
    before = _all_files(project)

    client.post("/predict", files=_files("red", "green"))

    assert _all_files(project) == before


def test_review_says_when_the_audit_has_not_run(tmp_path: Path) -> None:
    app, _ = build_app(write_project(tmp_path))
    with TestClient(app) as fresh:
        listing = fresh.get("/api/review").json()
        page = fresh.get("/review")

    assert listing["available"] is False
    assert "label_issues.csv not found" in listing["message"]
    assert page.status_code == 200


@pytest.fixture
def reviewed(tmp_path: Path) -> Iterator[tuple[TestClient, Path]]:
    root = write_project(tmp_path)
    write_label_issues(root)
    app, _ = build_app(root)
    with TestClient(app) as test_client:
        yield test_client, root


def _review_rows(root: Path) -> list[dict[str, str]]:
    with open(root / "data/audit/review.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_review_lists_flagged_images_per_given_class(reviewed: tuple[TestClient, Path]) -> None:
    client, _ = reviewed

    listing = client.get("/api/review").json()

    assert listing["available"] is True
    assert [g["class"] for g in listing["groups"]] == ["blue", "green"]
    green = listing["groups"][1]["images"][0]
    assert (green["class_suggested"], green["verdict"], green["decision"]) == (
        "red",
        "mislabelled",
        "",
    )
    assert client.get(f"/api/review/images/{green['id']}").headers["content-type"] == "image/png"


def test_a_decision_is_written_with_the_clean_manifest_sha256(
    reviewed: tuple[TestClient, Path],
) -> None:
    client, root = reviewed
    image = client.get("/api/review").json()["groups"][1]["images"][0]

    response = client.post(
        "/api/review", json={"id": image["id"], "path": image["path"], "decision": "relabel:red"}
    )

    assert response.status_code == 200
    assert _review_rows(root) == [
        {"path": image["path"], "sha256": image["sha256"], "decision": "relabel:red"}
    ]
    assert image["sha256"] == Path(image["path"]).stem


def test_a_new_decision_replaces_the_old_and_undo_removes_it(
    reviewed: tuple[TestClient, Path],
) -> None:
    client, root = reviewed
    image = client.get("/api/review").json()["groups"][0]["images"][0]
    key = {"id": image["id"], "path": image["path"]}

    client.post("/api/review", json={**key, "decision": "keep"})
    client.post("/api/review", json={**key, "decision": "drop"})
    decided = _review_rows(root)
    client.delete(f"/api/review/{image['id']}", params={"path": image["path"]})

    assert [r["decision"] for r in decided] == ["drop"]
    assert _review_rows(root) == []
    assert sorted(p.name for p in (root / "data/audit").iterdir()) == [
        "label_issues.csv",
        "review.csv",
    ]


@pytest.mark.parametrize(
    ("decision", "path", "status", "message"),
    [
        ("relabel:purple", None, 422, "unknown class 'purple'"),
        ("delete", None, 422, "keep, drop or relabel:<class>"),
        ("keep", "../clean/other.png", 409, "changed since the page loaded"),
    ],
)
def test_bad_review_requests_are_refused_with_a_message(
    reviewed: tuple[TestClient, Path], decision: str, path: str | None, status: int, message: str
) -> None:
    client, root = reviewed
    image = client.get("/api/review").json()["groups"][0]["images"][0]

    response = client.post(
        "/api/review", json={"id": image["id"], "path": path or image["path"], "decision": decision}
    )

    assert response.status_code == status
    assert message in response.json()["detail"]
    assert not (root / "data/audit/review.csv").exists()


def test_the_serve_command_refuses_a_bad_port_before_loading_anything(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from pipeline.__main__ import main

    code = main(["serve", "--params", str(ROOT / "params.yaml"), "--port", "70000"])

    assert code == 2
    assert (
        "error: serve: port: Input should be less than or equal to 65535" in capsys.readouterr().err
    )
