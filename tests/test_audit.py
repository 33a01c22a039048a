"""Label audit: planted wrong labels are found, drop never touches test, a person's review wins."""

from __future__ import annotations

import hashlib
import io
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image
from pydantic import BaseModel

from pipeline.audit import audit, suspect_test_paths
from pipeline.config import AuditConfig, AuditSettings, Params, StageError
from pipeline.dataset import load_split
from pipeline.files import read_csv, write_csv, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}
SIZES = {"train": 16, "val": 6, "test": 6}
# (split, index within the class's rows of that split, true colour) of images labelled wrongly
PLANTED = {("train", "red", 3): "green", ("train", "green", 5): "blue", ("test", "blue", 2): "red"}
# Real backbone weights at 32 px keep the run to seconds; features only need to tell colours apart.
CFG = AuditConfig(
    image_size=32,
    backbone="vgg16",
    weights="hed-bsds500",
    review=Path("no-review.csv"),
    folds=3,
    c_grid=[0.01, 1.0],
    suspects_per_class=2,
)


@dataclass(frozen=True)
class Project:
    root: Path
    planted: dict[str, str]  # sha256 → split of each wrongly labelled image

    @property
    def split(self) -> Path:
        return self.root / "split"

    @property
    def clean(self) -> Path:
        return self.root / "clean"

    @property
    def out(self) -> Path:
        return self.root / "audit"

    def run(self, **changes: Any) -> Any:
        cfg = CFG.model_copy(update=changes)
        report = self.root / "reports" / "audit_report.json"
        return audit(cfg, self.split, self.clean, self.out, report, report.with_suffix(".png"))

    def issues(self) -> list[dict[str, str]]:
        return read_csv(self.out / "label_issues.csv")


def _png(colour: tuple[int, int, int], rng: np.random.Generator) -> bytes:
    noise = rng.integers(-40, 41, size=(32, 32, 3))
    pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _build(root: Path) -> Project:
    """data/clean (PNGs + manifest) and data/split CSVs, laid out as the stages write them."""
    rng = np.random.default_rng(0)
    manifest, planted = [], {}
    rows: dict[str, list[dict[str, str]]] = {split: [] for split in SIZES}
    for split, count in SIZES.items():
        for label in COLOURS:
            for i in range(count):
                colour = COLOURS[PLANTED.get((split, label, i), label)]
                data = _png(colour, rng)
                sha = hashlib.sha256(data).hexdigest()
                (root / "clean" / label).mkdir(parents=True, exist_ok=True)
                (root / "clean" / label / f"{sha}.png").write_bytes(data)
                manifest.append({"path": f"{label}/{sha}.png", "class": label, "sha256": sha})
                rows[split].append({"path": f"../clean/{label}/{sha}.png", "class": label,
                                    "group": sha[:16]})  # fmt: skip
                if (split, label, i) in PLANTED:
                    planted[sha] = split
    write_jsonl(root / "clean" / "manifest.jsonl", manifest)
    for split, split_rows in rows.items():
        write_csv(root / "split" / f"{split}.csv", split_rows, ["path", "class", "group"])
    return Project(root, planted)


@pytest.fixture(scope="module")
def warmed(tmp_path_factory: pytest.TempPathFactory) -> Project:
    """The tiny noisy project with its feature cache filled once (each test copies it)."""
    project = _build(tmp_path_factory.mktemp("audit") / "project")
    project.run()
    return project


@pytest.fixture
def project(warmed: Project, tmp_path: Path) -> Iterator[Project]:
    root = tmp_path / "project"
    shutil.copytree(warmed.root, root)
    shutil.rmtree(root / "reports")
    for name in ("train", "val", "test", "label_issues"):
        (root / "audit" / f"{name}.csv").unlink()
    yield Project(root, warmed.planted)


def _review(project: Project, rows: list[dict[str, str]]) -> Path:
    path = project.root / "review.csv"
    write_csv(path, rows, ["path", "sha256", "decision"])
    return path


def _sha_of(project: Project, split: str, suspect: bool) -> str:
    """The sha256 of some image in ``split`` that the audit did (or did not) flag."""
    flagged = {row["sha256"] for row in project.issues()}
    for row in read_csv(project.split / f"{split}.csv"):
        sha = Path(row["path"]).stem
        if (sha in flagged) == suspect:
            return sha
    raise AssertionError(f"no {'suspect' if suspect else 'clean'} image in {split}")


def test_planted_wrong_labels_are_flagged(project: Project) -> None:
    project.run()

    label_issues = {r["sha256"]: r for r in project.issues() if "label" in r["issue"]}
    assert set(project.planted) <= set(label_issues)
    assert len(label_issues) <= len(project.planted) + 3
    red_as_blue = next(sha for sha, split in project.planted.items() if split == "test")
    assert label_issues[red_as_blue]["class_suggested"] == "red"


