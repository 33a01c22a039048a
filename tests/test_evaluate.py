"""Evaluate stage: metrics.json, predictions CSVs, plots and model card from tiny trained models.

Each module builds one tiny Keras model (Rescaling → Conv → Dense, 32 px) trained for a couple
of epochs on a few dozen coloured PNGs, saved with the sidecar json the training stage writes.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import (
    accuracy_score,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
)
from tinymodels import tiny_convnet

from pipeline.config import EvaluateConfig, StageError
from pipeline.evaluate import compute_metrics, evaluate
from pipeline.model_card import Provenance

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["ankle_boot", "sandal", "sneaker"]
COLOURS = {"ankle_boot": (200, 40, 40), "sandal": (40, 200, 40), "sneaker": (40, 40, 200)}
IMAGE_SIZE = 32
MODEL_NAMES = ["baseline", "transfer_features", "transfer_finetuned"]


def write_images(clean_dir: Path, per_class: int, seed: int = 0) -> list[tuple[str, str]]:
    """Noisy colour-tinted squares; every fourth one grey (L mode) so it is hard to classify."""
    rng = np.random.default_rng(seed)
    rows = []
    for cls in CLASSES:
        (clean_dir / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noise = rng.integers(0, 120, (40, 40, 3))
            pixels = np.clip(np.array(COLOURS[cls]) + noise, 0, 255).astype(np.uint8)
            image = Image.fromarray(pixels)
            if i % 4 == 0:
                image = image.convert("L")
            image.save(clean_dir / cls / f"{cls}_{i}.png")
            rows.append((f"{cls}/{cls}_{i}.png", cls))
    return rows


def write_split_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "class", "group"])
        for rel, cls in rows:
            writer.writerow([f"../clean/{rel}", cls, rel])


def train_tiny_models(models_dir: Path, names: list[str], data_dir: Path) -> None:
    """Train one tiny convnet on data_dir/split/train.csv, saving models/<name>.keras + .json
    after each epoch under the next name (so the models differ, as real ones do)."""
    from pipeline.dataset import load_images, load_split

    rows = load_split(data_dir / "split" / "train.csv")
    x = load_images(rows.paths, IMAGE_SIZE)
    y = np.array([CLASSES.index(label) for label in rows.labels])
    keras.utils.set_random_seed(0)
    model = tiny_convnet(IMAGE_SIZE, len(CLASSES))
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="sparse_categorical_crossentropy")
    models_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        model.fit(x, y, epochs=1, batch_size=8, verbose=0)
        model.save(models_dir / f"{name}.keras")
        sidecar = {
            "class_names": CLASSES,
            "image_size": IMAGE_SIZE,
            "model": name,
            "seed": 0,
            "weights": "none",
            "versions": {"keras": keras.__version__},
            "train": {"seed": 7, "fit": {"image_size": IMAGE_SIZE}},
        }
        (models_dir / f"{name}.json").write_text(json.dumps(sidecar))


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project tree: data/{raw,clean,split} and models/ with three tiny models."""
    root = tmp_path_factory.mktemp("project")
    data = root / "data"
    rows = write_images(data / "clean", per_class=12)
    write_split_csv(data / "split" / "train.csv", [r for i, r in enumerate(rows) if i % 3])
    write_split_csv(data / "split" / "test.csv", [r for i, r in enumerate(rows) if not i % 3])
    (data / "raw").mkdir(parents=True)
    raw_rows = [
        {"class": cls, "source": "demo", "license": "MIT", "fetched_at": f"2026-11-2{d}T10:00:00"}
        for d, (_, cls) in zip([1, 3, 2] * 20, rows, strict=False)
    ]
    (data / "raw" / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in raw_rows))
    clean_rows = [{"path": p, "class": c, "group": p, "license": "MIT"} for p, c in rows]
    (data / "clean" / "manifest.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in clean_rows)
    )
    train_tiny_models(root / "models", MODEL_NAMES, data)
    return root


def run_evaluate(project: Path, reports: Path, **overrides: object) -> object:
    cfg = EvaluateConfig(image_size=IMAGE_SIZE, **overrides)
    provenance = Provenance(
        raw_manifest=project / "data" / "raw" / "manifest.jsonl",
        clean_manifest=project / "data" / "clean" / "manifest.jsonl",
    )
    return evaluate(cfg, project / "data" / "split", project / "models", reports, provenance)


@pytest.fixture(scope="module")
def reports(project: Path) -> Path:
    reports = project / "reports"
    run_evaluate(project, reports)
    return reports


def read_metrics(reports: Path) -> dict[str, dict[str, float]]:
    """The headline metrics, one file per model: {model: {metric: value}}."""
    folder = reports / "metrics" / "models"
    return {path.stem: json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))}


