"""The sections after training: ``evaluate:``, ``audit:``, ``flow:`` (promotion, schedule),
``export:`` and ``serve:``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    Field,
    field_validator,
)

from pipeline.config.base import (
    ModelName,
    NonNegativeFloat,
    PositiveFloat,
    _Section,
)
from pipeline.config.training import Backbone


class EvaluateSettings(_Section):
    """evaluate: which models to score on the test split and how much of their mistakes to show."""

    models: Annotated[list[ModelName], Field(min_length=1)] = [
        "baseline",
        "transfer_features",
        "transfer_finetuned",
        "compare_features",
        "compare_finetuned",
    ]
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 64
    top_k: Annotated[int, Field(ge=2, le=20)] = 5
    misclassified_images: Annotated[int, Field(ge=0, le=256)] = 16

    @field_validator("models")
    @classmethod
    def _unique_models(cls, models: list[str]) -> list[str]:
        if len(set(models)) != len(models):
            raise ValueError("model names must be unique")
        return models


class EvaluateConfig(EvaluateSettings):
    """What evaluate runs with: the ``evaluate:`` section plus ``train.fit.image_size`` (used
    only for a model whose sidecar json lacks its image size)."""

    image_size: Annotated[int, Field(ge=32, le=512)] = 64


class AuditSettings(_Section):
    """audit: find images whose label is wrong or that belong to no class (pipeline/audit/)."""

    action: Literal["flag", "drop", "relabel"] = "flag"
    folds: Annotated[int, Field(ge=2, le=20)] = 5
    inner_folds: Annotated[int, Field(ge=2, le=10)] = 3
    c_grid: Annotated[list[PositiveFloat], Field(min_length=1)] = [
        0.0001,
        0.001,
        0.01,
        0.1,
        1.0,
    ]
    components: Annotated[int, Field(ge=0, le=4096)] = 128
    rank_by: Literal["self_confidence", "normalized_margin"] = "self_confidence"
    relabel_threshold: Annotated[float, Field(gt=0, le=1)] = 0.9
    # action drop/relabel: a label issue is removed only when its label quality is below this;
    # the others stay in training, flagged for review (1.0: every label issue is removed)
    drop_below: Annotated[float, Field(ge=0, le=1)] = 1.0
    ood_neighbours: Annotated[int, Field(ge=1, le=500)] = 50
    ood_threshold: Annotated[float, Field(gt=0)] = 2.0
    review: Path = Path("data/audit/review.csv")
    suspects_per_class: Annotated[int, Field(ge=0, le=32)] = 8
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 64
    # a Dask scheduler (tcp://host:8786) whose workers extract the features, CHUNK images a task;
    # they read images by path (a shared file system). None: in this process
    dask_address: str | None = None


class AuditConfig(AuditSettings):
    """What the audit runs with: the ``audit:`` section plus the global ``seed`` and the transfer
    model's backbone, weights and input size (its features are that model's frozen base, so the
    audit follows ``train.transfer``)."""

    seed: int = 42
    image_size: Annotated[int, Field(ge=32, le=512)] = 64
    backbone: Backbone = "vgg16"
    weights: Annotated[str, Field(min_length=1)] = "hed-bsds500"


_CRON_FIELD = r"[0-9A-Za-z*/,?#LW-]+"
_CRON_MACRO = r"@(yearly|annually|monthly|weekly|daily|midnight|hourly)"
_CRON = rf"^({_CRON_MACRO}|{_CRON_FIELD}(\s+{_CRON_FIELD}){{4}})$"


class PromotionConfig(_Section):
    """flow.promote: when a run's model may replace models/best/ (flows/promote.py)."""

    model: ModelName = "transfer_finetuned"
    metric: Annotated[str, Field(min_length=1)] = "accuracy"
    higher_is_better: bool = True
    max_drop: Annotated[float, Field(ge=0)] = 0.0


class FlowConfig(_Section):
    """flow: schedule, retries, crawl fan-out, promotion, run records (flows/)."""

    cron: Annotated[str, Field(pattern=_CRON)] = "0 3 * * 1"
    timezone: Annotated[str, Field(min_length=1)] = "UTC"
    deployment_name: ModelName = "crawl2model-scheduled"
    crawl_retries: Annotated[int, Field(ge=0, le=10)] = 2
    crawl_retry_backoff_s: NonNegativeFloat = 30.0
    crawl_host_shards: Annotated[int, Field(ge=1, le=64)] = 1
    dask_address: str | None = None
    git_commit: bool = True
    dvc_push: bool = True
    when_busy: Literal["skip", "wait"] = "skip"
    busy_wait_s: NonNegativeFloat = 600.0
    promote: PromotionConfig = PromotionConfig()


# "best" (best on the test split by export.metric), a model name, or models/best (the flow's)
ExportModelChoice = Annotated[str, Field(pattern=r"^(models/best|[A-Za-z0-9_][A-Za-z0-9_.-]*)$")]
TfliteVariant = Literal["float32", "float16", "int8"]


class ExportConfig(_Section):
    """export: which trained model to ship and in which formats (pipeline/export/)."""

    model: ExportModelChoice = "best"
    metric: Annotated[str, Field(min_length=1)] = "accuracy"
    higher_is_better: bool = True
    tflite: list[TfliteVariant] = ["float32", "float16", "int8"]
    # int8 tries keeping its first 0..this many weighted layers (conv, depthwise, dense) and the
    # ops before them in float, and keeps the fewest that measurably help; 0 = every op integer.
    int8_float_layers: Annotated[int, Field(ge=0, le=1000)] = 4
    onnx: bool = True
    onnx_opset: Annotated[int, Field(ge=13, le=18)] = 17
    representative_images: Annotated[int, Field(ge=1, le=10_000)] = 100
    verify_images: Annotated[int, Field(ge=1, le=10_000)] = 64
    min_float_agreement: Annotated[float, Field(ge=0, le=1)] = 0.99

    @field_validator("tflite")
    @classmethod
    def _unique_variants(cls, variants: list[str]) -> list[str]:
        if len(set(variants)) != len(variants):
            raise ValueError("TFLite variants must be unique")
        return variants


class ServeConfig(_Section):
    """serve: the web app of ``python -m pipeline serve`` (pipeline/serve/); no stage reads it."""

    model: ExportModelChoice = "best"
    host: Annotated[str, Field(min_length=1)] = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    top_k: Annotated[int, Field(ge=1, le=100)] = 5
    max_request_bytes: Annotated[int, Field(ge=1024)] = 20_000_000
    max_files: Annotated[int, Field(ge=1, le=1024)] = 32
    max_image_pixels: Annotated[int, Field(ge=1)] = 50_000_000
    audit_csv: Path = Path("data/audit/label_issues.csv")
    review_csv: Path = Path("data/audit/review.csv")
