"""Feature extraction on a Dask cluster (pipeline/fanout.py): the audit's and the transfer
stages' features from two worker processes equal the in-process ones, and an unreachable
scheduler fails fast naming the params key."""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from test_train import tiny_config, write_split

from pipeline import fanout
from pipeline.audit import features as audit_features
from pipeline.config import AuditConfig, StageError
from pipeline.dataset import load_split
from pipeline.features import cached_features

distributed = pytest.importorskip("distributed")

AUDIT = AuditConfig(image_size=32, backbone="vgg16", weights="hed-bsds500", batch_size=4)


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True) as local:
        yield local.scheduler_address


def _images(folder: Path, count: int) -> tuple[list[Path], list[str]]:
    from PIL import Image

    rng = np.random.default_rng(3)
    folder.mkdir(parents=True)
    files, shas = [], []
    for n in range(count):
        path = folder / f"{n}.png"
        Image.fromarray(rng.integers(0, 256, (30 + n, 34, 3), dtype=np.uint8)).save(path)
        files.append(path)
        shas.append(hashlib.sha256(path.read_bytes()).hexdigest())
    return files, shas


def _parts(cache: Path) -> dict[str, np.ndarray]:
    parts = {}
    for part in cache.glob("part-*.npz"):
        with np.load(part) as data:
            parts[tuple(data["sha256"])] = data["features"]
    return dict(sorted(parts.items()))


def test_audit_features_on_a_dask_cluster_equal_the_in_process_ones(
    cluster: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit_features, "CHUNK", 5)  # 13 images: 3 tasks over 2 workers
    files, shas = _images(tmp_path / "images", 13)

    local, extracted = audit_features.image_features(files, shas, AUDIT, tmp_path / "one")
    cfg = AUDIT.model_copy(update={"dask_address": cluster})
    remote, _ = audit_features.image_features(files, shas, cfg, tmp_path / "dask")

    assert extracted == 13 and remote.dtype == np.float32
    np.testing.assert_allclose(remote, local, rtol=1e-6, atol=1e-6)
    one, dask = _parts(tmp_path / "one"), _parts(tmp_path / "dask")
    assert list(one) == list(dask)  # the same chunks of the same images
    for chunk, features in one.items():
        np.testing.assert_allclose(dask[chunk], features, rtol=1e-6, atol=1e-6)


def test_an_undecodable_image_on_a_worker_fails_the_stage_as_in_process(
    cluster: str, tmp_path: Path
) -> None:
    files, shas = _images(tmp_path / "images", 3)
    files[1].write_bytes(b"not a png")
    cfg = AUDIT.model_copy(update={"dask_address": cluster})

    with pytest.raises(StageError, match="cannot be decoded"):
        audit_features.image_features(files, shas, cfg, tmp_path / "cache")


def test_transfer_features_on_a_dask_cluster_equal_the_in_process_ones(
    cluster: str, tmp_path: Path
) -> None:
    import keras

    from pipeline import models

    split_dir = write_split(tmp_path, train_per_class=5)  # 15 rows: tasks of 8 + 7 (batch 2)
    rows = load_split(split_dir / "train.csv")
    classes = rows.class_names
    cfg = tiny_config({"batch_size": 2})
    keras.utils.set_random_seed(cfg.seed)
    extractor = models.feature_extractor(32, models.build_base("vgg16", 32, "hed-bsds500"))

    local, labels = cached_features(extractor, rows, classes, cfg, tmp_path / "one", "train")
    transfer = cfg.transfer.model_copy(update={"dask_address": cluster})
    dask_cfg = cfg.model_copy(update={"transfer": transfer})
    remote, remote_labels = cached_features(
        extractor, rows, classes, dask_cfg, tmp_path / "dask", "train"
    )

    assert remote.shape == local.shape == (15, 1, 1, 512)
    np.testing.assert_allclose(remote, local, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(remote_labels, labels)
    assert (tmp_path / "dask" / "train.csv").read_text() == (
        tmp_path / "one" / "train.csv"
    ).read_text()


def test_an_unreachable_scheduler_fails_fast_naming_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(fanout, "CONNECT_TIMEOUT_S", 2.0)
    files, shas = _images(tmp_path / "images", 2)
    cfg = AUDIT.model_copy(update={"dask_address": f"tcp://127.0.0.1:{port}"})

    started = time.monotonic()
    with pytest.raises(StageError, match=rf"audit\.dask_address: .*127\.0\.0\.1:{port}"):
        audit_features.image_features(files, shas, cfg, tmp_path / "cache")

    assert time.monotonic() - started < 15
