"""Classify images with a trained model: what ``python -m pipeline predict`` prints, as data.

Consumes ``models/<name>.keras`` with its sidecar ``models/<name>.json`` (class_names, image_size)
and image files or folders (searched recursively for png/jpg/jpeg/gif/bmp/webp files). Produces a
``PredictionReport``: the top classes with probabilities per readable image, and an error per
input that could not be read. Writes nothing and prints nothing; the CLI does that.

Images are decoded and resized exactly as training and the evaluate stage do
(``pipeline.dataset.load_images``), so a test image gets the probabilities evaluate recorded for it.
The evaluate stage loads its models through ``load_model`` here too.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import StageError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp"})


class ModelLoadError(StageError):
    """The model cannot be loaded: its .keras file or sidecar is missing, unreadable or invalid.

    The message names the file.
    """


class ModelNotFoundError(ModelLoadError):
    """There is no ``<name>.keras`` in the models folder (its training stage has not run)."""


@dataclass
class LoadedModel:
    """A trained Keras model with what its sidecar json says about it."""

    name: str
    model: Any  # keras.Model; typed loosely so importing this module does not import TensorFlow
    class_names: list[str]
    image_size: int
    sidecar: dict[str, Any]


def _read_sidecar(sidecar_path: Path) -> dict[str, Any]:
    try:
        sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(
            f"{sidecar_path}: sidecar missing; it holds the class order the model was trained "
            "with (rerun the training stage)"
        ) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{sidecar_path}: unreadable sidecar: {exc}") from None
    class_names = sidecar.get("class_names") if isinstance(sidecar, dict) else None
    if not isinstance(class_names, list) or len(class_names) < 2:
        raise ModelLoadError(f"{sidecar_path}: 'class_names' must list at least 2 classes")
    return sidecar


def load_model(models_dir: Path, name: str, fallback_image_size: int = 64) -> LoadedModel:
    """Load ``models_dir/<name>.keras`` and its sidecar ``<name>.json``.

    ``fallback_image_size`` is used only when the sidecar lacks ``image_size``. Raises
    ModelNotFoundError if the .keras file is missing, ModelLoadError if the sidecar is missing
    or invalid or the model file cannot be loaded.
    """
    keras_path = models_dir / f"{name}.keras"
    if not keras_path.is_file():
        raise ModelNotFoundError(f"{keras_path}: no such model file")
    sidecar = _read_sidecar(models_dir / f"{name}.json")
    import keras

    try:
        model = keras.models.load_model(keras_path, compile=False)
    except Exception as exc:  # Keras raises many types for a damaged or foreign file
        raise ModelLoadError(f"{keras_path}: cannot load model: {exc}") from None
    return LoadedModel(
        name=name,
        model=model,
        class_names=[str(c) for c in sidecar["class_names"]],
        image_size=int(sidecar.get("image_size") or fallback_image_size),
        sidecar=sidecar,
    )


def load_image(path: Path, image_size: int) -> np.ndarray:
    """Decode one image file exactly as training does (``pipeline.dataset``).

    Returns float32 RGB pixels in 0–255, shape (image_size, image_size, 3); the models rescale
    inside themselves. Raises StageError naming the file if it is missing or not an image.
    """
    import tensorflow as tf

    from pipeline.dataset import load_images

    try:
        return load_images([path], image_size)[0]
    except tf.errors.OpError as exc:  # unreadable for another reason: permissions, a folder
        raise StageError(f"{path}: cannot read: {exc.message.splitlines()[0]}") from None


def as_probabilities(raw: np.ndarray, n_classes: int) -> np.ndarray:
    """The softmax outputs of our models as float64 rows summing exactly to 1.

    Raises StageError when the output is not one probability per class.
    """
    raw = np.asarray(raw, dtype=np.float64)
    if raw.ndim != 2 or raw.shape[1] != n_classes:
        raise StageError(f"model outputs shape {raw.shape}, expected (N, {n_classes})")
    return raw / raw.sum(axis=1)[:, None]


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def class_probabilities(
    loaded: LoadedModel, images: Sequence[np.ndarray], batch_size: int = 64
) -> np.ndarray:
    """Return class probabilities, shape (len(images), n_classes), in sidecar class order."""
    n_classes = len(loaded.class_names)
    if not images:
        return np.zeros((0, n_classes))
    outputs = [
        np.asarray(loaded.model(np.stack(batch), training=False))
        for batch in _batches(images, batch_size)
    ]
    return as_probabilities(np.concatenate(outputs), n_classes)


@dataclass(frozen=True)
class ClassProbability:
    class_name: str
    probability: float


@dataclass(frozen=True)
class ImagePrediction:
    """One classified image: its classes, most probable first."""

    path: Path
    top: tuple[ClassProbability, ...]


@dataclass(frozen=True)
class ImageError:
    """An input that was not classified, and why (``not an image``, ``no such file or folder``)."""

    path: Path
    message: str


@dataclass(frozen=True)
class PredictionReport:
    """``predict_images``' result: predictions in input order, then the inputs that failed."""

    model: str
    class_names: tuple[str, ...]
    predictions: tuple[ImagePrediction, ...]
    errors: tuple[ImageError, ...]

    @property
    def complete(self) -> bool:
        """True when every input was classified."""
        return not self.errors


