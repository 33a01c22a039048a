"""Feature extraction on a Dask cluster vs in this process, on one machine: where does it pay?

Both stages that run a frozen backbone over every image can send that work to Dask workers
(``audit.dask_address``, ``train.transfer.dask_address``; ``pipeline.fanout``). This script runs
each stage's extraction over the same images in this process and on a LocalCluster of
``--workers`` single-thread worker processes on this machine, interleaved (``--repeats`` rounds,
best of each), and prints images/s and CPU-seconds per image (this process's plus the workers')
for both, and the ratios cluster / in-process. The cluster's
first run is printed apart ("cold": each worker imports TensorFlow and builds the extractor);
the later ones reuse the workers' cached extractors, as a long-lived cluster does.

On one machine the cluster cannot beat the in-process run, which already uses every core
through TensorFlow's own threads: the ratio is the fan-out's overhead (task shipping, a second
TensorFlow per worker, the cores shared), i.e. what a cluster must win back with cores of its
own. Images and configs come from a project that ran the pipeline (``make demo``):
``<project>/params.yaml``, ``data/clean/manifest.jsonl`` (audit), ``data/split/train.csv``
(train-transfer's train split). Nothing in the project is written.

    python bench/feature_fanout.py --project /path/to/demo-run     # 2 workers, 3 rounds
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def audit_run(project: Path, address: str | None) -> tuple[int, Callable[[], None]]:
    """The audit's ``image_features`` over every clean image, into a fresh cache each call."""
    from pipeline.audit.features import image_features
    from pipeline.config import load_params
    from pipeline.files import read_jsonl

    cfg = load_params(project / "params.yaml").audit.model_copy(update={"dask_address": address})
    clean = project / "data" / "clean"
    rows = list(read_jsonl(clean / "manifest.jsonl"))
    files = [clean / str(r["path"]) for r in rows]
    shas = [str(r["sha256"]) for r in rows]

    def run() -> None:
        with tempfile.TemporaryDirectory() as cache:
            _, extracted = image_features(files, shas, cfg, Path(cache))
            assert extracted == len(files)

    return len(files), run


def transfer_run(project: Path, address: str | None) -> tuple[int, Callable[[], None]]:
    """train-transfer's fast-mode ``cached_features`` over the train split, fresh cache."""
    import keras

    from pipeline import models
    from pipeline.config import load_params
    from pipeline.dataset import load_split
    from pipeline.features import cached_features
    from pipeline.train import _as_transfer

    cfg = _as_transfer(load_params(project / "params.yaml").train, "transfer")
    transfer = cfg.transfer.model_copy(update={"dask_address": address})
    cfg = cfg.model_copy(update={"transfer": transfer, "verbose": 0})
    rows = load_split(project / "data" / "split" / "train.csv")
    keras.utils.set_random_seed(cfg.seed)
    size = cfg.fit.image_size
    extractor = models.feature_extractor(
        size, models.build_base(transfer.backbone, size, transfer.weights)
    )

    def run() -> None:
        with tempfile.TemporaryDirectory() as out:
            cached_features(extractor, rows, rows.class_names, cfg, Path(out), "train")

    return len(rows), run


def timed(
    run: Callable[[], None], images: int, workers: Callable[[], float] | None = None
) -> tuple[float, float]:
    """(images per wall second, CPU seconds per image) of one run: this process's CPU time plus,
    with ``workers``, the Dask workers' (CPU time counts the work whatever else shares the
    machine; wall time does not)."""
    workers = workers or (lambda: 0.0)
    wall, cpu, worker_cpu = time.perf_counter(), time.process_time(), workers()
    run()
    cpu_seconds = time.process_time() - cpu + workers() - worker_cpu
    return images / (time.perf_counter() - wall), cpu_seconds / images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path, default=ROOT)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stages", default="audit,transfer")
    args = parser.parse_args()
    if not (args.project / "data" / "clean" / "manifest.jsonl").is_file():
        parser.error(f"--project {args.project}: no data/clean/manifest.jsonl (run make demo)")

    import distributed

    started = time.perf_counter()
    with distributed.LocalCluster(
        n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        print(f"LocalCluster of {args.workers} single-thread workers up in "
              f"{time.perf_counter() - started:.1f} s (not counted below)")  # fmt: skip
        client = distributed.Client(cluster, set_as_default=False)

        def worker_cpu() -> float:
            return sum(client.run(time.process_time).values())

        builders = {"audit": audit_run, "transfer": transfer_run}
        for stage in args.stages.split(","):
            images, local = builders[stage](args.project, None)
            _, remote = builders[stage](args.project, cluster.scheduler_address)
            local(), print(f"{stage}: warm-up in process done")  # TF graph tracing, file cache
            cold, _ = timed(remote, images, worker_cpu)
            runs: dict[str, list[tuple[float, float]]] = {"local": [], "dask": []}
            for _ in range(args.repeats):  # interleaved: load from other jobs hits both alike
                runs["local"].append(timed(local, images))
                runs["dask"].append(timed(remote, images, worker_cpu))
            rate = {name: max(r for r, _ in results) for name, results in runs.items()}
            cpu = {name: min(c for _, c in results) for name, results in runs.items()}
            print(
                f"{stage}: {images} images | in process {rate['local']:.1f} img/s, "
                f"{1000 * cpu['local']:.1f} CPU-ms/img | Dask {args.workers}x1 "
                f"{rate['dask']:.1f} img/s, {1000 * cpu['dask']:.1f} CPU-ms/img (cold first run "
                f"{cold:.1f} img/s) | Dask / in process: speed {rate['dask'] / rate['local']:.2f}, "
                f"CPU per image {cpu['dask'] / cpu['local']:.2f}"
            )
        client.close()


if __name__ == "__main__":
    main()
