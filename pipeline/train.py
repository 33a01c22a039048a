"""Training stages: ``train-baseline`` (small convnet from scratch), ``train-transfer`` and
``train-compare`` (a frozen ImageNet-style backbone, then fine-tuning; ``pipeline.models``).

Consumes ``data/split/{train,val}.csv`` and the images they name (see ``pipeline.dataset``), or in
``augment.mode: offline`` ``data/augmented/train.csv`` instead of the split's train.csv.
Produces, per model, ``models/<name>.keras`` (saved atomically) with a sidecar
``models/<name>.json`` (class_names, image_size, model, seed, backbone, weights and their
provenance, versions, best epoch and val metrics, and under ``train`` the settings it was trained
with: ``train.fit``, its own trainer's section and ``augment`` less the preview knobs), per-epoch
train/val loss and accuracy in ``dvclive/<stage>/`` (metrics.json + plots/metrics/*.tsv), and for
transfer's "fast" mode the cached backbone features (``pipeline.features``).

Transfer follows the keras-io transfer-learning guide: freeze the base → fit a new dense head (on
cached features, "fast", or end to end through the frozen base with on-the-fly augmentation,
"augmented") → unfreeze the last block → compile at a low learning rate → fit. ``train-transfer``
reads ``train.transfer`` and writes ``transfer_{features,finetuned}``; ``train-compare`` reads
``train.compare`` (same keys) and writes ``compare_{features,finetuned}``.

Resuming: each phase keeps Keras' BackupAndRestore state, its best checkpoint and a history CSV
under ``models/.backup/<stage>/`` (``pipeline.fitting``), outside DVC's outs (DVC deletes outs
before rerunning a stage). A killed run continues from its last finished epoch; a finished phase
is not redone. The folder is removed once the stage succeeds, and wiped (``pipeline.resume``)
when the settings or the split CSVs changed since.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import keras
import tensorflow as tf
from dvclive import Live

from pipeline import models, paths
from pipeline.config import StageError, TrainConfig
from pipeline.dataset import (
    EpochBatches,
    SplitRows,
    epoch_batches,
    label_indices,
    load_split,
    make_dataset,
)
from pipeline.features import cached_features, feature_batches, feature_std, features_dataset
from pipeline.files import atomic_path, atomic_write_json
from pipeline.fitting import PhaseResult, compile_model, fit_phase, library_versions, open_live
from pipeline.resume import fingerprint, reuse_or_wipe

BACKUP_DIR_NAME = ".backup"

Augment = Callable[[tf.Tensor], tf.Tensor]


@dataclass(frozen=True)
class ModelResult:
    """One saved model: where it is and how it did on the validation set."""

    name: str
    path: Path
    epochs: int
    best_epoch: int
    val_accuracy: float
    val_loss: float


@dataclass(frozen=True)
class TrainSummary:
    """What a training stage saved; ``str()`` is the one-line summary the CLI prints."""

    models: list[ModelResult]
    train_images: int
    val_images: int
    resumed_from_epoch: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def __str__(self) -> str:
        parts = [
            f"{m.name} val_accuracy {m.val_accuracy:.3f} (best epoch {m.best_epoch}/{m.epochs})"
            for m in self.models
        ]
        resumed = [f"{k} from epoch {v}" for k, v in self.resumed_from_epoch.items() if v]
        tail = f"; resumed {', '.join(resumed)}" if resumed else ""
        return (
            f"{'; '.join(parts)} on {self.train_images} train / {self.val_images} val images{tail}"
        )


# ---------------------------------------------------------------------------------------------
# What every stage starts with: seeds, data, settings, a resumable backup folder


@dataclass(frozen=True)
class _Data:
    train: SplitRows
    val: SplitRows
    class_names: list[str]


def _train_csv(cfg: TrainConfig, split_dir: Path, augmented_dir: Path | None) -> Path:
    """The training CSV: the split's, or in ``augment.mode: offline`` the augment stage's
    (originals plus their written copies). Raises StageError if the offline set is missing."""
    if cfg.augment.mode != "offline":
        return split_dir / "train.csv"
    csv_path = (augmented_dir or paths.AUGMENTED) / "train.csv"
    if not csv_path.is_file():
        raise StageError(
            f"{csv_path}: not found; augment.mode is offline, so run the augment stage first"
        )
    return csv_path


def _read_data(cfg: TrainConfig, split_dir: Path, augmented_dir: Path | None) -> _Data:
    train = load_split(_train_csv(cfg, split_dir, augmented_dir))
    val = load_split(split_dir / "val.csv")
    class_names = train.class_names
    if len(class_names) < 2:
        raise StageError(f"{train.csv_path}: needs at least 2 classes, found {class_names}")
    label_indices(val, class_names)  # fail now, not mid-fit, on a class train.csv lacks
    return _Data(train, val, class_names)


TRAINERS = ("baseline", "transfer", "compare")
TransferSection = Literal["transfer", "compare"]


def _settings(cfg: TrainConfig, trainer: str) -> dict[str, Any]:
    """What decides a trainer's result: ``cfg`` less run-only knobs (verbose and cache change how
    a run looks or uses memory, dask_address where features are extracted), the preview knobs
    and the other trainers' sections."""
    exclude: dict[str, Any] = {"verbose": True, "cache": True}
    exclude.update({other: True for other in TRAINERS if other != trainer})
    if trainer != "baseline":
        exclude[trainer] = {"dask_address": True}
    exclude["augment"] = {"preview": True}
    return cfg.model_dump(mode="json", exclude=exclude)


