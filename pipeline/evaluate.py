"""Evaluate stage and ``predict``: score every trained model on the held-out test split.

Consumes ``data/split/test.csv`` (path, class, group; paths relative to the CSV), the trained
models ``models/<name>.keras`` with their sidecar ``models/<name>.json`` (class_names,
image_size, seed, weights, versions), and for the model card the provenance files the earlier
stages wrote where present (``data/raw/manifest.jsonl``, ``data/clean/manifest.jsonl``,
``reports/{crawl,clean,split}_report.json``, ``params.yaml``).

Produces, under ``reports/``:

- ``metrics.json`` (DVC metrics), one block per model — accuracy, macro/weighted precision,
  recall and F1, log loss, top-k accuracy when there are more than ``top_k`` classes, per-class
  P/R/F1/support and the test size — all computed by scikit-learn, so ``dvc metrics diff``
  lists changes as ``baseline.accuracy``, ``transfer_finetuned.per_class.sandal.f1`` ...
- ``predictions/<model>.csv``: one row per test image (actual, predicted, path, confidence and
  ``prob_<class>`` per class) — the source of DVC's confusion-matrix plots.
- ``roc/<model>.csv`` and ``pr/<model>.csv``: ROC and precision-recall curves (for 2 classes
  the second class is positive; for more, the micro-average over one-vs-rest).
- ``misclassified/<model>.png``: the most confidently wrong test images, true and predicted label.
- ``model_card.md``: data provenance, split sizes, params, the metrics table, known limitations.

A model named in ``evaluate.models`` whose ``.keras`` file is missing is skipped with a note;
no model at all is a StageError. ``python -m pipeline predict`` uses the same image loading
(``load_image``) as this stage.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml
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
from tqdm import tqdm

from pipeline.config import DEFAULT_PARAMS, EvaluateConfig, StageError
from pipeline.files import atomic_path, atomic_write_json, atomic_write_text, read_csv, read_jsonl
from pipeline.files import write_csv as write_csv_rows

if TYPE_CHECKING:
    from pipeline.dataset import SplitRows

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp"})
DEFAULT_PREDICT_MODEL = "transfer_finetuned"


# --------------------------------------------------------------------------------------------
# Models and images


@dataclass
class LoadedModel:
    """A trained Keras model with what its sidecar json says about it."""

    name: str
    model: Any  # keras.Model; typed loosely so importing this module does not import TensorFlow
    class_names: list[str]
    image_size: int
    sidecar: dict[str, Any]


def load_model(models_dir: Path, name: str, fallback_image_size: int = 64) -> LoadedModel:
    """Load ``models_dir/<name>.keras`` and its sidecar ``<name>.json``.

    Raises FileNotFoundError if the .keras file is missing, StageError if the sidecar is
    missing or unreadable or the model file cannot be loaded.
    """
    keras_path = models_dir / f"{name}.keras"
    sidecar_path = models_dir / f"{name}.json"
    if not keras_path.is_file():
        raise FileNotFoundError(f"{keras_path}: no such model file")
    try:
        sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StageError(
            f"{sidecar_path}: sidecar missing; it holds the class order the model was trained "
            "with (rerun the training stage)"
        ) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise StageError(f"{sidecar_path}: unreadable sidecar: {exc}") from None
    class_names = sidecar.get("class_names")
    if not isinstance(class_names, list) or len(class_names) < 2:
        raise StageError(f"{sidecar_path}: 'class_names' must list at least 2 classes")
    import keras

    try:
        model = keras.models.load_model(keras_path, compile=False)
    except Exception as exc:  # Keras raises many types for a damaged or foreign file
        raise StageError(f"{keras_path}: cannot load model: {exc}") from None
    return LoadedModel(
        name=name,
        model=model,
        class_names=[str(c) for c in class_names],
        image_size=int(sidecar.get("image_size") or fallback_image_size),
        sidecar=sidecar,
    )


def load_image(path: Path, image_size: int) -> np.ndarray:
    """Decode one image file exactly as training does (``pipeline.dataset``).

    Returns float32 RGB pixels in 0–255, shape (image_size, image_size, 3); the models rescale
    inside themselves. Raises StageError naming the file if it is missing or not an image.
    """
    import tensorflow as tf

    from pipeline.dataset import load_images

    try:
        return load_images([path], image_size)[0]
    except tf.errors.OpError as exc:  # unreadable for another reason: permissions, a folder
        raise StageError(f"{path}: cannot read: {exc.message.splitlines()[0]}") from None


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _as_probabilities(raw: np.ndarray, n_classes: int) -> np.ndarray:
    """Turn model outputs into class probabilities (rows summing to 1)."""
    raw = np.asarray(raw, dtype=np.float64)
    if raw.ndim == 2 and raw.shape[1] == 1 and n_classes == 2:
        # A single sigmoid unit: probability of the second class.
        raw = np.concatenate([1.0 - raw, raw], axis=1)
    if raw.ndim != 2 or raw.shape[1] != n_classes:
        raise StageError(f"model outputs shape {raw.shape}, expected (N, {n_classes})")
    sums = raw.sum(axis=1)
    if (raw < 0).any() or not np.allclose(sums, 1.0, atol=1e-3):
        # Logits, not probabilities: a model saved without its final softmax.
        shifted = np.exp(raw - raw.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)
    return raw / sums[:, None]


def predict_images(
    loaded: LoadedModel, images: Sequence[np.ndarray], batch_size: int = 64
) -> np.ndarray:
    """Return class probabilities, shape (len(images), n_classes), in sidecar class order."""
    n_classes = len(loaded.class_names)
    if not images:
        return np.zeros((0, n_classes))
    outputs = [
        np.asarray(loaded.model(np.stack(batch), training=False))
        for batch in _batches(images, batch_size)
    ]
    return _as_probabilities(np.concatenate(outputs), n_classes)


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


def wilson_interval(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (accuracy on a finite test set)."""
    if total == 0:
        return 0.0, 1.0
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


