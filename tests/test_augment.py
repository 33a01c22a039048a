"""Augment stage: the albumentations transform, its tf.data wrapper, preview and offline copies."""

from __future__ import annotations

import json
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from pipeline.augment import augment, build_transform, make_tf_augment
from pipeline.config import AugmentConfig, PreviewConfig, SplitConfig, StageError, TransformsConfig
from pipeline.files import read_csv, write_jsonl
from pipeline.split import split

IDENTITY = {
    "rotation_range": 0,
    "width_shift_range": 0,
    "height_shift_range": 0,
    "shear_range": 0,
    "zoom_range": 0,
    "horizontal_flip": False,
    "brightness_range": 0,
    "contrast_range": 0,
}


def knobs(**transforms: object) -> AugmentConfig:
    return AugmentConfig(transforms=TransformsConfig(**transforms))


def offline(copies: int) -> AugmentConfig:
    # A one-cell preview: these tests are about the copies, and the grid is drawn every run.
    return AugmentConfig(mode="offline", copies=copies, preview=PreviewConfig(images=1, variants=1))


def random_images(count: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


@pytest.fixture
def split_dir(tmp_path: Path) -> Path:
    """A real clean folder (2 classes × 10 tiny PNGs) split 60/20/20 by the split stage."""
    clean = tmp_path / "clean"
    rows = []
    for label in ("cat", "dog"):
        (clean / label).mkdir(parents=True)
        for i, pixels in enumerate(random_images(10, seed=len(label) + ord(label[0]))):
            path = f"{label}/{label}{i}.png"
            Image.fromarray(pixels).save(clean / path)
            rows.append({"path": path, "class": label, "group": f"{label}{i}"})
    write_jsonl(clean / "manifest.jsonl", rows)
    split(SplitConfig(), clean, tmp_path / "split", tmp_path / "split_report.json")
    return tmp_path / "split"


def run_dataset(fn, images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)
    ds = ds.map(lambda x, y: (fn(x), y), num_parallel_calls=4, deterministic=True)
    batches = list(ds.as_numpy_iterator())
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


def test_transform_keeps_shape_and_dtype_and_changes_pixels() -> None:
    image = random_images(1, size=48)[0]

    out = build_transform(knobs(crop_p=1.0), 48)(image=image)["image"]

    assert out.shape == (48, 48, 3)
    assert out.dtype == np.uint8
    assert not np.array_equal(out, image)


def test_all_knobs_off_leave_images_unchanged() -> None:
    image = random_images(1)[0]

    out = build_transform(knobs(**IDENTITY), 32)(image=image)["image"]

    assert np.array_equal(out, image)


def test_a_knob_with_probability_zero_never_fires() -> None:
    image = random_images(1)[0]
    cfg = knobs(**{**IDENTITY, "rotation_range": 90}, rotation_p=0.0)

    out = build_transform(cfg, 32)(image=image)["image"]

    assert np.array_equal(out, image)


def test_knobs_sharing_a_probability_are_one_warp() -> None:
    def warps(cfg: AugmentConfig) -> int:
        return sum(isinstance(t, A.Affine) for t in build_transform(cfg, 32).transforms)

    assert warps(AugmentConfig()) == 1
    assert warps(knobs(zoom_p=0.5)) == 2


def test_tf_augment_in_dataset_keeps_shape_dtype_and_labels() -> None:
    images, labels = random_images(24), np.arange(24)

    out, out_labels = run_dataset(make_tf_augment(AugmentConfig(), 32), images, labels)

    assert out.shape == images.shape
    assert out.dtype == np.uint8
    assert np.array_equal(out_labels, labels)
    assert not np.array_equal(out, images)


def test_tf_augment_pairs_each_image_with_its_own_label() -> None:
    # Flat grey levels survive flips and warps with nearest fill; the level encodes the label.
    levels = np.arange(0, 240, 10, dtype=np.uint8)
    images = np.broadcast_to(levels[:, None, None, None], (24, 32, 32, 3)).copy()
    cfg = knobs(brightness_contrast_p=0.0)

    out, labels = run_dataset(make_tf_augment(cfg, 32), images, np.arange(24))

    assert np.array_equal(out[:, 16, 16, 0], levels[labels])


def test_tf_augment_is_reproducible_with_the_same_seed_under_parallel_map() -> None:
    images, labels = random_images(32), np.arange(32)

    first, _ = run_dataset(make_tf_augment(AugmentConfig(seed=7), 32), images, labels)
    second, _ = run_dataset(make_tf_augment(AugmentConfig(seed=7), 32), images, labels)
    other, _ = run_dataset(make_tf_augment(AugmentConfig(seed=8), 32), images, labels)

    assert np.array_equal(first, second)
    assert not np.array_equal(first, other)


def test_tf_augment_gives_new_variants_every_epoch() -> None:
    images, labels = random_images(8), np.arange(8)
    fn = make_tf_augment(AugmentConfig(), 32)

    epoch1, _ = run_dataset(fn, images, labels)
    epoch2, _ = run_dataset(fn, images, labels)

    assert not np.array_equal(epoch1, epoch2)


def test_copies_made_from_many_threads_at_once_match_copies_made_one_by_one() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.augment import _augmented_copy

    cfg = AugmentConfig()
    images = random_images(16)
    jobs = [(image, f"img{i}.png", copy) for i, image in enumerate(images) for copy in range(4)]

    one_by_one = [_augmented_copy(cfg, *job) for job in jobs]
    with ThreadPoolExecutor(max_workers=8) as pool:
        at_once = list(pool.map(lambda job: _augmented_copy(cfg, *job), jobs * 4))

    assert all(np.array_equal(a, b) for a, b in zip(one_by_one * 4, at_once, strict=True))


def test_tf_augment_rejects_images_already_rescaled_to_float() -> None:
    fn = make_tf_augment(AugmentConfig(), 32)

    with pytest.raises(TypeError, match="expects uint8"):
        fn(tf.zeros((2, 32, 32, 3), tf.float32))


def test_augment_writes_the_preview_grid(tmp_path: Path, split_dir: Path) -> None:
    preview = tmp_path / "reports" / "augment_preview.png"
    cfg = AugmentConfig(preview=PreviewConfig(images=2, variants=5))

    augment(cfg, split_dir, tmp_path / "augmented", preview)

    with Image.open(preview) as image:
        assert image.format == "PNG"
        assert image.width > 2 * image.height  # 2 rows × (1 original + 5 variants)


def test_offline_mode_writes_copies_of_training_images_only(
    tmp_path: Path, split_dir: Path
) -> None:
    out = tmp_path / "augmented"
    cfg = offline(copies=3)

    summary = augment(cfg, split_dir, out, tmp_path / "preview.png")

    manifest = read_csv(out / "manifest.csv")
    train = {
        (split_dir / r["path"]).resolve(): r["class"] for r in read_csv(split_dir / "train.csv")
    }
    sources = [(out / row["source"]).resolve() for row in manifest]
    assert summary.copies_written == len(manifest) == 3 * len(train) == 36
    assert set(sources) == set(train)  # no val/test image is augmented
    assert all(row["class"] == train[source] for row, source in zip(manifest, sources, strict=True))
    assert all(Path(row["path"]).parent.name == row["class"] for row in manifest)
    assert all((out / row["path"]).is_file() for row in manifest)
    assert len(read_csv(out / "train.csv")) == 12 + 36


def test_offline_copies_are_identical_with_the_same_seed(tmp_path: Path, split_dir: Path) -> None:
    cfg = offline(copies=2)
    augment(cfg, split_dir, tmp_path / "a", tmp_path / "a.png")
    augment(cfg, split_dir, tmp_path / "b", tmp_path / "b.png")

    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))

    assert files
    assert all(
        (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files
    )


def test_offline_rerun_after_a_kill_keeps_the_copies_already_written(
    tmp_path: Path, split_dir: Path
) -> None:
    out = tmp_path / "augmented"
    cfg = offline(copies=2)
    augment(cfg, split_dir, out, tmp_path / "preview.png")
    lost = sorted((out / "images").rglob("*.png"))[:5]
    for path in lost:  # as if killed before these were written
        path.unlink()
    (out / "manifest.csv").unlink()

    summary = augment(cfg, split_dir, out, tmp_path / "preview.png")

    assert (summary.copies_written, summary.copies_reused) == (5, 19)
    assert len(read_csv(out / "manifest.csv")) == 24


def test_changed_params_replace_offline_copies(tmp_path: Path, split_dir: Path) -> None:
    out = tmp_path / "augmented"
    augment(offline(copies=2), split_dir, out, tmp_path / "p.png")

    summary = augment(offline(copies=1), split_dir, out, tmp_path / "p.png")

    assert (summary.copies_written, summary.copies_reused) == (12, 0)
    assert len(list((out / "images").rglob("*.png"))) == 12
    assert json.loads((out / "params.json").read_text())["made_from"]["copies"] == 1


def test_on_the_fly_mode_clears_earlier_offline_copies(tmp_path: Path, split_dir: Path) -> None:
    out = tmp_path / "augmented"
    augment(offline(copies=1), split_dir, out, tmp_path / "p.png")

    augment(AugmentConfig(preview=PreviewConfig(images=1)), split_dir, out, tmp_path / "p.png")

    assert not (out / "images").exists()
    assert read_csv(out / "manifest.csv") == []


def test_missing_train_csv_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StageError, match=r"train.csv: not found; run the split stage first"):
        augment(AugmentConfig(), tmp_path / "split", tmp_path / "out", tmp_path / "p.png")