def expand_inputs(inputs: Sequence[Path]) -> tuple[list[Path], list[ImageError]]:
    """Image files named by ``inputs``: files as given, folders searched recursively (sorted).

    Returns (files, errors for missing inputs and folders without images).
    """
    files: list[Path] = []
    errors: list[ImageError] = []
    for item in inputs:
        if item.is_dir():
            found = sorted(
                p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                errors.append(ImageError(item, "no image files in this folder"))
            files.extend(found)
        elif item.exists():
            files.append(item)
        else:
            errors.append(ImageError(item, "no such file or folder"))
    return files, errors


def _load_model_naming_alternatives(models_dir: Path, model_name: str) -> LoadedModel:
    try:
        return load_model(models_dir, model_name)
    except ModelLoadError as exc:
        available = sorted(p.stem for p in Path(models_dir).glob("*.keras"))
        hint = f" (available: {', '.join(available)})" if available else ""
        raise type(exc)(f"{exc}{hint}") from None


def predict_images(
    models_dir: Path,
    model_name: str,
    images: Sequence[Path],
    top_k: int = 3,
    batch_size: int = 64,
    *,
    progress: bool = False,
) -> PredictionReport:
    """Classify image files (and the images in folders) with ``models_dir/<model_name>.keras``.

    Each prediction lists the ``top_k`` most probable classes (all of them when there are
    fewer). An unreadable or missing input becomes an ImageError; the others are still
    classified. ``progress`` shows a progress bar on stderr for 100 images or more.

    Returns a PredictionReport. Raises ValueError if ``top_k`` or ``batch_size`` is below 1,
    ModelLoadError (ModelNotFoundError for a missing file) naming the file and the models that
    do exist in ``models_dir``.
    """
    if top_k < 1:
        raise ValueError("top_k must be at least 1")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    from tqdm import tqdm

    loaded = _load_model_naming_alternatives(Path(models_dir), model_name)
    files, errors = expand_inputs([Path(p) for p in images])
    pixels: list[np.ndarray] = []
    readable: list[Path] = []
    shown = progress and len(files) >= 100
    for path in tqdm(files, desc="load", unit="img", file=sys.stderr, disable=not shown):
        try:
            pixels.append(load_image(path, loaded.image_size))
            readable.append(path)
        except StageError as exc:
            errors.append(ImageError(path, str(exc).removeprefix(f"{path}: ")))
    proba = class_probabilities(loaded, pixels, batch_size)
    top = min(top_k, len(loaded.class_names))
    predictions = tuple(
        ImagePrediction(
            path,
            tuple(
                ClassProbability(loaded.class_names[i], float(p[i])) for i in np.argsort(-p)[:top]
            ),
        )
        for path, p in zip(readable, proba, strict=True)
    )
    return PredictionReport(loaded.name, tuple(loaded.class_names), predictions, tuple(errors))