def _resume_backup(backup: Path, cfg: TrainConfig, data: _Data, trainer: str) -> bool:
    """Keep ``backup`` if an earlier run of these settings on these CSVs made it, else wipe it.

    Returns True if kept (the run resumes).
    """
    fp = fingerprint(_settings(cfg, trainer), files=[data.train.csv_path, data.val.csv_path])
    wipe = functools.partial(shutil.rmtree, backup, ignore_errors=True)
    return reuse_or_wipe(backup / "state.json", fp, wipe, {"trainer": trainer}).reused


def _augment_fn(cfg: TrainConfig, enabled: bool) -> Augment | None:
    # In offline mode the written copies are the augmentation; augmenting them again on the
    # fly would stack two rounds of distortion.
    if not enabled or cfg.augment.mode == "offline":
        return None
    from pipeline.augment import make_tf_augment

    return make_tf_augment(cfg.augment, cfg.fit.image_size)


def _train_images(
    cfg: TrainConfig, data: _Data, augment: Augment | None, seed: int
) -> EpochBatches:
    """The shuffled (and optionally augmented) training batches every phase fits on, in an
    order fixed by (seed, epoch) so a resumed run replays the uninterrupted one."""
    fit = cfg.fit
    return epoch_batches(
        data.train,
        data.class_names,
        fit.image_size,
        fit.batch_size,
        seed=seed,
        augment=augment,
        cache=cfg.cache,
    )


def _val_images(cfg: TrainConfig, data: _Data) -> tf.data.Dataset:
    fit = cfg.fit
    return make_dataset(data.val, data.class_names, fit.image_size, fit.batch_size, cache=cfg.cache)