def test_flag_mode_leaves_the_split_csvs_byte_identical(project: Project) -> None:
    summary = project.run(action="flag")

    for split in SIZES:
        assert (project.out / f"{split}.csv").read_bytes() == (
            project.split / f"{split}.csv"
        ).read_bytes()
    assert summary.dropped == 0 and summary.suspects >= len(project.planted)


def test_drop_removes_exactly_the_drop_verdict_train_val_rows_and_never_test_rows(
    project: Project,
) -> None:
    summary = project.run(action="drop")

    dropped = {r["sha256"] for r in project.issues() if r["verdict"] == "drop"}
    assert {sha for sha, split in project.planted.items() if split == "train"} <= dropped
    test_suspects = {r["sha256"] for r in project.issues() if r["split"] == "test"}
    for split in ("train", "val"):
        before = [Path(r["path"]).stem for r in read_csv(project.split / f"{split}.csv")]
        after = [Path(r["path"]).stem for r in read_csv(project.out / f"{split}.csv")]
        assert after == [sha for sha in before if sha not in dropped]
    assert (project.out / "test.csv").read_bytes() == (project.split / "test.csv").read_bytes()
    assert test_suspects and {r["verdict"] for r in project.issues() if r["split"] == "test"} == {
        "flag"
    }
    assert summary.dropped == len(dropped) >= 2


def test_drop_keeps_label_issues_above_drop_below_in_training_flagged_for_review(
    project: Project,
) -> None:
    # drop_below 0: no label quality is below it, so every label issue is only flagged
    summary = project.run(action="drop", drop_below=0.0, ood_threshold=1000.0)

    rows = [r for r in project.issues() if r["split"] != "test"]
    planted = {sha for sha, split in project.planted.items() if split == "train"}
    assert planted <= {r["sha256"] for r in rows if r["issue"] == "label"}
    assert {r["verdict"] for r in rows} == {"flag"} and summary.dropped == 0
    assert all("audit.drop_below" in r["reason"] for r in rows)
    for split in ("train", "val"):
        assert (project.out / f"{split}.csv").read_bytes() == (
            project.split / f"{split}.csv"
        ).read_bytes()


def test_relabel_moves_a_confident_suspect_to_its_suggested_class(project: Project) -> None:
    project.run(action="relabel", relabel_threshold=0.5)

    green_as_red = next(
        sha for sha, split in project.planted.items() if split == "train" and
        any(r["class"] == "red" and sha in r["path"] for r in read_csv(project.split / "train.csv"))
    )  # fmt: skip
    row = next(r for r in read_csv(project.out / "train.csv") if green_as_red in r["path"])
    assert row["class"] == "green"


def test_review_decisions_win_over_the_automatic_verdict(project: Project) -> None:
    keep = next(sha for sha, split in project.planted.items() if split == "train")
    project.run()
    clean_test = _sha_of(project, "test", suspect=False)
    review = _review(
        project,
        [
            {"path": "", "sha256": keep, "decision": "keep"},
            {"path": "", "sha256": clean_test, "decision": "relabel:green"},
        ],
    )

    project.run(action="drop", review=review)

    train = read_csv(project.out / "train.csv")
    assert any(keep in r["path"] for r in train)
    test = {Path(r["path"]).stem: r["class"] for r in read_csv(project.out / "test.csv")}
    assert test[clean_test] == "green"
    verdicts = {r["sha256"]: r["verdict"] for r in project.issues()}
    assert verdicts[keep] == "review:keep" and verdicts[clean_test] == "review:relabel"


def test_a_person_can_drop_a_test_image(project: Project) -> None:
    suspect = next(sha for sha, split in project.planted.items() if split == "test")
    review = _review(project, [{"path": "", "sha256": suspect, "decision": "drop"}])

    project.run(action="flag", review=review)

    assert not any(suspect in r["path"] for r in read_csv(project.out / "test.csv"))
    assert not any(suspect in path.name for path in suspect_test_paths(project.out))


