"""The stage registry: every stage's name, function, params groups, outputs and headline metrics.

The CLI (``python -m pipeline <stage>``), the Prefect flow (``flows/``) and the test that reads
dvc.yaml all use this one table, so they cannot disagree on what the stages are. Each entry says:

- ``name``: the CLI subcommand and the dvc.yaml stage (``python -m pipeline <name>``);
- ``module``: where its logic lives (``pipeline/<module>``), imported only when it runs;
- ``params``: the params.yaml groups its DVC stage depends on (a change reruns it);
- ``outputs``: what it writes (dvc.yaml outs, metrics and plots);
- ``headline``: the few counts it reports as a DVC metric in ``reports/metrics/<name>.json``.

``run_stage`` runs one stage and writes its summary to ``reports/summaries/<name>.json``
(the one-line text and the summary's fields), which the flow reads instead of parsing stdout.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import paths
from pipeline.config import StageConfigs
from pipeline.files import atomic_write_json

Headline = Callable[[Any], dict[str, int | float]]


@dataclass(frozen=True)
class StageOptions:
    """Command-line options beyond params.yaml (only the crawl has any)."""

    # crawl: walk the sources again for new images; already-fetched images are not refetched
    refresh: bool = False
    # crawl: only these classes (default: all)
    classes: tuple[str, ...] = ()
    # crawl: "all" (discover, fetch, merge), or one step of a sharded crawl
    crawl_step: str = "all"
    # crawl: "2/4" = the second of four host shards (with crawl_step "fetch")
    shard: str | None = None


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    module: str
    params: tuple[str, ...]
    outputs: tuple[Path, ...]
    run: Callable[[StageConfigs, StageOptions], Any]
    headline: Headline | None = None

    @property
    def summary_path(self) -> Path:
        return paths.SUMMARIES / f"{self.name}.json"

    @property
    def metrics_path(self) -> Path | None:
        return paths.STAGE_METRICS / f"{self.name}.json" if self.headline else None


def crawl_job_options(job: Any) -> StageOptions:
    """The CLI options that run one job of a crawl plan (``pipeline.crawl.plan``): a
    DiscoveryJob is ``crawl --discover --class C``, a FetchJob ``crawl --shard I/N --class C``."""
    from pipeline.crawl import DiscoveryJob

    if isinstance(job, DiscoveryJob):
        return StageOptions(job.refresh, (job.class_name,), "discover")
    shard = str(job.host_shard) if job.host_shard is not None else None
    return StageOptions(job.refresh, (job.class_name,), "fetch", shard)


# --- how each stage is called -----------------------------------------------------------------


def _crawl(cfg: StageConfigs, opts: StageOptions) -> Any:
    from pipeline import crawl

    classes = list(opts.classes) or None
    if opts.crawl_step == "discover":
        return crawl.discover(cfg.crawl, paths.RAW, classes=classes, refresh=opts.refresh)
    if opts.crawl_step == "fetch":
        shard = crawl.HostShard.parse(opts.shard) if opts.shard else None
        return crawl.crawl(
            cfg.crawl,
            paths.RAW,
            paths.CRAWL_REPORT,
            classes=classes,
            host_shard=shard,
            refresh=opts.refresh,
        )
    if opts.crawl_step == "merge":
        return crawl.merge_shards(cfg.crawl, paths.RAW, paths.CRAWL_REPORT)
    return crawl.crawl(
        cfg.crawl, paths.RAW, paths.CRAWL_REPORT, classes=classes, refresh=opts.refresh
    )


def _clean(cfg: StageConfigs, opts: StageOptions) -> Any:
    from pipeline.clean import clean

    return clean(cfg.clean, paths.RAW, paths.CLEAN, report=paths.CLEAN_REPORT)


def _split(cfg: StageConfigs, opts: StageOptions) -> Any:
    from pipeline.split import split

    return split(cfg.split, paths.CLEAN, paths.SPLIT, report=paths.SPLIT_REPORT)


def _audit(cfg: StageConfigs, opts: StageOptions) -> Any:
    from pipeline.audit import audit

    return audit(
        cfg.audit, paths.SPLIT, paths.CLEAN, paths.AUDIT, paths.AUDIT_REPORT, paths.AUDIT_SUSPECTS
    )


def _augment(cfg: StageConfigs, opts: StageOptions) -> Any:
    from pipeline.augment import augment

    return augment(cfg.augment, paths.AUDIT, paths.AUGMENTED, preview=paths.AUGMENT_PREVIEW)


def _train_baseline(cfg: StageConfigs, opts: StageOptions) -> Any:
    from pipeline.train import train_baseline

    return train_baseline(
        cfg.train,
        paths.AUDIT,
        paths.MODELS,
        live_dir=paths.DVCLIVE / "baseline",
        augmented_dir=paths.AUGMENTED,
    )


def _train_transfer(cfg: StageConfigs, opts: StageOptions) -> Any:
    from pipeline.train import train_transfer

    return train_transfer(
        cfg.train,
        paths.AUDIT,
        paths.MODELS,
        features_dir=paths.FEATURES,
        live_dir=paths.DVCLIVE / "transfer",
        augmented_dir=paths.AUGMENTED,
    )


def _train_compare(cfg: StageConfigs, opts: StageOptions) -> Any:
    from pipeline.train import train_transfer

    return train_transfer(
        cfg.train,
        paths.AUDIT,
        paths.MODELS,
        features_dir=COMPARE_FEATURES,
        live_dir=paths.DVCLIVE / "compare",
        augmented_dir=paths.AUGMENTED,
        section="compare",
    )


def _evaluate(cfg: StageConfigs, opts: StageOptions) -> Any:
    from pipeline.evaluate import evaluate
    from pipeline.model_card import Provenance

    return evaluate(cfg.evaluate, paths.AUDIT, paths.MODELS, paths.REPORTS, Provenance.of_project())


def _export(cfg: StageConfigs, opts: StageOptions) -> Any:
    from pipeline.export import export

    return export(cfg.export, paths.AUDIT, paths.MODELS, paths.MODEL_METRICS, paths.EXPORT)


# --- headline metrics: a few counts per stage, shared key names keep `dvc metrics show` narrow --


def _crawl_headline(summary: Any) -> dict[str, int | float]:
    return {"images": sum(summary.saved.values()), "dropped": sum(summary.failed.values())}


def _clean_headline(summary: Any) -> dict[str, int | float]:
    return {"images": summary.kept, "dropped": sum(summary.removed.values())}


def _split_headline(summary: Any) -> dict[str, int | float]:
    used = sum(n for name, n in summary.counts.items() if name != "unused")
    return {"images": used, "dropped": summary.unused}


def _audit_headline(summary: Any) -> dict[str, int | float]:
    return {"images": summary.images, "dropped": summary.dropped, "suspects": summary.suspects}


# audit: the CSVs every later stage reads, the issue table and the feature cache. Listed one by
# one, not data/audit as a whole: data/audit/review.csv, a person's decisions, is its input.
AUDIT_OUT = (
    *(paths.AUDIT / f"{split}.csv" for split in ("train", "val", "test")),
    paths.AUDIT / "label_issues.csv",
    paths.AUDIT / "features",
)
MODELS_OUT = (
    paths.MODELS / "baseline.keras",
    paths.MODELS / "baseline.json",
)
TRANSFER_OUT = (
    paths.FEATURES,
    paths.MODELS / "transfer_features.keras",
    paths.MODELS / "transfer_features.json",
    paths.MODELS / "transfer_finetuned.keras",
    paths.MODELS / "transfer_finetuned.json",
)
COMPARE_FEATURES = Path("data/features_compare")  # train-compare's feature cache
COMPARE_OUT = (
    COMPARE_FEATURES,
    paths.MODELS / "compare_features.keras",
    paths.MODELS / "compare_features.json",
    paths.MODELS / "compare_finetuned.keras",
    paths.MODELS / "compare_finetuned.json",
)


def _curves(name: str) -> tuple[Path, Path]:
    """DVCLive's files for one trainer: the last epoch's numbers and the per-epoch curves."""
    return paths.DVCLIVE / name / "metrics.json", paths.DVCLIVE / name / "plots" / "metrics"


STAGES: tuple[Stage, ...] = (
    Stage(
        "crawl",
        "fetch images for each class into data/raw (resumes a killed crawl)",
        "pipeline.crawl",
        ("classes", "crawl"),
        (paths.RAW, paths.CRAWL_REPORT),
        _crawl,
        _crawl_headline,
    ),
    Stage(
        "clean",
        "validate, normalise and dedupe data/raw into data/clean",
        "pipeline.clean",
        ("clean",),
        (paths.CLEAN, paths.CLEAN_REPORT, paths.CLEAN_DUPLICATES),
        _clean,
        _clean_headline,
    ),
    Stage(
        "split",
        "grouped, stratified train/val/test CSVs in data/split",
        "pipeline.split",
        ("seed", "split"),
        (paths.SPLIT, paths.SPLIT_REPORT),
        _split,
        _split_headline,
    ),
    Stage(
        "audit",
        "find wrong labels and foreign images (cleanlab); the audited CSVs in data/audit",
        "pipeline.audit",
        (
            "seed",
            "audit",
            "train.fit.image_size",
            "train.transfer.backbone",
            "train.transfer.weights",
            "train.transfer.image_size",
        ),
        (*AUDIT_OUT, paths.AUDIT_REPORT, paths.AUDIT_SUSPECTS),
        _audit,
        _audit_headline,
    ),
    Stage(
        "augment",
        "augmentation preview (and offline copies if augment.mode=offline)",
        "pipeline.augment",
        ("seed", "augment"),
        (paths.AUGMENTED, paths.AUGMENT_PREVIEW),
        _augment,
    ),
    Stage(
        "train-baseline",
        "train the small convnet from scratch into models/baseline.keras",
        "pipeline.train",
        (
            "seed",
            "augment.mode",
            "augment.copies",
            "augment.transforms",
            "train.fit",
            "train.baseline",
        ),
        (*MODELS_OUT, *_curves("baseline")),
        _train_baseline,
    ),
    Stage(
        "train-transfer",
        "train.transfer's backbone: frozen features, then fine-tuning, into models/transfer_*",
        "pipeline.train",
        (
            "seed",
            "augment.mode",
            "augment.copies",
            "augment.transforms",
            "train.fit",
            "train.transfer",
        ),
        (*TRANSFER_OUT, *_curves("transfer")),
        _train_transfer,
    ),
    Stage(
        "train-compare",
        "train.compare's backbone the same way, beside it, into models/compare_*",
        "pipeline.train",
        (
            "seed",
            "augment.mode",
            "augment.copies",
            "augment.transforms",
            "train.fit",
            "train.compare",
        ),
        (*COMPARE_OUT, *_curves("compare")),
        _train_compare,
    ),
    Stage(
        "evaluate",
        "test-set metrics, plots and model card for every model into reports/",
        "pipeline.evaluate",
        ("evaluate",),
        (
            paths.MODEL_METRICS,
            paths.EVALUATION,
            paths.PREDICTIONS,
            paths.ROC,
            paths.PR,
            paths.MODEL_CARD,
            paths.MISCLASSIFIED,
        ),
        _evaluate,
    ),
    Stage(
        "export",
        "the best (or a named) model as SavedModel, TFLite and ONNX into models/export/",
        "pipeline.export",
        ("export",),
        (paths.EXPORT,),
        _export,
    ),
)

BY_NAME: Mapping[str, Stage] = {stage.name: stage for stage in STAGES}
NAMES: tuple[str, ...] = tuple(BY_NAME)


def get(name: str) -> Stage:
    """The stage called ``name``; raises KeyError listing the stages."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"{name!r} is not a stage ({', '.join(NAMES)})") from None