@dataclass(frozen=True)
class _Run:
    """One training stage under way: where its models, backup folder and curves go."""

    cfg: TrainConfig
    trainer: str
    data: _Data
    models_dir: Path
    backup: Path
    live: Live
    settings: dict[str, Any] = field(default_factory=dict)  # the sidecar's "train"

    def fit(
        self,
        model: keras.Model,
        train_ds: EpochBatches,
        val_ds: tf.data.Dataset,
        *,
        epochs: int,
        phase: int,
        step_offset: int = 0,
    ) -> PhaseResult:
        return fit_phase(
            model,
            train_ds,
            val_ds,
            epochs=epochs,
            phase_dir=self.backup / f"phase{phase}",
            live=self.live,
            step_offset=step_offset,
            phase=phase,
            patience=self.cfg.fit.patience,
            verbose=self.cfg.verbose,
        )

    def save(self, name: str, result: PhaseResult, extra: dict[str, Any]) -> ModelResult:
        """Copy ``result``'s checkpoint to ``models/<name>.keras`` and write its sidecar JSON,
        each atomically. Returns what was saved."""
        path = self.models_dir / f"{name}.keras"
        with atomic_path(path) as tmp:
            shutil.copyfile(result.checkpoint, tmp)  # VGG16 models are ~60 MB: copy, not save
        atomic_write_json(
            self.models_dir / f"{name}.json",
            {
                "model": name,
                "class_names": self.data.class_names,
                "image_size": self.cfg.fit.image_size,
                "seed": self.cfg.seed,
                **result.metrics(),
                "versions": library_versions(),
                **extra,
                "train": self.settings or _settings(self.cfg, self.trainer),
            },
        )
        return ModelResult(
            name, path, result.epochs, result.best_epoch, result.val_accuracy, result.val_loss
        )

    def finish(
        self, saved: list[ModelResult], resumed: dict[str, int], started: float
    ) -> TrainSummary:
        """End the DVCLive run, drop the backup folder and summarise the stage."""
        self.live.summary["seed"] = self.cfg.seed
        self.live.summary["versions"] = library_versions()
        for r in saved:
            self.live.summary[r.name] = {
                "val_accuracy": r.val_accuracy,
                "val_loss": r.val_loss,
                "best_epoch": r.best_epoch,
                "epochs": r.epochs,
            }
        self.live.end()
        shutil.rmtree(self.backup, ignore_errors=True)
        elapsed = time.monotonic() - started
        return TrainSummary(saved, len(self.data.train), len(self.data.val), resumed, elapsed)


def _decode_errors_name_the_split(
    stage: Callable[..., TrainSummary],
) -> Callable[..., TrainSummary]:
    """Turn TensorFlow's mid-epoch image decode error into a StageError naming the split CSVs.

    The clean stage decodes every image, so this only fires when data/clean was edited by hand.
    """

    @functools.wraps(stage)
    def wrapper(cfg: TrainConfig, split_dir: Path, *args: Any, **kwargs: Any) -> TrainSummary:
        try:
            return stage(cfg, split_dir, *args, **kwargs)
        except tf.errors.InvalidArgumentError as exc:
            first_line = (exc.message or str(exc)).splitlines()[0]
            raise StageError(
                f"{split_dir}/{{train,val}}.csv: an image they list cannot be decoded "
                f"({first_line}); rerun the clean and split stages"
            ) from None

    return wrapper


# ---------------------------------------------------------------------------------------------
# train-baseline


@_decode_errors_name_the_split
def train_baseline(
    cfg: TrainConfig,
    split_dir: Path,
    models_dir: Path,
    live_dir: Path,
    augmented_dir: Path | None = None,
) -> TrainSummary:
    """Train the DLwP small convnet from scratch; save ``models/baseline.keras`` (+ .json).

    Returns a TrainSummary. Raises StageError for a missing/invalid split CSV or image file.
    """
    started = time.monotonic()
    models.configure(cfg.seed, cfg.fit.mixed_precision)
    data = _read_data(cfg, split_dir, augmented_dir)
    backup = models_dir / BACKUP_DIR_NAME / "baseline"
    resuming = _resume_backup(backup, cfg, data, "baseline")
    train_ds = _train_images(cfg, data, _augment_fn(cfg, cfg.baseline.augment), cfg.seed)
    val_ds = _val_images(cfg, data)

    model = models.build_baseline(cfg.fit.image_size, len(data.class_names), cfg.baseline.dropout)
    compile_model(model, cfg.baseline.learning_rate, cfg.fit)
    run = _Run(cfg, "baseline", data, models_dir, backup, open_live(live_dir, resuming))
    result = run.fit(model, train_ds, val_ds, epochs=cfg.baseline.epochs, phase=1)
    extra = {"backbone": None, "weights": "none", "augment": cfg.baseline.augment}
    saved = run.save("baseline", result, extra)
    return run.finish([saved], {"baseline": result.resumed_from}, started)


