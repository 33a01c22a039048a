"""The whole params.yaml: the ``Params`` model (every section, unknown keys rejected at every
depth), the stage configs built from it (values the code injects: seed, classes, image size),
and ``load_params``/``parse_params``, which name the file and dotted key in every error."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.config.base import (
    DEFAULT_PARAMS,
    ParamsError,
    _Section,
)
from pipeline.config.clean import CleanConfig
from pipeline.config.crawl import ClassConfig, CrawlConfig, CrawlSettings, _cap_below_minimum
from pipeline.config.results import (
    AuditConfig,
    AuditSettings,
    EvaluateConfig,
    EvaluateSettings,
    ExportConfig,
    FlowConfig,
    ServeConfig,
)
from pipeline.config.training import (
    AugmentConfig,
    AugmentSettings,
    SplitConfig,
    TrainConfig,
    TrainSettings,
)


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
        shown = (
            ""
            if e["type"] in {"extra_forbidden", "missing"} or isinstance(got, dict)
            else (f", got {got!r}")
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
