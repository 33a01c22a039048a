"""tf.data input pipeline from the split CSVs (pipeline/dataset.py)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import StageError
from pipeline.dataset import load_images, load_split, make_dataset


def _write_images_and_csv(root: Path, rows: list[tuple[str, str]]) -> Path:
    """data/clean/<class>/<name>.png (grey 40×30, each a different shade) + data/split/train.csv."""
    split_dir = root / "data" / "split"
    split_dir.mkdir(parents=True)
    for shade, (klass, name) in enumerate(rows):
        folder = root / "data" / "clean" / klass
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("L", (40, 30), color=20 * shade + 10).save(folder / name)
    with open(split_dir / "train.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "class", "group"])
        for klass, name in rows:
            writer.writerow([f"../clean/{klass}/{name}", klass, name])
    return split_dir / "train.csv"


ROWS = [
    ("shoe", "a.png"),
    ("boot", "b.png"),
    ("shoe", "c.png"),
    ("boot", "d.png"),
    ("bag", "e.png"),
]


def test_load_split_resolves_paths_against_the_csv_folder(tmp_path: Path) -> None:
    csv_path = _write_images_and_csv(tmp_path, ROWS)

    rows = load_split(csv_path)

    assert rows.paths[0].resolve() == (tmp_path / "data" / "clean" / "shoe" / "a.png").resolve()
    assert rows.labels == ("shoe", "boot", "shoe", "boot", "bag")
    assert rows.class_names == ["bag", "boot", "shoe"]


def test_load_split_names_csv_line_of_a_missing_image(tmp_path: Path) -> None:
    csv_path = _write_images_and_csv(tmp_path, ROWS)
    (tmp_path / "data" / "clean" / "shoe" / "c.png").unlink()

    with pytest.raises(StageError, match=r"train\.csv:4: image file not found"):
        load_split(csv_path)


def test_load_split_rejects_a_csv_without_class_column(tmp_path: Path) -> None:
    csv_path = tmp_path / "train.csv"
    csv_path.write_text("path,label\nx.png,shoe\n")

    with pytest.raises(StageError, match=r"train\.csv: missing column\(s\) class"):
        load_split(csv_path)


def test_make_dataset_yields_square_rgb_batches_in_sorted_class_order(tmp_path: Path) -> None:
    rows = load_split(_write_images_and_csv(tmp_path, ROWS))

    batches = list(make_dataset(rows, rows.class_names, image_size=32, batch_size=2))

    assert [tuple(x.shape) for x, _ in batches] == [(2, 32, 32, 3), (2, 32, 32, 3), (1, 32, 32, 3)]
    assert all(x.dtype.name == "float32" for x, _ in batches)
    labels = np.concatenate([y.numpy() for _, y in batches])
    assert labels.tolist() == [2, 1, 2, 1, 0]  # bag=0, boot=1, shoe=2
    first = batches[0][0].numpy()[0]
    assert first.min() == first.max() == 10.0  # grey shade kept, replicated into R, G and B


def test_make_dataset_applies_the_augment_function_to_uint8_batches(tmp_path: Path) -> None:
    rows = load_split(_write_images_and_csv(tmp_path, ROWS))
    seen_dtypes = []

    def invert(images):  # a real (if simple) augmentation, to see where it runs
        seen_dtypes.append(images.dtype.name)
        return 255 - images

    batch, _ = next(iter(make_dataset(rows, rows.class_names, 32, 5, augment=invert)))

    assert seen_dtypes == ["uint8"]
    assert float(batch.numpy()[0].max()) == 245.0


def test_shuffled_dataset_is_reproducible_for_a_seed(tmp_path: Path) -> None:
    rows = load_split(_write_images_and_csv(tmp_path, ROWS))

    def order(seed: int) -> list[int]:
        ds = make_dataset(rows, rows.class_names, 32, 5, shuffle=True, seed=seed)
        return [int(x[0, 0, 0]) for x in next(iter(ds))[0].numpy()]

    assert order(7) == order(7)
    assert sorted(order(7)) == [10, 30, 50, 70, 90]


def test_load_images_gives_predict_the_pixels_training_saw(tmp_path: Path) -> None:
    rows = load_split(_write_images_and_csv(tmp_path, ROWS))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(
        rows.paths[0]
    )

    single = load_images([rows.paths[0]], image_size=32)

    from_dataset = next(iter(make_dataset(rows, rows.class_names, 32, 1)))[0].numpy()
    np.testing.assert_array_equal(single, from_dataset)


def test_load_images_names_a_file_that_is_not_an_image(tmp_path: Path) -> None:
    bogus = tmp_path / "notes.png"
    bogus.write_text("not a picture")

    with pytest.raises(StageError, match=r"notes\.png: not an image"):
        load_images([bogus], image_size=32)