# ---------------------------------------------------------------------------------------------
# train-transfer


@_decode_errors_name_the_split
def train_transfer(
    cfg: TrainConfig,
    split_dir: Path,
    models_dir: Path,
    features_dir: Path,
    live_dir: Path,
    augmented_dir: Path | None = None,
    section: TransferSection = "transfer",
) -> TrainSummary:
    """Transfer learning with ``train.<section>`` (``transfer`` or ``compare``); saves
    ``models/<section>_features.keras`` (phase 1) and ``models/<section>_finetuned.keras``
    (phase 2), each with a sidecar JSON recording backbone, weights and their provenance.

    Returns a TrainSummary. Raises StageError for a missing/invalid split CSV or image file and
    for a missing or mismatched weights file (naming ``train.transfer.weights``).
    """
    started = time.monotonic()
    settings = _settings(cfg, section)
    cfg = _as_transfer(cfg, section)
    tcfg = cfg.transfer
    models.configure(cfg.seed, cfg.fit.mixed_precision)
    data = _read_data(cfg, split_dir, augmented_dir)
    base = models.build_base(tcfg.backbone, cfg.fit.image_size, tcfg.weights)
    backup = models_dir / BACKUP_DIR_NAME / section
    resuming = _resume_backup(backup, cfg, data, "transfer")
    live = open_live(live_dir, resuming)
    run = _Run(cfg, "transfer", data, models_dir, backup, live, settings)
    augment = _augment_fn(cfg, tcfg.augment)
    val_images = _val_images(cfg, data)
    provenance = models.weights_provenance(tcfg.weights, tcfg.backbone)
    described = {"backbone": tcfg.backbone, **provenance}

    # 1. Freeze the base and fit a new head on top of it.
    model, phase1 = _fit_head(run, base, augment, val_images, features_dir)
    extra = {**described, "phase": 1, "feature_mode": tcfg.feature_mode}
    saved = [run.save(f"{section}_features", phase1, extra)]
    # 2. Unfreeze the last block and fine-tune the whole model at a low learning rate.
    model = model if model is not None else phase1.load()
    unfrozen = models.unfreeze(model.get_layer(tcfg.backbone), tcfg.unfreeze)
    phase2 = phase1
    if tcfg.fine_tune_epochs > 0:
        phase2 = _fine_tune(run, model, augment, val_images, step_offset=phase1.epochs)
    extra = {**described, "phase": 2, "unfrozen_layers": unfrozen}
    extra["fine_tune_epochs"] = tcfg.fine_tune_epochs
    saved.append(run.save(f"{section}_finetuned", phase2, extra))

    resumed = {"phase1": phase1.resumed_from} if phase1.resumed_from >= 0 else {}
    if tcfg.fine_tune_epochs > 0:
        resumed["phase2"] = phase2.resumed_from
    return run.finish(saved, resumed, started)


def _as_transfer(cfg: TrainConfig, section: TransferSection) -> TrainConfig:
    """``cfg`` with ``train.<section>`` as its transfer settings and that model's input size as
    ``train.fit.image_size``, so every phase below reads one place."""
    tcfg = cfg.compare if section == "compare" else cfg.transfer
    fit = cfg.fit.model_copy(update={"image_size": tcfg.input_size(cfg.fit)})
    return cfg.model_copy(update={"transfer": tcfg, "fit": fit})