def test_review_survives_a_recrawl_that_renames_the_image(project: Project) -> None:
    sha = next(sha for sha, split in project.planted.items() if split == "train")
    review = _review(project, [{"path": f"../clean/red/{sha}.png", "sha256": sha,
                                "decision": "relabel:green"}])  # fmt: skip
    # The re-crawl found the same picture on a page of another class, under another file name.
    moved = project.clean / "blue" / "renamed.png"
    next(project.clean.glob(f"*/{sha}.png")).rename(moved)
    manifest = (project.clean / "manifest.jsonl").read_text()
    lines = [line for line in manifest.splitlines() if sha not in line]
    lines.append(f'{{"path": "blue/renamed.png", "class": "blue", "sha256": "{sha}"}}')
    (project.clean / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    train = [r for r in read_csv(project.split / "train.csv") if sha not in r["path"]]
    train.append({"path": "../clean/blue/renamed.png", "class": "blue", "group": sha[:16]})
    write_csv(project.split / "train.csv", train, ["path", "class", "group"])

    project.run(review=review)

    row = next(r for r in read_csv(project.out / "train.csv") if "renamed" in r["path"])
    assert row["class"] == "green"


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"path": "red/nope.png", "sha256": "", "decision": "drop"}, "unknown image"),
        ({"path": "", "sha256": "0" * 64, "decision": "drop"}, "unknown image"),
        ({"path": "", "sha256": "{sha}", "decision": "relabel:purple"}, "unknown class 'purple'"),
        ({"path": "", "sha256": "{sha}", "decision": "delete"}, "bad decision 'delete'"),
    ],
)
def test_a_bad_review_row_fails_naming_the_file_and_line(
    project: Project, row: dict[str, str], message: str
) -> None:
    sha = next(iter(project.planted))
    good = {"path": "", "sha256": sha, "decision": "keep"}
    review = _review(project, [good, {k: v.format(sha=sha) for k, v in row.items()}])

    with pytest.raises(StageError, match=rf"{review}:3: .*{message}"):
        project.run(review=review)


def test_a_rerun_extracts_features_only_for_new_images(project: Project) -> None:
    assert project.run().extracted == 0

    rng = np.random.default_rng(99)
    data = _png(COLOURS["red"], rng)
    sha = hashlib.sha256(data).hexdigest()
    (project.clean / "red" / f"{sha}.png").write_bytes(data)
    with open(project.clean / "manifest.jsonl", "a") as fh:
        fh.write(f'{{"path": "red/{sha}.png", "class": "red", "sha256": "{sha}"}}\n')
    train = read_csv(project.split / "train.csv")
    train.append({"path": f"../clean/red/{sha}.png", "class": "red", "group": sha[:16]})
    write_csv(project.split / "train.csv", train, ["path", "class", "group"])

    assert project.run().extracted == 1


def test_evaluate_finds_the_suspect_test_images_as_load_split_resolves_them(
    project: Project,
) -> None:
    project.run()

    suspects = suspect_test_paths(project.out)
    test_paths = set(load_split(project.out / "test.csv").paths)
    planted = next(sha for sha, split in project.planted.items() if split == "test")
    assert suspects <= test_paths
    assert any(planted in p.name for p in suspects)


def _leaves(model: BaseModel, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    for name, field in type(model).model_fields.items():
        yield f"{prefix}{name}", getattr(model, name), field.get_default()


def test_params_yaml_spells_out_every_audit_key_at_its_default() -> None:
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    shipped = Params.model_validate(data).audit

    assert set(data["audit"]) == set(AuditSettings.model_fields)
    assert [(k, v) for k, v, default in _leaves(shipped) if v != default] == []
    assert (ROOT / "data" / "audit" / "review.csv").read_text() == "path,sha256,decision\n"


def test_model_card_states_suspect_test_labels_and_accuracy_with_and_without_them(
    project: Project,
) -> None:
    import json

    from tinymodels import tiny_convnet

    from pipeline.config import EvaluateConfig
    from pipeline.dataset import load_images
    from pipeline.evaluate import evaluate

    project.run()
    models = project.root / "models"
    models.mkdir()
    train = load_split(project.out / "train.csv")
    model = tiny_convnet(32, len(COLOURS))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    labels = np.array([sorted(COLOURS).index(label) for label in train.labels])
    model.fit(load_images(train.paths, 32), labels, epochs=1, verbose=0)
    model.save(models / "baseline.keras")
    sidecar = {"class_names": sorted(COLOURS), "image_size": 32, "model": "baseline"}
    (models / "baseline.json").write_text(json.dumps(sidecar))
    suspects = len(suspect_test_paths(project.out))

    evaluate(EvaluateConfig(models=["baseline"], image_size=32), project.out, models,
             project.root / "reports")  # fmt: skip

    card = (project.root / "reports" / "model_card.md").read_text()
    scores = json.loads((project.root / "reports" / "evaluation.json").read_text())
    audit_scores = scores["models"]["baseline"]["label_audit"]
    assert f"suspects **{suspects} of the {SIZES['test'] * 3} test labels**" in card
    assert audit_scores["test_suspects"] == suspects >= 1
    assert audit_scores["accuracy_all"] == pytest.approx(scores["models"]["baseline"]["accuracy"])
    assert "accuracy, unsuspected test images" in card
