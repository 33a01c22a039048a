"""Evaluate stage: score every trained model on the held-out test split.

Consumes (nothing else; ``evaluate`` takes each as an argument):

- ``data/audit/test.csv`` (the audited split: path, class, group; paths relative to the CSV)
  and the images it names, plus ``train.csv``/``val.csv`` beside it for the model card's split
  sizes, and ``label_issues.csv`` beside it when the label audit ran (its test rows with verdict
  ``flag`` are the suspect test labels: accuracy is also given without them);
- ``models/<name>.keras`` with its sidecar ``models/<name>.json`` (class_names, image_size,
  weights, versions and the training settings under ``train``) for each name in
  ``evaluate.models``;
- for the model card only, the earlier stages' records named by a ``model_card.Provenance``
  (``data/raw/manifest.jsonl``, ``data/clean/manifest.jsonl``,
  ``reports/{crawl,clean,split}_report.json``).

Produces, under ``reports/``:

- ``metrics/models/<model>.json`` (the DVC metrics): one model's headline numbers only —
  accuracy, macro_f1, log_loss and roc_auc (when every class is in the test split) — so
  ``dvc metrics show`` stays narrow. A model not evaluated this run has no file.
- ``evaluation.json`` (not a metric): everything scikit-learn computed per model (test size,
  macro and weighted precision/recall/F1, per-class precision/recall/F1/support, top-k accuracy
  when there are more than ``top_k`` classes), the class names, the best model and the models
  skipped.
- ``predictions/<model>.csv``: one row per test image (actual, predicted, path, confidence and
  ``prob_<class>`` per class) — the source of DVC's confusion-matrix plots.
- ``roc/<model>.csv`` and ``pr/<model>.csv``: ROC and precision-recall curves (for 2 classes
  the second class is positive; for more, the micro-average over one-vs-rest).
- ``misclassified/<model>.png``: the most confidently wrong test images, true and predicted label.
- ``model_card.md`` (``pipeline.model_card``).

A model named in ``evaluate.models`` whose ``.keras`` file is missing is skipped with a note;
no model at all is a StageError.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    log_loss,
    precision_recall_curve,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
    top_k_accuracy_score,
)
from sklearn.preprocessing import label_binarize

from pipeline import paths
from pipeline.config import EvaluateConfig, StageError
from pipeline.files import atomic_path, atomic_write_json, write_csv
from pipeline.model_card import Provenance, best_model, write_model_card
from pipeline.predict import LoadedModel, ModelNotFoundError, as_probabilities, load_model

if TYPE_CHECKING:
    from pipeline.dataset import SplitRows

# Under the reports folder evaluate is given (paths.REPORTS for the CLI and DVC).
MODEL_METRICS_DIR = paths.MODEL_METRICS.relative_to(paths.REPORTS)
EVALUATION_FILE = paths.EVALUATION.relative_to(paths.REPORTS)
MODEL_CARD_FILE = paths.MODEL_CARD.relative_to(paths.REPORTS)
HEADLINE = ("accuracy", "macro_f1", "log_loss", "roc_auc")
AUDIT_TABLE = "label_issues.csv"  # the label audit's table beside its test.csv (pipeline/audit/)


# --------------------------------------------------------------------------------------------
# Metrics


def compute_metrics(
    y_true: np.ndarray, proba: np.ndarray, class_names: Sequence[str], top_k: int = 5
) -> dict[str, Any]:
    """scikit-learn metrics for one model; class indices follow ``class_names``.

    Returns accuracy, log_loss, macro_avg/weighted_avg {precision, recall, f1}, per_class
    {name: {precision, recall, f1, support}}, test_size, and top_<k>_accuracy when there are
    more than ``top_k`` classes, and roc_auc when every class occurs in ``y_true`` (2 classes:
    second class positive; more: macro average of one-vs-rest AUCs).
    """
    labels = list(range(len(class_names)))
    y_pred = proba.argmax(axis=1)
    metrics: dict[str, Any] = {
        "test_size": len(y_true),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "log_loss": float(log_loss(y_true, proba, labels=labels)),
    }
    if len(class_names) > top_k:
        metrics[f"top_{top_k}_accuracy"] = float(
            top_k_accuracy_score(y_true, proba, k=top_k, labels=labels)
        )
    if len(set(y_true.tolist())) == len(class_names):  # AUC needs every class in the test set
        metrics["roc_auc"] = float(
            roc_auc_score(y_true, proba[:, 1])
            if len(class_names) == 2
            else roc_auc_score(y_true, proba, multi_class="ovr", labels=labels)
        )
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=labels, average=average, zero_division=0
        )
        metrics[f"{average}_avg"] = {"precision": float(p), "recall": float(r), "f1": float(f)}
    p, r, f, s = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=None, zero_division=0
    )
    metrics["per_class"] = {
        name: {
            "precision": float(p[i]),
            "recall": float(r[i]),
            "f1": float(f[i]),
            "support": int(s[i]),
        }
        for i, name in enumerate(class_names)
    }
    return metrics


def headline(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of ``compute_metrics``' result that are DVC metrics: ``HEADLINE``, less
    roc_auc when it is undefined (a class missing from the test split)."""
    flat = {**metrics, "macro_f1": metrics["macro_avg"]["f1"]}
    return {key: flat[key] for key in HEADLINE if key in flat}