# --------------------------------------------------------------------------------------------
# Plots


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


# --------------------------------------------------------------------------------------------
# Model card


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _read_rows(path: Path) -> list[dict[str, Any]]:
    try:
        return read_jsonl(path)
    except (OSError, ValueError):
        return []


def _counts_line(counter: Counter[str]) -> str:
    return ", ".join(f"{key} ({count})" for key, count in counter.most_common()) or "—"


def _provenance_section(raw_dir: Path, clean_dir: Path, reports_dir: Path) -> list[str]:
    lines = ["## Data provenance", ""]
    raw_rows = _read_rows(raw_dir / "manifest.jsonl")
    clean_rows = _read_rows(clean_dir / "manifest.jsonl")
    if raw_rows:
        fetched = sorted(str(r["fetched_at"]) for r in raw_rows if r.get("fetched_at"))
        date_range = f"{fetched[0]} – {fetched[-1]}" if fetched else "unknown"
        sources = Counter(str(r.get("source") or "unknown") for r in raw_rows)
        licences = Counter(str(r.get("license") or "unknown") for r in raw_rows)
        lines += [
            f"- Crawled: {len(raw_rows)} images, {date_range} (`{raw_dir}/manifest.jsonl`).",
            f"- Sources: {_counts_line(sources)}.",
            f"- Licences: {_counts_line(licences)}.",
        ]
    else:
        lines.append(f"- Crawl manifest `{raw_dir}/manifest.jsonl` not found.")
    if clean_rows:
        per_class = Counter(str(r.get("class")) for r in clean_rows)
        groups = {r.get("group") for r in clean_rows}
        lines.append(
            f"- After cleaning: {len(clean_rows)} images in {len(groups)} near-duplicate groups; "
            f"per class: {_counts_line(per_class)}."
        )
        clean_licences = Counter(str(r.get("license") or "unknown") for r in clean_rows)
        lines.append(f"- Licences of the kept images: {_counts_line(clean_licences)}.")
    else:
        lines.append(f"- Clean manifest `{clean_dir}/manifest.jsonl` not found.")
    for stage in ("crawl", "clean", "split"):
        report = _read_json(reports_dir / f"{stage}_report.json")
        if report:
            flat = ", ".join(
                f"{k}: {v}" for k, v in sorted(report.items()) if isinstance(v, int | float | str)
            )
            lines.append(f"- `{stage}_report.json`: {flat or 'see file'}.")
    return [*lines, ""]


