"""The model behind the app: uploaded bytes → checked, decoded pixels → class probabilities.

Consumes a model chosen like the export stage's (``serve.model``: best, a name or models/best;
``pipeline.export.select``) and loaded with ``pipeline.predict.load_model``, and encoded images
as bytes. Produces probabilities in the sidecar's class order, decoding exactly as training does
(``pipeline.dataset.decode_and_resize``), so the app agrees with ``python -m pipeline predict``
and the evaluate stage. Writes nothing.

An upload that is not an image we can decode, or is larger than ``serve.max_image_pixels``,
raises ``ImageRejected`` with the HTTP status and a message naming the file; the size is read
from the header before anything is decoded.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.export.select import ChosenModel, choose_model

FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP")  # what both Pillow and tf.io.decode_image read


class ImageRejected(ValueError):
    """An upload the app will not classify; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Classifier:
    """A loaded model with compiled decode and inference functions; thread-safe."""

    chosen: ChosenModel
    loaded: Any  # pipeline.predict.LoadedModel
    max_image_pixels: int = 50_000_000
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        import tensorflow as tf

        from pipeline.dataset import decode_and_resize

        size = self.loaded.image_size
        model = self.loaded.model
        self._decode = tf.function(
            lambda data: decode_and_resize(data, size),
            input_signature=[tf.TensorSpec([], tf.string)],
        )
        self._infer = tf.function(
            lambda images: model(images, training=False),
            input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)],
        )

    @property
    def name(self) -> str:
        return self.chosen.name

    @property
    def class_names(self) -> list[str]:
        return list(self.loaded.class_names)

    def check(self, filename: str, data: bytes) -> None:
        """Raise ImageRejected unless ``data`` is a supported image within the pixel limit."""
        from PIL import Image, UnidentifiedImageError

        if not data:
            raise ImageRejected(400, f"{filename}: empty file")
        try:
            with Image.open(io.BytesIO(data)) as image:
                kind, (width, height) = image.format, image.size
        except (UnidentifiedImageError, OSError, ValueError):
            raise ImageRejected(
                415, f"{filename}: not an image (send JPEG, PNG, GIF, BMP or WebP)"
            ) from None
        except Image.DecompressionBombError:
            kind, width, height = "image", self.max_image_pixels + 1, 1
        if kind not in FORMATS:
            raise ImageRejected(
                415,
                f"{filename}: {kind} images are not supported (send JPEG, PNG, GIF, BMP or WebP)",
            )
        if width * height > self.max_image_pixels:
            raise ImageRejected(
                413,
                f"{filename}: {width}×{height} = {width * height} pixels is over the "
                f"{self.max_image_pixels} allowed (serve.max_image_pixels)",
            )

    def decode(self, filename: str, data: bytes) -> np.ndarray:
        """Check and decode one upload: uint8 ``[S, S, 3]``. Raises ImageRejected."""
        import tensorflow as tf

        self.check(filename, data)
        try:
            return self._decode(tf.constant(data)).numpy()
        except tf.errors.InvalidArgumentError:
            raise ImageRejected(415, f"{filename}: the image data is damaged") from None

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities ``[N, C]`` for decoded images ``[N, S, S, 3]``."""
        with self._lock:
            out = self._infer(images.astype(np.float32))
        return np.asarray(out, dtype=np.float64)

    def top(self, probabilities: np.ndarray, k: int) -> list[list[dict[str, Any]]]:
        """Per image, the ``k`` most probable classes as ``{"class", "probability"}``."""
        names = self.class_names
        k = min(k, len(names))
        return [
            [{"class": names[i], "probability": float(row[i])} for i in np.argsort(-row)[:k]]
            for row in probabilities
        ]


def load_classifier(
    choice: str,
    models_dir: Path,
    metrics_dir: Path,
    metric: str = "accuracy",
    higher_is_better: bool = True,
    max_image_pixels: int = 50_000_000,
) -> Classifier:
    """Choose (``serve.model``) and load the model. Raises StageError naming the file."""
    from pipeline.predict import load_model

    chosen = choose_model(choice, models_dir, metrics_dir, metric, higher_is_better, key="serve")
    loaded = load_model(chosen.keras_path.parent, chosen.keras_path.stem)
    return Classifier(chosen, loaded, max_image_pixels)