def _fit_head(
    run: _Run,
    base: keras.Model,
    augment: Augment | None,
    val_images: tf.data.Dataset,
    features_dir: Path,
) -> tuple[keras.Model | None, PhaseResult]:
    """Phase 1: a dense head on the frozen base, in ``train.transfer.feature_mode``.

    The finished phase is kept in the backup folder until the stage succeeds, so a run killed
    in phase 2 does not redo it. Returns the model to fine-tune, or None where phase 2 starts
    from the saved checkpoint (``result.load()``), and the phase's result.
    """
    done = run.backup / "phase1_done.keras"
    done_metrics = run.backup / "phase1_done.json"
    if done.is_file() and done_metrics.is_file():
        print(f"phase 1 already finished; reusing {done}")
        return None, PhaseResult(done, resumed_from=-1, **json.loads(done_metrics.read_text()))
    model: keras.Model | None
    if run.cfg.transfer.feature_mode == "fast":
        model, result = _fit_head_on_features(run, base, features_dir)
        with atomic_path(done) as tmp:
            model.save(tmp)
    else:
        # Phase 2 starts from the best epoch's checkpoint, not from the last epoch's weights.
        model, result = None, _fit_head_through_base(run, base, augment, val_images)
        with atomic_path(done) as tmp:
            shutil.copyfile(result.checkpoint, tmp)
    atomic_write_json(done_metrics, result.metrics())
    return model, dataclasses.replace(result, checkpoint=done)


def _fit_head_on_features(
    run: _Run, base: keras.Model, features_dir: Path
) -> tuple[keras.Model, PhaseResult]:
    """ "fast": run the frozen base once over train and val (cached), fit the head on the
    features (no augmentation). Returns pixels → base → best head, and the phase's result."""
    cfg, tcfg, data = run.cfg, run.cfg.transfer, run.data
    extractor = models.feature_extractor(cfg.fit.image_size, base)
    train_x, train_y = cached_features(
        extractor, data.train, data.class_names, cfg, features_dir, "train"
    )
    val_x, val_y = cached_features(extractor, data.val, data.class_names, cfg, features_dir, "val")
    head = models.build_feature_head(
        train_x.shape[1:],
        len(data.class_names),
        tcfg.dense_units,
        tcfg.dropout,
        feature_std=feature_std(train_x),
    )
    compile_model(head, tcfg.learning_rate, cfg.fit)
    result = run.fit(
        head,
        feature_batches(train_x, train_y, cfg),
        features_dataset(val_x, val_y, cfg),
        epochs=tcfg.feature_epochs,
        phase=1,
    )
    return models.build_transfer(cfg.fit.image_size, base, result.load()), result


def _fit_head_through_base(
    run: _Run, base: keras.Model, augment: Augment | None, val_images: tf.data.Dataset
) -> PhaseResult:
    """ "augmented": the frozen base inside the model, fitting the head on augmented images."""
    cfg, tcfg, data = run.cfg, run.cfg.transfer, run.data
    # The head's feature scale from one pass over (at most) 256 unaugmented train images.
    sample = dataclasses.replace(
        data.train,
        paths=data.train.paths[:256],
        labels=data.train.labels[:256],
        groups=data.train.groups[:256],
    )
    sample_x = models.feature_extractor(cfg.fit.image_size, base).predict(
        make_dataset(sample, data.class_names, cfg.fit.image_size, cfg.fit.batch_size, cache=False),
        verbose=0,
    )
    head = models.build_feature_head(
        base.output.shape[1:],
        len(data.class_names),
        tcfg.dense_units,
        tcfg.dropout,
        feature_std=feature_std(sample_x),
    )
    full = models.build_transfer(cfg.fit.image_size, base, head)
    compile_model(full, tcfg.learning_rate, cfg.fit)
    train_images = _train_images(cfg, data, augment, cfg.seed)
    return run.fit(full, train_images, val_images, epochs=tcfg.feature_epochs, phase=1)


def _fine_tune(
    run: _Run,
    model: keras.Model,
    augment: Augment | None,
    val_images: tf.data.Dataset,
    step_offset: int,
) -> PhaseResult:
    """Phase 2: fit the partly unfrozen model at ``fine_tune_lr``; its curves follow phase 1's."""
    cfg, tcfg = run.cfg, run.cfg.transfer
    compile_model(model, tcfg.fine_tune_lr, cfg.fit)
    # Seed + 1: a shuffle order of its own rather than a replay of phase 1's.
    train_images = _train_images(cfg, run.data, augment, cfg.seed + 1)
    return run.fit(
        model,
        train_images,
        val_images,
        epochs=tcfg.fine_tune_epochs,
        phase=2,
        step_offset=step_offset,
    )