def read_predictions(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_metrics_match_sklearn_recomputed_from_predictions_csv(reports: Path) -> None:
    metrics = read_metrics(reports)
    evaluation = json.loads((reports / "evaluation.json").read_text())

    for name in MODEL_NAMES:
        rows = read_predictions(reports / "predictions" / f"{name}.csv")
        actual = [r["actual"] for r in rows]
        predicted = [r["predicted"] for r in rows]
        proba = np.array([[float(r[f"prob_{c}"]) for c in CLASSES] for r in rows])
        proba /= proba.sum(axis=1, keepdims=True)  # the CSV rounds to 6 decimals
        p, r, f, s = precision_recall_fscore_support(
            actual, predicted, labels=CLASSES, zero_division=0
        )
        m, detail = metrics[name], evaluation["models"][name]
        assert detail["test_size"] == len(rows) == 12
        assert m["accuracy"] == pytest.approx(accuracy_score(actual, predicted))
        assert m["macro_f1"] == detail["macro_avg"]["f1"]
        assert detail["macro_avg"]["f1"] == pytest.approx(
            f1_score(actual, predicted, labels=CLASSES, average="macro", zero_division=0)
        )
        assert detail["weighted_avg"]["f1"] == pytest.approx(
            f1_score(actual, predicted, labels=CLASSES, average="weighted", zero_division=0)
        )
        assert m["log_loss"] == pytest.approx(log_loss(actual, proba, labels=CLASSES), abs=1e-4)
        assert m["roc_auc"] == pytest.approx(
            roc_auc_score(actual, proba, multi_class="ovr", labels=CLASSES), abs=1e-3
        )
        for i, cls in enumerate(CLASSES):
            assert detail["per_class"][cls] == pytest.approx(
                {"precision": p[i], "recall": r[i], "f1": f[i], "support": s[i]}
            )


def test_metrics_files_hold_only_the_headline_numbers_per_model(reports: Path) -> None:
    metrics = read_metrics(reports)
    evaluation = json.loads((reports / "evaluation.json").read_text())

    headline = {"accuracy", "macro_f1", "log_loss", "roc_auc"}
    assert {name: set(m) for name, m in metrics.items()} == {name: headline for name in MODEL_NAMES}
    for name in MODEL_NAMES:
        detail = evaluation["models"][name]
        assert {k: detail[k] for k in ("accuracy", "log_loss", "roc_auc")} == {
            k: metrics[name][k] for k in ("accuracy", "log_loss", "roc_auc")
        }
    best = max(MODEL_NAMES, key=lambda n: (metrics[n]["accuracy"], metrics[n]["macro_f1"]))
    assert evaluation["best"] == best


def test_predictions_csv_has_a_row_per_test_image_with_probabilities(reports: Path) -> None:
    rows = read_predictions(reports / "predictions" / "baseline.csv")

    assert list(rows[0]) == [
        "actual",
        "predicted",
        "path",
        "confidence",
        *(f"prob_{c}" for c in CLASSES),
    ]
    assert len(rows) == 12
    for row in rows:
        probs = [float(row[f"prob_{c}"]) for c in CLASSES]
        assert sum(probs) == pytest.approx(1.0, abs=1e-4)
        assert float(row["confidence"]) == pytest.approx(max(probs), abs=1e-6)
        assert row["predicted"] == CLASSES[int(np.argmax(probs))]
        assert Path(row["path"]).is_file()


def test_writes_curves_and_misclassified_grid_per_model(reports: Path) -> None:
    for name in MODEL_NAMES:
        roc = read_predictions(reports / "roc" / f"{name}.csv")
        pr = read_predictions(reports / "pr" / f"{name}.csv")
        with Image.open(reports / "misclassified" / f"{name}.png") as grid:
            assert grid.format == "PNG" and grid.width > 100
        assert float(roc[0]["fpr"]) == 0.0 and float(roc[-1]["tpr"]) == 1.0
        assert {"recall", "precision", "threshold"} <= set(pr[0])


def test_model_card_has_metrics_table_provenance_and_split_sizes(reports: Path) -> None:
    metrics = read_metrics(reports)
    card = (reports / "model_card.md").read_text()

    for name in MODEL_NAMES:
        assert f"| {name} | {metrics[name]['accuracy']:.3f} (" in card
    assert "2026-11-21T10:00:00 – 2026-11-23T10:00:00" in card  # crawl date range
    assert "Licences: MIT (36)" in card
    assert "| **total** | 24 | 12 |" in card  # train, test sizes
    assert "seed: 7" in card  # training settings quoted from the sidecars
    assert "## Known limitations" in card


def test_missing_model_is_skipped_and_noted_in_model_card(project: Path, tmp_path: Path) -> None:
    reports = tmp_path / "reports"

    summary = run_evaluate(project, reports, models=["baseline", "not_trained_yet"])

    assert set(read_metrics(reports)) == {"baseline"}
    assert "not_trained_yet" in summary.skipped
    assert "Not evaluated: **not_trained_yet**" in (reports / "model_card.md").read_text()
    assert not (reports / "predictions" / "not_trained_yet.csv").exists()


def test_a_model_not_evaluated_loses_its_old_metrics_file(
    project: Path, reports: Path, tmp_path: Path
) -> None:
    rerun = tmp_path / "reports"
    shutil.copytree(reports, rerun)

    run_evaluate(project, rerun, models=["baseline"])

    assert set(read_metrics(rerun)) == {"baseline"}  # promotion must not read a stale score


def test_no_model_at_all_raises_stage_error_naming_models_dir(
    project: Path, tmp_path: Path
) -> None:
    with pytest.raises(StageError, match=r"models: none of the models"):
        run_evaluate(project, tmp_path / "reports", models=["nope"])


def test_corrupt_test_image_raises_stage_error_naming_test_csv(
    project: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(project / "data", data)
    (data / "clean" / "sandal" / "sandal_0.png").write_bytes(b"not a png")

    with pytest.raises(StageError, match=r"test\.csv: an image it lists cannot be decoded"):
        evaluate(EvaluateConfig(), data / "split", project / "models", tmp_path / "reports")


def test_top_k_accuracy_only_with_more_classes_than_k() -> None:
    rng = np.random.default_rng(0)
    six = [f"c{i}" for i in range(6)]
    proba = rng.dirichlet(np.ones(6), size=30)
    y_true = np.arange(30) % 6

    many = compute_metrics(y_true, proba, six, top_k=5)
    few = compute_metrics(
        y_true % 3, proba[:, :3] / proba[:, :3].sum(1, keepdims=True), six[:3], top_k=5
    )

    top5 = np.argsort(-proba, axis=1)[:, :5]
    expected = np.mean([label in row for label, row in zip(y_true, top5, strict=True)])
    assert many["top_5_accuracy"] == pytest.approx(expected)
    assert many["top_5_accuracy"] > many["accuracy"]
    assert "top_5_accuracy" not in few


def git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=repo,
        check=True,
        capture_output=True,
    )


def dvc(repo: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=repo, check=True, capture_output=True, text=True
    )
    return done.stdout


@pytest.fixture
def dvc_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    dvc(repo, "init", "-q")
    return repo


@pytest.mark.slow
def test_dvc_metrics_diff_shows_change_per_model(
    project: Path, reports: Path, dvc_repo: Path
) -> None:
    shutil.copy(ROOT / "dvc.yaml", dvc_repo / "dvc.yaml")
    shutil.copytree(reports / "metrics", dvc_repo / "reports" / "metrics")
    git(dvc_repo, "add", "-A")
    git(dvc_repo, "commit", "-qm", "first run")
    data = dvc_repo / "data"
    shutil.copytree(project / "data", data)
    test_csv = data / "split" / "test.csv"
    test_csv.write_text("".join(test_csv.read_text().splitlines(keepends=True)[:7]))  # 6 rows
    evaluate(
        EvaluateConfig(models=["baseline"]),
        data / "split",
        project / "models",
        dvc_repo / "reports",
    )
    git(dvc_repo, "add", "-A", "reports/metrics")
    git(dvc_repo, "commit", "-qm", "second run, smaller test split")

    diff = json.loads(dvc(dvc_repo, "metrics", "diff", "HEAD~1", "--all", "--json"))

    old, new = read_metrics(reports)["baseline"], read_metrics(dvc_repo / "reports")["baseline"]
    changes = diff["reports/metrics/models/baseline.json"]
    assert changes["accuracy"]["old"] == old["accuracy"]
    assert changes["accuracy"]["new"] == new["accuracy"]
    assert set(changes) == {"accuracy", "macro_f1", "log_loss", "roc_auc"}  # no per-class detail


@pytest.mark.slow
def test_dvc_plots_show_renders_each_model_confusion_matrix_once(
    reports: Path, dvc_repo: Path
) -> None:
    shutil.copy(ROOT / "dvc.yaml", dvc_repo / "dvc.yaml")
    shutil.copytree(reports, dvc_repo / "reports")

    shown = json.loads(dvc(dvc_repo, "plots", "show", "--json"))["data"]

    assert [key for key in shown if key.startswith("reports/predictions")] == []
    confusion = shown["Confusion matrix (test set)"]
    assert len(confusion) == 1
    facets = {row["filename"] for row in confusion[0]["content"]["data"]["values"]}
    assert facets == {f"{name}.csv" for name in MODEL_NAMES}
    images = sorted(key for key in shown if key.startswith("reports/misclassified/"))
    assert images == [f"reports/misclassified/{name}.png" for name in MODEL_NAMES]
