"""Split stage: grouped, stratified, seeded, stable under growth, clear errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import ParamsError, SplitConfig, StageError, parse_params
from pipeline.files import read_csv, write_jsonl
from pipeline.split import split


def add_images(clean: Path, label: str, group_sizes: list[int], start: int = 0) -> None:
    """Add tiny real PNGs of ``label`` to ``clean``: one near-duplicate group per size given."""
    manifest = clean / "manifest.jsonl"
    rows = []
    if manifest.exists():
        rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    for g, size in enumerate(group_sizes, start=start):
        group = f"{label}-g{g:04d}"
        for m in range(size):
            name = f"{label}-{g:04d}-{m}"
            path = Path(label) / f"{name}.png"
            (clean / label).mkdir(parents=True, exist_ok=True)
            pixels = np.full((8, 8, 3), (g * 7 + m) % 256, dtype=np.uint8)
            Image.fromarray(pixels).save(clean / path)
            rows.append(
                {"path": path.as_posix(), "class": label, "group": group, "sha256": name * 2}
            )
    write_jsonl(manifest, rows)


def run_split(tmp_path: Path, cfg: SplitConfig) -> dict[str, list[dict[str, str]]]:
    split(cfg, tmp_path / "clean", tmp_path / "split", tmp_path / "split_report.json")
    return {name: read_csv(tmp_path / "split" / f"{name}.csv") for name in ("train", "val", "test")}


def where(splits: dict[str, list[dict[str, str]]]) -> dict[str, str]:
    return {row["path"]: name for name, rows in splits.items() for row in rows}


def test_split_csv_paths_resolve_from_the_csv_folder(tmp_path: Path) -> None:
    add_images(tmp_path / "clean", "cat", [1] * 10)
    add_images(tmp_path / "clean", "dog", [1] * 10)

    splits = run_split(tmp_path, SplitConfig())

    rows = [row for rows in splits.values() for row in rows]
    assert len(rows) == 20
    assert all((tmp_path / "split" / row["path"]).is_file() for row in rows)
    assert rows[0]["path"].startswith("../clean/")


def test_no_near_duplicate_group_straddles_splits(tmp_path: Path) -> None:
    sizes = [1, 2, 3, 4, 1, 2, 5, 1, 1, 3, 2, 1, 1, 4, 2, 1]
    add_images(tmp_path / "clean", "cat", sizes)
    add_images(tmp_path / "clean", "dog", sizes[::-1])

    splits = run_split(tmp_path, SplitConfig())

    splits_of_group: dict[str, set[str]] = {}
    for name, rows in splits.items():
        for row in rows:
            splits_of_group.setdefault(row["group"], set()).add(name)
    assert len(splits_of_group) == 2 * len(sizes)
    assert all(len(names) == 1 for names in splits_of_group.values())


def test_each_class_lands_within_one_image_of_its_fractions(tmp_path: Path) -> None:
    sizes = {"cat": 37, "dog": 50, "eel": 23}
    for label, n in sizes.items():
        add_images(tmp_path / "clean", label, [1] * n)
    cfg = SplitConfig(train=0.5, val=0.2, test=0.3)

    splits = run_split(tmp_path, cfg)

    for name, fraction in (("train", 0.5), ("val", 0.2), ("test", 0.3)):
        counts = Counter(row["class"] for row in splits[name])
        for label, n in sizes.items():
            assert abs(counts[label] - fraction * n) <= 1, (name, label, counts[label])


def test_counts_take_exact_numbers_per_class_and_leave_the_rest_unused(tmp_path: Path) -> None:
    add_images(tmp_path / "clean", "cat", [1] * 60)
    add_images(tmp_path / "clean", "dog", [1] * 55)
    cfg = SplitConfig(train=20, val=10, test=20)  # Chollet's 2000/1000/2000, scaled down

    splits = run_split(tmp_path, cfg)

    for name, expected in (("train", 20), ("val", 10), ("test", 20)):
        assert Counter(row["class"] for row in splits[name]) == {"cat": expected, "dog": expected}
    report = json.loads((tmp_path / "split_report.json").read_text())
    assert report["counts"]["unused"] == 15


def test_existing_images_keep_their_split_when_new_images_arrive(tmp_path: Path) -> None:
    add_images(tmp_path / "clean", "cat", [1, 2, 1, 3] * 10)
    add_images(tmp_path / "clean", "dog", [1] * 30)
    before = where(run_split(tmp_path, SplitConfig()))

    add_images(tmp_path / "clean", "cat", [1, 2] * 10, start=100)
    add_images(tmp_path / "clean", "dog", [1] * 25, start=100)
    after = where(run_split(tmp_path, SplitConfig()))

    assert len(after) == len(before) + 30 + 25
    assert all(after[path] == split_name for path, split_name in before.items())


def test_new_images_fill_the_splits_that_are_short(tmp_path: Path) -> None:
    add_images(tmp_path / "clean", "cat", [1] * 20)
    add_images(tmp_path / "clean", "dog", [1] * 20)
    run_split(tmp_path, SplitConfig())

    add_images(tmp_path / "clean", "cat", [1] * 30, start=100)
    add_images(tmp_path / "clean", "dog", [1] * 30, start=100)
    splits = run_split(tmp_path, SplitConfig())

    sizes = {name: Counter(row["class"] for row in rows) for name, rows in splits.items()}
    assert sizes["train"] == {"cat": 30, "dog": 30}
    assert sizes["val"] == sizes["test"] == {"cat": 10, "dog": 10}


def test_merged_group_moves_whole_into_one_split(tmp_path: Path) -> None:
    clean = tmp_path / "clean"
    add_images(clean, "cat", [1] * 20)
    add_images(clean, "dog", [1] * 20)
    before = where(run_split(tmp_path, SplitConfig()))
    in_test = min(p for p, name in before.items() if "/cat/" in p and name == "test")
    in_train = min(p for p, name in before.items() if "/cat/" in p and name == "train")
    rows = [json.loads(line) for line in (clean / "manifest.jsonl").read_text().splitlines()]
    for row in rows:  # a re-clean found these two to be near duplicates
        if f"../clean/{row['path']}" in (in_test, in_train):
            row["group"] = "merged"
    write_jsonl(clean / "manifest.jsonl", rows)

    after = where(run_split(tmp_path, SplitConfig()))

    assert after[in_test] == after[in_train] == "test"
    report = json.loads((tmp_path / "split_report.json").read_text())
    assert report["moved_with_merged_group"] == 1


def test_same_seed_gives_the_same_split_and_another_seed_a_different_one(
    tmp_path: Path,
) -> None:
    add_images(tmp_path / "clean", "cat", [1] * 40)
    add_images(tmp_path / "clean", "dog", [1] * 40)
    first = where(run_split(tmp_path, SplitConfig(seed=1)))
    (tmp_path / "split" / "assignment.csv").unlink()  # forget the persisted assignment

    again = where(run_split(tmp_path, SplitConfig(seed=1)))
    other = where(run_split(tmp_path, SplitConfig(seed=2)))

    assert again == first
    assert other != first


def test_too_few_images_for_the_fractions_names_the_class_and_counts(tmp_path: Path) -> None:
    add_images(tmp_path / "clean", "cat", [1] * 20)
    add_images(tmp_path / "clean", "dog", [1, 1])

    with pytest.raises(StageError, match=r"class 'dog' has 2 images in 2 near-duplicate groups"):
        run_split(tmp_path, SplitConfig())

    assert not (tmp_path / "split").exists()


def test_too_few_images_for_the_counts_names_the_class_and_counts(tmp_path: Path) -> None:
    add_images(tmp_path / "clean", "cat", [1] * 50)
    add_images(tmp_path / "clean", "dog", [1] * 49)

    with pytest.raises(StageError, match=r"'dog' has 49 images but .* = 50"):
        run_split(tmp_path, SplitConfig(train=20, val=10, test=20))


def test_report_counts_images_per_split_and_class(tmp_path: Path) -> None:
    add_images(tmp_path / "clean", "cat", [1] * 10)
    add_images(tmp_path / "clean", "dog", [1] * 20)

    summary = split(
        SplitConfig(), tmp_path / "clean", tmp_path / "split", tmp_path / "split_report.json"
    )

    report = json.loads((tmp_path / "split_report.json").read_text())
    assert report["per_class"]["train"] == {"cat": 6, "dog": 12}
    assert report["counts"]["test"] == 6
    assert "train 18, val 6, test 6 images over 2 classes" in str(summary)


def test_missing_clean_manifest_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StageError, match=r"manifest.jsonl: clean manifest not found"):
        run_split(tmp_path, SplitConfig())


def test_mixing_fractions_and_counts_is_rejected_with_the_key(tmp_path: Path) -> None:
    params = {
        "classes": [{"name": "a", "seeds": ["http://x/"]}, {"name": "b", "seeds": ["http://y/"]}],
        "split": {"train": 2000, "val": 0.2, "test": 2000},
    }

    with pytest.raises(ParamsError, match=r"split: .*all as fractions"):
        parse_params(params)


def test_changing_the_sizes_redraws_the_split_and_says_so(tmp_path: Path) -> None:
    add_images(tmp_path / "clean", "cat", [1] * 20)
    add_images(tmp_path / "clean", "dog", [1] * 20)
    run_split(tmp_path, SplitConfig())

    summary = split(
        SplitConfig(train=0.5, val=0.25, test=0.25),
        tmp_path / "clean",
        tmp_path / "split",
        tmp_path / "split_report.json",
    )

    assert summary.redrawn
    assert "the split was redrawn" in str(summary)
    assert summary.counts == {"train": 20, "val": 10, "test": 10}


def test_a_split_recorded_before_the_resume_helper_is_kept(tmp_path: Path) -> None:
    add_images(tmp_path / "clean", "cat", [1] * 20)
    add_images(tmp_path / "clean", "dog", [1] * 20)
    run_split(tmp_path, SplitConfig())
    params = tmp_path / "split" / "split_params.json"
    params.write_text(json.dumps({"seed": 42, "train": 0.6, "val": 0.2, "test": 0.2}))

    summary = split(
        SplitConfig(), tmp_path / "clean", tmp_path / "split", tmp_path / "split_report.json"
    )

    assert not summary.redrawn
    assert summary.kept == 40
    assert json.loads(params.read_text())["made_from"]["seed"] == 42  # upgraded in place
