"""Typed configuration: params.yaml turned into frozen pydantic models.

Every stage function takes the one model it needs (``CrawlConfig``, ``CleanConfig``, ...), never
the whole dict. ``load_params`` rejects unknown keys and out-of-range values before any work
starts, naming the dotted key (``train.baseline.epochs``) and the file in the message.

    base.py      ParamsError, StageError, the strict frozen base model, shared types
    crawl.py     classes: and crawl:          clean.py    clean:
    training.py  split:, augment:, train: (backbones and weights)
    results.py   evaluate:, audit:, flow:, export:, serve:
    params.py    Params (the whole file), StageConfigs, parse_params, load_params
"""

from pipeline.config.base import (
    DEFAULT_PARAMS,
    ModelName,
    NonNegativeFloat,
    ParamsError,
    PositiveFloat,
    StageError,
)
from pipeline.config.clean import (
    CleanConfig,
    QualityFlag,
)
from pipeline.config.crawl import (
    DEFAULT_TRACKING_PARAMS,
    ClassConfig,
    CrawlConfig,
    CrawlSettings,
    QuerySource,
)
from pipeline.config.params import (
    Params,
    StageConfigs,
    load_params,
    parse_params,
)
from pipeline.config.results import (
    AuditConfig,
    AuditSettings,
    EvaluateConfig,
    EvaluateSettings,
    ExportConfig,
    ExportModelChoice,
    FlowConfig,
    PromotionConfig,
    ServeConfig,
    TfliteVariant,
)
from pipeline.config.training import (
    BACKBONE_BLOCKS,
    BACKBONE_CONVS,
    BACKBONE_KEY,
    OFFLINE_WEIGHTS,
    WEIGHTS_KEY,
    AugmentConfig,
    AugmentSettings,
    Backbone,
    BaselineConfig,
    FitConfig,
    PreviewConfig,
    Probability,
    SplitConfig,
    TrainConfig,
    TrainSettings,
    TransferConfig,
    TransformsConfig,
)

__all__ = [
    "BACKBONE_BLOCKS",
    "BACKBONE_CONVS",
    "BACKBONE_KEY",
    "DEFAULT_PARAMS",
    "DEFAULT_TRACKING_PARAMS",
    "OFFLINE_WEIGHTS",
    "WEIGHTS_KEY",
    "AuditConfig",
    "AuditSettings",
    "AugmentConfig",
    "AugmentSettings",
    "Backbone",
    "BaselineConfig",
    "ClassConfig",
    "CleanConfig",
    "CrawlConfig",
    "CrawlSettings",
    "EvaluateConfig",
    "EvaluateSettings",
    "ExportConfig",
    "ExportModelChoice",
    "FitConfig",
    "FlowConfig",
    "ModelName",
    "NonNegativeFloat",
    "Params",
    "ParamsError",
    "PositiveFloat",
    "PreviewConfig",
    "Probability",
    "PromotionConfig",
    "QualityFlag",
    "QuerySource",
    "ServeConfig",
    "SplitConfig",
    "StageConfigs",
    "StageError",
    "TfliteVariant",
    "TrainConfig",
    "TrainSettings",
    "TransferConfig",
    "TransformsConfig",
    "load_params",
    "parse_params",
]
