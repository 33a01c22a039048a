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
Fraction = Annotated[float, Field(gt=0, lt=1)]


class ClassConfig(_Section):
    """One class to learn and where its images live on the web."""

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")]
    seeds: list[str] = []
    image_urls: Path | None = None

    @model_validator(mode="after")
    def _has_a_source(self) -> ClassConfig:
        if not self.seeds and self.image_urls is None:
            raise ValueError(f"class {self.name!r} needs at least one of seeds or image_urls")
        return self


class CrawlConfig(_Section):
    classes: list[ClassConfig]
    serve_demo_site: Path | None = None
    user_agent: Annotated[str, Field(min_length=1)] = "crawl2model/0.1"
    obey_robots_txt: bool = True
    allow_private_addresses: bool = False
    max_depth: Annotated[int, Field(ge=0)] = 2
    max_images_per_class: Annotated[int, Field(ge=0)] = 0
    concurrency: Annotated[int, Field(ge=1, le=256)] = 8
    max_per_host: Annotated[int, Field(ge=1, le=64)] = 2
    per_host_delay_s: NonNegativeFloat = 0.0
    timeout_s: PositiveFloat = 10.0
    retries: Annotated[int, Field(ge=0, le=20)] = 3
    backoff_s: NonNegativeFloat = 0.5
    max_bytes: Annotated[int, Field(ge=1)] = 10_000_000
    min_width: Annotated[int, Field(ge=1)] = 16
    min_height: Annotated[int, Field(ge=1)] = 16
    content_types: list[str] = ["image/jpeg", "image/png", "image/gif", "image/webp"]


class CleanConfig(_Section):
    min_width: Annotated[int, Field(ge=1)] = 16
    min_height: Annotated[int, Field(ge=1)] = 16
    max_side: Annotated[int, Field(ge=8)] = 256
    near_dup_hash_size: Annotated[int, Field(ge=4, le=32)] = 8
    near_dup_max_distance: Annotated[int, Field(ge=0)] = 4


class SplitConfig(_Section):
    """Per-class split sizes: all fractions (summing to 1) or all integer counts."""

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


class AugmentConfig(_Section):
    seed: int = 42
    rotation_range: Annotated[float, Field(ge=0, le=180)] = 15
    width_shift_range: Annotated[float, Field(ge=0, lt=1)] = 0.1
    height_shift_range: Annotated[float, Field(ge=0, lt=1)] = 0.1
    shear_range: Annotated[float, Field(ge=0, lt=90)] = 10
    zoom_range: Annotated[float, Field(ge=0, lt=1)] = 0.1
    horizontal_flip: bool = True
    vertical_flip: bool = False
    preview_images: Annotated[int, Field(ge=1, le=64)] = 6


class BaselineConfig(_Section):
    epochs: Annotated[int, Field(ge=1)] = 15
    learning_rate: PositiveFloat = 1e-3
    augment: bool = True


class TransferConfig(_Section):
    weights: str = "hed-bsds500"
    feature_epochs: Annotated[int, Field(ge=1)] = 15
    fine_tune_epochs: Annotated[int, Field(ge=0)] = 5
    learning_rate: PositiveFloat = 1e-3
    fine_tune_lr: PositiveFloat = 1e-5


class TrainConfig(_Section):
    seed: int = 42
    image_size: Annotated[int, Field(ge=32, le=512)] = 64
    batch_size: Annotated[int, Field(ge=1)] = 32
    baseline: BaselineConfig = BaselineConfig()
    transfer: TransferConfig = TransferConfig()
    augment: AugmentConfig = AugmentConfig()


class EvaluateConfig(_Section):
    image_size: Annotated[int, Field(ge=32, le=512)] = 64
    misclassified_images: Annotated[int, Field(ge=0, le=256)] = 16


class Params(_Section):
    """The whole params.yaml. Stage configs are derived views (``params.crawl`` etc.)."""

    seed: int = 42
    classes: Annotated[list[ClassConfig], Field(min_length=2)]
    crawl: dict[str, Any] = {}
    clean: CleanConfig = CleanConfig()
    split: dict[str, Any] = {}
    augment: dict[str, Any] = {}
    train: dict[str, Any] = {}
    evaluate: dict[str, Any] = {}
    flow: dict[str, Any] = {}

    @field_validator("classes")
    @classmethod
    def _unique_names(cls, classes: list[ClassConfig]) -> list[ClassConfig]:
        names = [c.name for c in classes]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"class names must be unique, repeated: {', '.join(dupes)}")
        return classes


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


def _format_error(err: ValidationError, source: str, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
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


def _build(model: type[BaseModel], data: dict[str, Any], source: str, prefix: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ParamsError(_format_error(err, source, prefix)) from None


def parse_params(data: Any, source: str = "params.yaml") -> StageConfigs:
    """Validate a params mapping and return every stage's config.

    Raises ParamsError naming ``source`` and each offending dotted key.
    """
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    params: Params = _build(Params, data, source, "")
    seed = params.seed
    classes = [c.model_dump() for c in params.classes]
    train_data = {"seed": seed, **params.train, "augment": {"seed": seed, **params.augment}}
    return StageConfigs(
        seed=seed,
        class_names=[c.name for c in params.classes],
        crawl=_build(CrawlConfig, {"classes": classes, **params.crawl}, source, "crawl"),
        clean=params.clean,
        split=_build(SplitConfig, {"seed": seed, **params.split}, source, "split"),
        augment=_build(AugmentConfig, {"seed": seed, **params.augment}, source, "augment"),
        train=_build(TrainConfig, train_data, source, "train"),
        evaluate=_build(
            EvaluateConfig,
            {"image_size": params.train.get("image_size", 64), **params.evaluate},
            source,
            "evaluate",
        ),
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


Split = Literal["train", "val", "test"]