def _curves(
    y_true: np.ndarray, proba: np.ndarray, n_classes: int
) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """ROC and precision-recall points: second class positive for 2 classes, else micro-average."""
    if n_classes == 2:
        truth, score = (y_true == 1).astype(int), proba[:, 1]
    else:
        truth = label_binarize(y_true, classes=list(range(n_classes))).ravel()
        score = proba.ravel()
    if truth.min() == truth.max():  # one class only in the test set: no curve is defined
        return [], []
    fpr, tpr, roc_thresholds = roc_curve(truth, score)
    precision, recall, pr_thresholds = precision_recall_curve(truth, score, drop_intermediate=True)
    roc = [
        {"fpr": float(a), "tpr": float(b), "threshold": float(min(t, 1.0))}
        for a, b, t in zip(fpr, tpr, roc_thresholds, strict=True)
    ]
    # precision_recall_curve has one more point than thresholds (recall 0, precision 1).
    pr_thresholds = np.append(pr_thresholds, 1.0)
    pr = [
        {"recall": float(a), "precision": float(b), "threshold": float(t)}
        for a, b, t in zip(recall, precision, pr_thresholds, strict=True)
    ]
    return roc, pr


# --------------------------------------------------------------------------------------------
# Per-model files


def plot_misclassified(
    rows: Sequence[dict[str, Any]], image_paths: Sequence[Path], out: Path, title: str
) -> None:
    """Write a PNG grid of the given wrong predictions (true/predicted label and confidence)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    columns = max(1, min(4, len(rows)))
    grid_rows = max(1, math.ceil(len(rows) / columns))
    fig, axes = plt.subplots(
        grid_rows, columns, figsize=(2.6 * columns, 2.9 * grid_rows + 0.4), squeeze=False
    )
    for ax in axes.ravel():
        ax.axis("off")
    if not rows:
        axes[0][0].text(0.5, 0.5, "no misclassified test images", ha="center", va="center")
    for ax, row, path in zip(axes.ravel(), rows, image_paths, strict=False):
        with Image.open(path) as img:
            ax.imshow(np.asarray(img.convert("RGB")))
        ax.set_title(
            f"true: {row['actual']}\npred: {row['predicted']} ({float(row['confidence']):.2f})",
            fontsize=9,
            color="firebrick",
        )
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


def _model_output_paths(reports_dir: Path, name: str) -> list[Path]:
    return [
        reports_dir / MODEL_METRICS_DIR / f"{name}.json",
        reports_dir / "predictions" / f"{name}.csv",
        reports_dir / "roc" / f"{name}.csv",
        reports_dir / "pr" / f"{name}.csv",
        reports_dir / "misclassified" / f"{name}.png",
    ]


def _prediction_rows(
    test_rows: SplitRows, class_names: list[str], proba: np.ndarray
) -> list[dict[str, Any]]:
    prob_columns = [f"prob_{c}" for c in class_names]
    y_pred = proba.argmax(axis=1)
    rows = []
    for path, cls, pred, p in zip(test_rows.paths, test_rows.labels, y_pred, proba, strict=True):
        row: dict[str, Any] = {
            "actual": cls,
            "predicted": class_names[pred],
            # Relative to the project root (not to test.csv), so it opens from anywhere there.
            "path": os.path.normpath(path),
            "confidence": f"{p[pred]:.6f}",
        }
        row.update({col: f"{v:.6f}" for col, v in zip(prob_columns, p, strict=True)})
        rows.append(row)
    return rows


def _write_model_outputs(
    cfg: EvaluateConfig,
    name: str,
    loaded: LoadedModel,
    test_rows: SplitRows,
    y_true: np.ndarray,
    proba: np.ndarray,
    reports_dir: Path,
) -> None:
    """predictions/<name>.csv, roc/<name>.csv, pr/<name>.csv and misclassified/<name>.png."""
    class_names = loaded.class_names
    rows = _prediction_rows(test_rows, class_names, proba)
    write_csv(
        reports_dir / "predictions" / f"{name}.csv",
        rows,
        ["actual", "predicted", "path", "confidence", *(f"prob_{c}" for c in class_names)],
    )
    roc, pr = _curves(y_true, proba, len(class_names))
    write_csv(reports_dir / "roc" / f"{name}.csv", roc, ["fpr", "tpr", "threshold"])
    write_csv(reports_dir / "pr" / f"{name}.csv", pr, ["recall", "precision", "threshold"])

    y_pred = proba.argmax(axis=1)
    wrong = [i for i in range(len(rows)) if y_pred[i] != y_true[i]]
    wrong.sort(key=lambda i: -proba[i, y_pred[i]])
    shown = wrong[: cfg.misclassified_images]
    plot_misclassified(
        [rows[i] for i in shown],
        [test_rows.paths[i] for i in shown],
        reports_dir / "misclassified" / f"{name}.png",
        f"{name}: {len(shown)} most confident of {len(wrong)} wrong test predictions",
    )


# --------------------------------------------------------------------------------------------
# The stage


@dataclass
class EvaluateSummary:
    """What ``evaluate`` did; ``str()`` is the one-line summary the CLI prints."""

    test_size: int
    accuracy: dict[str, float]
    skipped: dict[str, str] = field(default_factory=dict)
    metrics_path: Path | None = None

    def __str__(self) -> str:
        scores = ", ".join(f"{name} {acc:.3f}" for name, acc in self.accuracy.items())
        text = f"{len(self.accuracy)} model(s) on {self.test_size} test images: accuracy {scores}"
        if self.skipped:
            text += "; skipped " + ", ".join(self.skipped)
        return text + f" -> {self.metrics_path}"


def _load_models(
    cfg: EvaluateConfig, models_dir: Path, reports_dir: Path
) -> tuple[dict[str, LoadedModel], dict[str, str]]:
    """The models in ``cfg.models`` that exist, and why each other one is skipped."""
    models: dict[str, LoadedModel] = {}
    skipped: dict[str, str] = {}
    for name in cfg.models:
        try:
            models[name] = load_model(models_dir, name, cfg.image_size)
        except ModelNotFoundError:
            skipped[name] = f"no {models_dir / (name + '.keras')} (its training stage has not run)"
            print(f"evaluate: skipping {name}: {skipped[name]}", file=sys.stderr)
            # A previous run's files would otherwise be plotted beside this run's results.
            for stale in _model_output_paths(reports_dir, name):
                stale.unlink(missing_ok=True)
    if not models:
        raise StageError(
            f"{models_dir}: none of the models in evaluate.models "
            f"({', '.join(cfg.models)}) exists; run a training stage first"
        )
    return models, skipped


def _test_probabilities(
    cfg: EvaluateConfig, loaded: LoadedModel, test_rows: SplitRows
) -> np.ndarray:
    """Class probabilities for every test image, through the same tf.data decode + resize as
    training (no shuffle, no augmentation). Raises StageError for an undecodable image."""
    import tensorflow as tf

    from pipeline.dataset import make_dataset

    dataset = make_dataset(
        test_rows, loaded.class_names, loaded.image_size, cfg.batch_size, cache=False
    )
    print(f"evaluate: {loaded.name} on {len(test_rows)} test images", file=sys.stderr)
    try:
        raw = loaded.model.predict(dataset, verbose=2 if len(test_rows) < 1000 else 1)
    except tf.errors.InvalidArgumentError as exc:
        raise StageError(
            f"{test_rows.csv_path}: an image it lists cannot be decoded: "
            f"{exc.message.splitlines()[0]}"
        ) from None
    return as_probabilities(raw, len(loaded.class_names))


def _suspect_test_rows(split_dir: Path, test_rows: SplitRows) -> np.ndarray | None:
    """Which test rows the label audit still suspects (test rows of ``label_issues.csv`` with
    verdict ``flag``, paths resolved like the CSV's), or None when no audit table is there."""
    from pipeline.files import read_csv

    table = split_dir / AUDIT_TABLE
    if not table.is_file():
        return None
    suspects = {
        split_dir / row["path"]
        for row in read_csv(table)
        if row.get("split") == "test" and row.get("verdict") == "flag"
    }
    return np.array([path in suspects for path in test_rows.paths], dtype=bool)


def _audit_scores(
    y_true: np.ndarray, proba: np.ndarray, suspect: np.ndarray | None
) -> dict[str, Any] | None:
    """Accuracy on every test image and on those whose label the audit does not suspect."""
    if suspect is None:
        return None
    right = proba.argmax(axis=1) == y_true
    kept = ~suspect
    return {
        "test_images": len(y_true),
        "test_suspects": int(suspect.sum()),
        "accuracy_all": float(right.mean()) if len(right) else None,
        "accuracy_unsuspected": float(right[kept].mean()) if kept.any() else None,
    }


def _write_metrics(scores: dict[str, dict[str, Any]], metrics_dir: Path) -> Path:
    """One headline file per scored model; files of models not scored this run are removed, so
    promotion never reads a stale score. Returns ``metrics_dir``."""
    for stale in metrics_dir.glob("*.json"):
        if stale.stem not in scores:
            stale.unlink()
    for name, metrics in scores.items():
        atomic_write_json(metrics_dir / f"{name}.json", headline(metrics))
    return metrics_dir


def evaluate(
    cfg: EvaluateConfig,
    split_dir: Path,
    models_dir: Path,
    reports_dir: Path,
    provenance: Provenance | None = None,
) -> EvaluateSummary:
    """Score every model in ``cfg.models`` on ``split_dir/test.csv`` and write the reports.

    ``provenance`` names the earlier stages' records the model card quotes (none when None).
    Returns an EvaluateSummary. Raises StageError if the test split is missing or unreadable,
    an image in it cannot be decoded, a test class is unknown to a model, or no model in
    ``cfg.models`` exists; ``predict.ModelLoadError`` (a StageError) if a model file or its
    sidecar is damaged.
    """
    from pipeline.dataset import label_indices, load_split

    test_rows = load_split(split_dir / "test.csv")
    suspect = _suspect_test_rows(split_dir, test_rows)
    models, skipped = _load_models(cfg, models_dir, reports_dir)
    scores: dict[str, dict[str, Any]] = {}
    for name, loaded in models.items():
        y_true = label_indices(test_rows, loaded.class_names)
        proba = _test_probabilities(cfg, loaded, test_rows)
        scores[name] = compute_metrics(y_true, proba, loaded.class_names, cfg.top_k)
        scores[name]["label_audit"] = _audit_scores(y_true, proba, suspect)
        _write_model_outputs(cfg, name, loaded, test_rows, y_true, proba, reports_dir)

    metrics_dir = _write_metrics(scores, reports_dir / MODEL_METRICS_DIR)
    atomic_write_json(
        reports_dir / EVALUATION_FILE,
        {
            "best": best_model(scores),
            "class_names": {name: loaded.class_names for name, loaded in models.items()},
            "models": scores,
            "skipped": skipped,
        },
    )
    write_model_card(
        reports_dir / MODEL_CARD_FILE,
        scores,
        models,
        skipped,
        split_dir,
        provenance or Provenance(),
        cfg,
    )
    return EvaluateSummary(
        test_size=len(test_rows),
        accuracy={name: m["accuracy"] for name, m in scores.items()},
        skipped=skipped,
        metrics_path=metrics_dir,
    )