def _jsonable(summary: Any) -> Any:
    if dataclasses.is_dataclass(summary) and not isinstance(summary, type):
        return dataclasses.asdict(summary)
    return summary


# Timings differ on every run: in a DVC-tracked summary they would make a stage's outputs (and
# dvc.lock) change when nothing else did. The CLI prints the time beside the summary instead.
VOLATILE_FIELDS = frozenset({"elapsed_s", "seconds"})


def write_summary(stage: Stage, summary: Any, root: Path = Path(".")) -> None:
    """Write the summary file (always) and the headline metrics (stages that have them)."""
    fields = _jsonable(summary)
    if isinstance(fields, dict):
        fields = {k: v for k, v in fields.items() if k not in VOLATILE_FIELDS}
    atomic_write_json(
        root / stage.summary_path,
        {"stage": stage.name, "summary": str(summary), "fields": fields},
    )
    if stage.headline is not None and stage.metrics_path is not None:
        atomic_write_json(root / stage.metrics_path, stage.headline(summary))


def run_stage(name: str, cfg: StageConfigs, options: StageOptions = StageOptions()) -> Any:
    """Run stage ``name`` with ``cfg``; write its summary (and headline metrics) files when it
    ran as a whole (not one step of a sharded crawl). Returns the stage's summary object.

    Raises what the stage raises: ParamsError, StageError, FileNotFoundError.
    """
    stage = get(name)
    summary = stage.run(cfg, options)
    if options.crawl_step in ("all", "merge"):
        write_summary(stage, summary)
    return summary


def read_summary(root: Path, name: str) -> str | None:
    """The one-line summary the last run of stage ``name`` wrote under ``root``, if any."""
    path = root / get(name).summary_path
    try:
        return str(json.loads(path.read_text(encoding="utf-8"))["summary"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
