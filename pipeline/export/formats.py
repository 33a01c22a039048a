"""Writers for each export format, from one loaded Keras model that takes raw RGB pixels.

Consumes a ``keras.Model`` (input float32 ``[N, S, S, 3]`` pixels in 0–255; it rescales inside
itself) with its class names, and for int8 a representative batch of validation images.
Produces, in a folder the caller gives:

- ``saved_model/``: a TF SavedModel with two signatures. ``serving_default`` takes
  ``image_bytes`` (a batch of encoded JPEG/PNG/GIF/BMP images, tf.string ``[N]``) and decodes
  and resizes them exactly as training did (``pipeline.dataset.decode_and_resize``), returning
  ``classes`` (string ``[N, C]``, the class names) and ``probabilities`` (float32 ``[N, C]``), so
  a client (TF Serving, ``tf.saved_model.load``) needs none of our code. ``serve_pixels`` takes
  ``images`` (float32 pixels) like the Keras model.
- ``model_<variant>.tflite`` for float32, float16 (weights stored as float16) and int8 (integer
  post-training quantisation calibrated on the representative images; float32 input and output
  so clients feed the same pixels). Converted from the pixel signature. int8 may keep its first
  few weighted layers, and the ops before them, in float when that measurably brings it closer
  to the Keras model: a rounding error made there passes through every later layer.
- ``model.onnx`` via tf2onnx, input ``images``, output ``probabilities``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from pipeline.config import StageError
from pipeline.export.runtimes import TFLiteModel

SAVED_MODEL = "saved_model"
PIXEL_SIGNATURE = "serve_pixels"
ONNX_FILE = "model.onnx"
# TFLite ops that carry a weight tensor: export.int8_float_layers counts these.
WEIGHTED_OPS = frozenset({"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV"})
# Images the quantisation debugger runs to list the model's quantised ops in execution order.
DEBUG_IMAGES = 2
# int8 keeps the fewest leading float layers whose error is within this factor of the lowest
# tried: on the demo, MobileNetV2's mean KL falls 0.121 -> 0.012 with 3 float layers while the
# scratch CNN's and VGG16's vary by less than 1.4x (noise) with 0-6 (bench/RESULTS.md).
KL_TOLERANCE = 1.5


class TFLiteFile(NamedTuple):
    """A converted flatbuffer; for int8 with a float search, the ops kept in float
    (``{"op", "output"}``, in execution order) and each tried prefix's error."""

    data: bytes
    float_ops: list[dict[str, str]]
    tried: list[dict[str, float]]  # {"float_layers": n, "kl_divergence": mean KL vs Keras}


def tflite_file(variant: str) -> str:
    return f"model_{variant}.tflite"


def _pixel_spec(image_size: int) -> Any:
    import tensorflow as tf

    return tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name="images")


def write_saved_model(
    model: Any, class_names: Sequence[str], image_size: int, out_dir: Path
) -> Path:
    """Write the SavedModel with the ``serving_default`` (bytes) and ``serve_pixels``
    signatures into ``out_dir``. Returns ``out_dir``."""
    import tensorflow as tf

    from pipeline.dataset import decode_and_resize

    names = tf.constant(list(class_names))
    decoded = tf.TensorSpec([image_size, image_size, 3], tf.uint8)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve_bytes(image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
        images = tf.map_fn(
            lambda data: decode_and_resize(data, image_size),
            image_bytes,
            fn_output_signature=decoded,
        )
        probabilities = model(tf.cast(images, tf.float32), training=False)
        classes = tf.broadcast_to(names, tf.shape(probabilities))
        return {"classes": classes, "probabilities": probabilities}

    @tf.function(input_signature=[_pixel_spec(image_size)])
    def serve_pixels(images: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"probabilities": model(images, training=False)}

    # A plain tf.Module tracking the model saves each weight once (keras.export.ExportArchive
    # tracks them twice under Keras 3, doubling the folder).
    module = tf.Module()
    module.model = model
    module.serve_bytes, module.serve_pixels = serve_bytes, serve_pixels
    signatures = {"serving_default": serve_bytes, PIXEL_SIGNATURE: serve_pixels}
    tf.saved_model.save(module, str(out_dir), signatures=signatures)
    return out_dir


def write_tflite_source(model: Any, image_size: int, out_dir: Path) -> Path:
    """Write the pixel signature alone as a SavedModel for the TFLite converter.

    keras.export.ExportArchive, unlike a plain tf.Module, saves Keras 3 variables so that the
    converter can freeze them (from a tf.Module the int8 calibration fails on READ_VARIABLE).
    Returns ``out_dir``.
    """
    import keras

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        PIXEL_SIGNATURE,
        lambda images: {"probabilities": model(images, training=False)},
        input_signature=[_pixel_spec(image_size)],
    )
    archive.write_out(str(out_dir), verbose=False)
    return out_dir


def _converter(saved_model_dir: Path) -> Any:
    """A TFLite converter of ``write_tflite_source``'s pixel signature."""
    import tensorflow as tf

    return tf.lite.TFLiteConverter.from_saved_model(
        str(saved_model_dir), signature_keys=[PIXEL_SIGNATURE]
    )


def _int8_converter(saved_model_dir: Path, calibration: np.ndarray) -> Any:
    import tensorflow as tf

    converter = _converter(saved_model_dir)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([image[None]] for image in calibration)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter


def _kl_divergence(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean KL(reference || candidate) over images, in nats (computed in float64)."""
    p = np.clip(reference.astype(np.float64), 1e-8, 1)
    q = np.clip(candidate.astype(np.float64), 1e-8, 1)
    return float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1)))


def _float_prefixes(rows: list[dict[str, str]], most: int) -> list[list[dict[str, str]]]:
    """The op prefixes that end with the 0th, 1st … ``most``-th weighted op (fewer when the
    model has fewer weighted ops)."""
    prefixes: list[list[dict[str, str]]] = [[]]
    for index, row in enumerate(rows):
        if len(prefixes) > most:
            break
        if row["op_name"] in WEIGHTED_OPS:
            prefixes.append(
                [{"op": r["op_name"], "output": r["tensor_name"]} for r in rows[: index + 1]]
            )
    return prefixes


def _int8_with_float_prefix(
    converter: Any, calibration: np.ndarray, reference: np.ndarray, most: int
) -> TFLiteFile:
    """Quantise with the first 0 … ``most`` weighted layers (and the ops before them) kept in
    float, and keep the fewest that bring the mean KL divergence from the Keras probabilities
    ``reference`` on the calibration images within ``KL_TOLERANCE`` of the lowest tried. TF's
    quantisation debugger lists the ops in execution order and writes each candidate."""
    import tensorflow as tf

    sample = calibration[:DEBUG_IMAGES]
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=converter, debug_dataset=lambda: ([image[None]] for image in sample)
    )
    debugger.run()
    dump = io.StringIO()
    debugger.layer_statistics_dump(dump)
    candidates = []
    for prefix in _float_prefixes(list(csv.DictReader(io.StringIO(dump.getvalue()))), most):
        debugger.options = tf.lite.experimental.QuantizationDebugOptions(
            denylisted_nodes=[op["output"] for op in prefix]
        )
        data = bytes(debugger.get_nondebug_quantized_model())
        error = _kl_divergence(reference, TFLiteModel(data)(calibration))
        candidates.append((error, prefix, data))
    lowest = min(error for error, _, _ in candidates)
    _, prefix, data = next(c for c in candidates if c[0] <= KL_TOLERANCE * lowest)
    tried = [
        {"float_layers": n, "kl_divergence": float(f"{e:.3g}")}
        for n, (e, _, _) in enumerate(candidates)
    ]
    return TFLiteFile(data, prefix, tried)


def tflite_bytes(
    saved_model_dir: Path,
    variant: str,
    representative: np.ndarray | None = None,
    max_float_layers: int = 0,
    reference: np.ndarray | None = None,
) -> TFLiteFile:
    """Convert the ``serve_pixels`` signature of ``write_tflite_source``'s SavedModel to a
    TFLite flatbuffer.

    ``variant``: float32 (no optimisation), float16 (float16 weights, float compute) or int8
    (integer weights and activations, float32 input/output; needs ``representative``, float32
    pixels ``[N, S, S, 3]``). For int8, ``max_float_layers`` > 0 also tries keeping the first
    1 … that many weighted layers (conv, depthwise conv, dense) and the ops before them in
    float, and keeps the fewest that bring the output close to the Keras model's probabilities
    on the representative images, ``reference`` ``[N, C]`` (``_int8_with_float_prefix``); 0
    quantises every op. Raises StageError when int8 has no representative images.
    """
    import tensorflow as tf

    if variant == "int8":
        if representative is None or not len(representative):
            raise StageError("int8 TFLite needs representative images (data/split/val.csv)")
        calibration = representative.astype(np.float32)
        converter = _int8_converter(saved_model_dir, calibration)
        if not max_float_layers:
            return TFLiteFile(bytes(converter.convert()), [], [])
        if reference is None or reference.shape[0] != len(calibration):
            raise ValueError("int8 with max_float_layers needs the Keras probabilities of the "
                             "representative images")  # fmt: skip
        return _int8_with_float_prefix(converter, calibration, reference, max_float_layers)
    converter = _converter(saved_model_dir)
    if variant == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif variant != "float32":
        raise ValueError(f"unknown TFLite variant {variant!r} (export.tflite)")
    return TFLiteFile(bytes(converter.convert()), [], [])


def _rename_output(graph: Any, old: str, new: str) -> None:
    for node in graph.node:
        node.output[:] = [new if name == old else name for name in node.output]
        node.input[:] = [new if name == old else name for name in node.input]
    for output in graph.output:
        if output.name == old:
            output.name = new


def onnx_bytes(model: Any, image_size: int, opset: int) -> bytes:
    """Convert the Keras model to ONNX with tf2onnx: input ``images`` (float32 pixels
    ``[N, S, S, 3]``), output ``probabilities``.

    Raises StageError naming ``export.onnx`` when tf2onnx is not installed or cannot convert.
    """
    import tensorflow as tf

    try:
        import tf2onnx
    except ImportError as exc:
        raise StageError(
            f"export.onnx is true but tf2onnx cannot be imported ({exc}); install it "
            "(pip install tf2onnx onnxruntime) or set export.onnx: false"
        ) from None
    spec = [_pixel_spec(image_size)]
    function = tf.function(lambda images: model(images, training=False), input_signature=spec)
    try:
        proto, _ = tf2onnx.convert.from_function(function, input_signature=spec, opset=opset)
    except Exception as exc:  # tf2onnx raises bare Exceptions for unsupported ops
        raise StageError(
            f"export.onnx: tf2onnx {tf2onnx.__version__} could not convert the model: {exc} "
            "(set export.onnx: false to skip ONNX)"
        ) from None
    _rename_output(proto.graph, proto.graph.output[0].name, "probabilities")
    return bytes(proto.SerializeToString())
