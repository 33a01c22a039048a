"""Model architectures and VGG16 weight loading (no training here)."""

from __future__ import annotations

from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

from pipeline import models
from pipeline.config import StageError


def test_baseline_is_dlwp_exactly_at_180_px() -> None:
    model = models.build_baseline(180, num_classes=2)

    flatten = next(layer for layer in model.layers if isinstance(layer, keras.layers.Flatten))
    assert flatten.output.shape == (None, 7 * 7 * 256)
    assert sum(isinstance(layer, keras.layers.MaxPooling2D) for layer in model.layers) == 4


@pytest.mark.parametrize("image_size", [32, 48, 64])
def test_baseline_builds_and_predicts_at_small_sizes(image_size: int) -> None:
    model = models.build_baseline(image_size, num_classes=3)

    probabilities = model.predict(np.zeros((2, image_size, image_size, 3), np.float32), verbose=0)

    assert probabilities.shape == (2, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_hed_weights_fill_every_vgg16_conv_layer() -> None:
    base = models.build_vgg16_base(32, "hed-bsds500")

    with h5py.File(models.hed_weights_path(), "r") as h5:
        for name in models.VGG16_CONV_LAYERS:
            block, conv = name.split("_")
            suffix = {"conv1": "", "conv2": "_1", "conv3": "_2"}[conv]
            kernel, bias = base.get_layer(name).get_weights()
            np.testing.assert_array_equal(kernel, h5[f"{block}/layers/conv2d{suffix}/vars/0"][()])
            np.testing.assert_array_equal(bias, h5[f"{block}/layers/conv2d{suffix}/vars/1"][()])
    assert len(models.VGG16_CONV_LAYERS) == 13


def test_hed_weights_file_given_as_a_path_loads_the_same_weights() -> None:
    by_name = models.build_vgg16_base(32, "hed-bsds500")

    by_path = models.build_vgg16_base(32, str(models.hed_weights_path()))

    for a, b in zip(by_name.get_weights(), by_path.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_missing_weights_file_error_names_the_params_key(tmp_path: Path) -> None:
    with pytest.raises(StageError, match=r"train\.transfer\.weights: weights file not found"):
        models.build_vgg16_base(32, str(tmp_path / "vgg16.h5"))


def test_weights_file_of_another_model_error_names_the_params_key(tmp_path: Path) -> None:
    other = tmp_path / "baseline.weights.h5"
    models.build_baseline(32, 3).save_weights(other)

    with pytest.raises(StageError, match=r"train\.transfer\.weights: .* does not fit VGG16"):
        models.build_vgg16_base(32, str(other))


def test_hed_layout_file_with_wrong_shapes_error_names_the_layer(tmp_path: Path) -> None:
    broken = tmp_path / "broken.weights.h5"
    with h5py.File(models.hed_weights_path(), "r") as src, h5py.File(broken, "w") as dst:
        for key in src:
            src.copy(key, dst)
        del dst["block3/layers/conv2d_1/vars/0"]
        dst["block3/layers/conv2d_1/vars/0"] = np.zeros((3, 3, 256, 128), np.float32)

    with pytest.raises(StageError, match=r"train\.transfer\.weights: .*block3_conv2"):
        models.build_vgg16_base(32, str(broken))


def test_vgg16_preprocess_layer_matches_keras_preprocess_input() -> None:
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)

    ours = models.vgg16_preprocess_layer()(pixels)

    expected = keras.applications.vgg16.preprocess_input(pixels.copy())
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-4)


def test_unfreeze_block5_leaves_earlier_conv_layers_frozen() -> None:
    base = models.build_vgg16_base(32, "none")

    unfrozen = models.unfreeze(base, "block5")

    assert unfrozen == ["block5_conv1", "block5_conv2", "block5_conv3"]
    trainable = {layer.name for layer in base.layers if layer.trainable and layer.weights}
    assert trainable == set(unfrozen)


def test_unfreeze_last_k_counts_conv_layers_across_blocks() -> None:
    base = models.build_vgg16_base(32, "none")

    unfrozen = models.unfreeze(base, "4")

    assert unfrozen == ["block4_conv3", "block5_conv1", "block5_conv2", "block5_conv3"]