def _split_section(split_dir: Path) -> tuple[list[str], dict[str, Counter[str]]]:
    sizes: dict[str, Counter[str]] = {}
    for part in ("train", "val", "test"):
        path = split_dir / f"{part}.csv"
        if path.is_file():
            sizes[part] = Counter(row["class"] for row in read_csv(path))
    classes = sorted({c for counter in sizes.values() for c in counter})
    lines = ["## Split sizes", "", "| class | " + " | ".join(sizes) + " |"]
    lines.append("|---" * (len(sizes) + 1) + "|")
    for name in classes:
        lines.append(f"| {name} | " + " | ".join(str(sizes[p][name]) for p in sizes) + " |")
    lines.append("| **total** | " + " | ".join(str(sum(c.values())) for c in sizes.values()) + " |")
    return [*lines, ""], sizes


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def write_model_card(
    out: Path,
    metrics: dict[str, dict[str, Any]],
    models: dict[str, LoadedModel],
    skipped: dict[str, str],
    split_dir: Path,
    raw_dir: Path,
    clean_dir: Path,
    reports_dir: Path,
    params_file: Path | None,
    top_k: int,
) -> None:
    """Write reports/model_card.md from the metrics and whatever provenance files exist."""
    lines = [
        "# Model card — crawl2model",
        "",
        "Generated by `python -m pipeline evaluate` from the files listed below; do not edit by "
        "hand (the next run overwrites it).",
        "",
        "## Models compared (held-out test split)",
        "",
    ]
    if metrics:
        topk_key = f"top_{top_k}_accuracy"
        has_topk = any(topk_key in m for m in metrics.values())
        header = ["model", "accuracy (95% CI)", "macro F1", "weighted F1", "log loss", "ROC AUC"]
        header += [f"top-{top_k} acc."] if has_topk else []
        header += ["weights", "image size"]
        lines += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        for name, m in metrics.items():
            n = m["test_size"]
            low, high = wilson_interval(round(m["accuracy"] * n), n)
            cells = [
                name,
                f"{m['accuracy']:.3f} ({low:.2f}–{high:.2f})",
                _fmt(m["macro_avg"]["f1"]),
                _fmt(m["weighted_avg"]["f1"]),
                _fmt(m["log_loss"]),
                _fmt(m.get("roc_auc", "—")),
            ]
            cells += [_fmt(m.get(topk_key, "—"))] if has_topk else []
            sidecar = models[name].sidecar
            cells += [str(sidecar.get("weights", "—")), str(models[name].image_size)]
            lines.append("| " + " | ".join(cells) + " |")
        best = max(metrics, key=lambda k: (metrics[k]["accuracy"], metrics[k]["macro_avg"]["f1"]))
        lines += [
            "",
            f"Best accuracy on the test split: **{best}**. Per-class F1 "
            "(precision and recall are in metrics.json):",
            "",
            "| class | " + " | ".join(metrics) + " | support |",
            "|---" * (len(metrics) + 2) + "|",
        ]
        for cls, c in metrics[best]["per_class"].items():
            f1s = [_fmt(m["per_class"].get(cls, {}).get("f1", "—")) for m in metrics.values()]
            lines.append(f"| {cls} | " + " | ".join(f1s) + f" | {c['support']} |")
        lines += [
            "",
            "Every number is in `reports/metrics.json`; every prediction in "
            "`reports/predictions/<model>.csv`; `dvc plots show` draws the confusion matrices, "
            "ROC/PR curves, training curves and `reports/misclassified/<model>.png`.",
        ]
    for name, reason in skipped.items():
        lines.append(f"- Not evaluated: **{name}** — {reason}.")
    lines.append("")
    lines += _provenance_section(raw_dir, clean_dir, reports_dir)
    split_lines, sizes = _split_section(split_dir)
    lines += split_lines

    lines += ["## Training", ""]
    for name, loaded in models.items():
        facts = {k: v for k, v in loaded.sidecar.items() if k not in {"class_names", "versions"}}
        lines.append(
            f"- **{name}**: " + ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(facts.items()))
        )
        versions = loaded.sidecar.get("versions")
        if isinstance(versions, dict) and versions:
            lines.append("  - versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    lines.append("")
    if params_file is not None and params_file.is_file():
        with contextlib.suppress(OSError, yaml.YAMLError):
            params = yaml.safe_load(params_file.read_text(encoding="utf-8")) or {}
            shown = {
                k: params[k]
                for k in ("seed", "split", "augment", "train", "evaluate")
                if k in params
            }
            lines += [
                f"Parameters (from `{params_file}`):",
                "",
                "```yaml",
                yaml.safe_dump(shown, sort_keys=False).rstrip(),
                "```",
                "",
            ]

    lines += ["## Known limitations", ""]
    test_total = sum(sizes.get("test", Counter()).values())
    if test_total:
        lines.append(
            f"- The test split has {test_total} images, so accuracy is known only to within "
            "the 95% intervals above; differences between models smaller than that are noise."
        )
    train_counts = sizes.get("train", Counter())
    if train_counts and min(train_counts.values()) > 0:
        ratio = max(train_counts.values()) / min(train_counts.values())
        if ratio > 1.5:
            lines.append(
                f"- Classes are imbalanced in training (largest/smallest = {ratio:.1f}); read "
                "the macro averages, not only accuracy."
            )
    weights = {str(m.sidecar.get("weights")) for m in models.values() if m.sidecar.get("weights")}
    if "hed-bsds500" in weights:
        lines.append(
            "- The transfer models start from `hed-bsds500` (VGG16 ImageNet weights further "
            "trained for edge detection, the only VGG16 weights available offline), which "
            "transfer only weakly; with ImageNet weights expect a larger gain over the baseline."
        )
    lines += [
        "- Labels come from the page an image was crawled from, not from a person checking "
        "each image: some training and test labels may be wrong.",
        "- The test images come from the same sites and crawl as the training images; expect "
        "lower accuracy on photos from elsewhere (other lighting, backgrounds, cameras).",
        "- The models only know the classes above: an image of anything else still gets one "
        "of these labels, often with high confidence.",
        "",
    ]
    atomic_write_text(out, "\n".join(lines))


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


def evaluate(
    cfg: EvaluateConfig,
    split_dir: Path,
    models_dir: Path,
    reports_dir: Path,
    *,
    raw_dir: Path | None = None,
    clean_dir: Path | None = None,
    params_file: Path | None = DEFAULT_PARAMS,
) -> EvaluateSummary:
    """Score every model in ``cfg.models`` on ``split_dir/test.csv`` and write the reports.

    ``raw_dir``/``clean_dir`` (default: beside ``split_dir``) and ``params_file`` feed only the
    model card. Returns an EvaluateSummary. Raises StageError if the test split is missing or
    unreadable, an image in it cannot be decoded, a test class is unknown to a model, or no
    model in ``cfg.models`` exists.
    """
    raw_dir = raw_dir if raw_dir is not None else split_dir.parent / "raw"
    clean_dir = clean_dir if clean_dir is not None else split_dir.parent / "clean"
    from pipeline.dataset import label_indices, load_split, make_dataset

    test_csv = split_dir / "test.csv"
    test_rows = load_split(test_csv)

    models: dict[str, LoadedModel] = {}
    skipped: dict[str, str] = {}
    for name in cfg.models:
        try:
            models[name] = load_model(models_dir, name, cfg.image_size)
        except FileNotFoundError:
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

    import tensorflow as tf

    metrics: dict[str, dict[str, Any]] = {}
    for name, loaded in models.items():
        y_true = label_indices(test_rows, loaded.class_names)
        # The same tf.data pipeline as training (decode + resize), without shuffle or augment.
        dataset = make_dataset(
            test_rows, loaded.class_names, loaded.image_size, cfg.batch_size, cache=False
        )
        print(f"evaluate: {name} on {len(test_rows)} test images", file=sys.stderr)
        try:
            raw = loaded.model.predict(dataset, verbose=2 if len(test_rows) < 1000 else 1)
        except tf.errors.InvalidArgumentError as exc:
            raise StageError(
                f"{test_csv}: an image it lists cannot be decoded: {exc.message.splitlines()[0]}"
            ) from None
        proba = _as_probabilities(raw, len(loaded.class_names))
        metrics[name] = compute_metrics(y_true, proba, loaded.class_names, cfg.top_k)
        _write_model_outputs(cfg, name, loaded, test_rows, y_true, proba, reports_dir)

    metrics_path = atomic_write_json(reports_dir / "metrics.json", metrics)
    write_model_card(
        reports_dir / "model_card.md",
        metrics,
        models,
        skipped,
        split_dir,
        raw_dir,
        clean_dir,
        reports_dir,
        params_file,
        cfg.top_k,
    )
    return EvaluateSummary(
        test_size=len(test_rows),
        accuracy={name: m["accuracy"] for name, m in metrics.items()},
        skipped=skipped,
        metrics_path=metrics_path,
    )


def _model_output_paths(reports_dir: Path, name: str) -> list[Path]:
    return [
        reports_dir / "predictions" / f"{name}.csv",
        reports_dir / "roc" / f"{name}.csv",
        reports_dir / "pr" / f"{name}.csv",
        reports_dir / "misclassified" / f"{name}.png",
    ]


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
    write_csv_rows(
        reports_dir / "predictions" / f"{name}.csv",
        rows,
        ["actual", "predicted", "path", "confidence", *prob_columns],
    )
    roc, pr = _curves(y_true, proba, len(class_names))
    write_csv_rows(reports_dir / "roc" / f"{name}.csv", roc, ["fpr", "tpr", "threshold"])
    write_csv_rows(reports_dir / "pr" / f"{name}.csv", pr, ["recall", "precision", "threshold"])

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
# predict


def _expand_inputs(inputs: Sequence[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    files: list[Path] = []
    errors: list[tuple[Path, str]] = []
    for item in inputs:
        if item.is_dir():
            found = sorted(
                p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                errors.append((item, "no image files in this folder"))
            files.extend(found)
        elif item.exists():
            files.append(item)
        else:
            errors.append((item, "no such file or folder"))
    return files, errors


def run_predict(args: argparse.Namespace) -> int:
    """``python -m pipeline predict``: print the top classes per image.

    Returns 0 if every image was classified, 1 if any could not be read (the others are still
    printed), 2 if the model cannot be loaded or the arguments are invalid.
    """
    if args.top < 1:
        print("error: predict: --top must be at least 1", file=sys.stderr)
        return 2
    try:
        loaded = load_model(args.models_dir, args.model)
    except (FileNotFoundError, StageError) as exc:
        available = sorted(p.stem for p in Path(args.models_dir).glob("*.keras"))
        hint = f" (available: {', '.join(available)})" if available else ""
        print(f"error: predict: {exc}{hint}", file=sys.stderr)
        return 2
    files, errors = _expand_inputs(args.images)
    images: list[np.ndarray] = []
    readable: list[Path] = []
    for path in tqdm(files, desc="load", unit="img", file=sys.stderr, disable=len(files) < 100):
        try:
            images.append(load_image(path, loaded.image_size))
            readable.append(path)
        except StageError as exc:
            errors.append((path, str(exc).removeprefix(f"{path}: ")))
    proba = predict_images(loaded, images, args.batch_size)
    top = min(args.top, len(loaded.class_names))
    for path, p in zip(readable, proba, strict=True):
        order = np.argsort(-p)[:top]
        if args.json:
            ranked = [
                {"class": loaded.class_names[i], "probability": round(float(p[i]), 6)}
                for i in order
            ]
            print(json.dumps({"path": str(path), "model": loaded.name, "top": ranked}))
        else:
            ranked_text = ", ".join(f"{loaded.class_names[i]} {p[i]:.3f}" for i in order)
            print(f"{path}: {ranked_text}")
    for path, message in errors:
        if args.json:
            print(json.dumps({"path": str(path), "model": loaded.name, "error": message}))
        print(f"error: {path}: {message}", file=sys.stderr)
    return 1 if errors else 0
