"""Run each exported format the way a client would, for the export check, tests and benches.

Consumes the files ``pipeline.export.formats`` writes (``saved_model/``, ``model_*.tflite``,
``model.onnx``) and float32 pixel batches ``[N, S, S, 3]`` (0–255, decoded as training does) or,
for the SavedModel's ``serving_default``, encoded image bytes. Produces class probabilities
``[N, C]`` as float32 numpy arrays. Writes nothing.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

Predict = Callable[[np.ndarray], np.ndarray]


class TFLiteModel:
    """A .tflite file (or its bytes, before it is written) run with TensorFlow's interpreter
    through its one signature."""

    def __init__(self, model: Path | bytes, threads: int | None = None) -> None:
        import tensorflow as tf

        source = (
            {"model_content": model} if isinstance(model, bytes) else {"model_path": str(model)}
        )
        with warnings.catch_warnings():  # tf.lite.Interpreter warns it moves to ai_edge_litert
            warnings.simplefilter("ignore")
            self.interpreter = tf.lite.Interpreter(**source, num_threads=threads)
        self.runner = self.interpreter.get_signature_runner()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Probabilities for a batch, one image per invocation (the edge-device case)."""
        rows = [
            self.runner(images=np.ascontiguousarray(image[None], np.float32))["probabilities"]
            for image in images
        ]
        return np.concatenate(rows).astype(np.float32)


class OnnxModel:
    """A .onnx file run with onnxruntime's CPU provider."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, images: np.ndarray) -> np.ndarray:
        out = self.session.run(["probabilities"], {"images": images.astype(np.float32)})
        return np.asarray(out[0], dtype=np.float32)


class SavedModelBytes:
    """The SavedModel's ``serving_default`` signature: encoded image bytes in, probabilities
    out (decode and resize happen inside the graph)."""

    def __init__(self, path: Path) -> None:
        import tensorflow as tf

        self.loaded = tf.saved_model.load(str(path))
        self.signature = self.loaded.signatures["serving_default"]

    def outputs(self, encoded: Sequence[bytes]) -> dict[str, np.ndarray]:
        import tensorflow as tf

        result = self.signature(image_bytes=tf.constant(list(encoded), dtype=tf.string))
        return {name: value.numpy() for name, value in result.items()}

    def __call__(self, encoded: Sequence[bytes]) -> np.ndarray:
        return self.outputs(encoded)["probabilities"].astype(np.float32)


def keras_predict(model: Any, batch_size: int | None = None) -> Predict:
    """The Keras model as a pixels → probabilities function (no Keras progress bar); with
    ``batch_size``, it calls the model on that many images at a time."""

    def predict(images: np.ndarray) -> np.ndarray:
        images = images.astype(np.float32)
        if batch_size is None or len(images) <= batch_size:
            return np.asarray(model(images, training=False), dtype=np.float32)
        batches = range(0, len(images), batch_size)
        return np.concatenate(
            [np.asarray(model(images[i : i + batch_size], training=False)) for i in batches]
        ).astype(np.float32)

    return predict


# Keras' top two classes closer than this (a probability difference) are a tie: a float16 or
# int8 model picking the other one is rounding, not a broken conversion.
TIE = 0.01


@dataclass(frozen=True)
class Parity:
    """How closely one format's probabilities follow the Keras model's on the same images."""

    images: int
    top1_agreement: float  # fraction of images with the same most probable class
    max_abs_diff: float  # largest probability difference over images and classes
    decisive_agreement: float  # the same, counting Keras near-ties (< TIE apart) as agreeing

    def as_dict(self) -> dict[str, float | int]:
        return {
            "images": self.images,
            "top1_agreement": round(self.top1_agreement, 6),
            "decisive_agreement": round(self.decisive_agreement, 6),
            "max_abs_diff": float(f"{self.max_abs_diff:.3g}"),
        }


def parity(reference: np.ndarray, candidate: np.ndarray) -> Parity:
    """Compare two probability arrays of the same shape ``[N, C]``."""
    if reference.shape != candidate.shape:
        raise ValueError(f"shapes differ: {reference.shape} vs {candidate.shape}")
    if not reference.size:
        return Parity(0, 1.0, 0.0, 1.0)
    rows = np.arange(len(reference))
    ours, theirs = reference.argmax(axis=1), candidate.argmax(axis=1)
    same = ours == theirs
    tie = reference[rows, ours] - reference[rows, theirs] < TIE
    diff = float(np.max(np.abs(reference - candidate)))
    return Parity(len(reference), float(np.mean(same)), diff, float(np.mean(same | tie)))
