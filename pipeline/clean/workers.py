"""Where clean's per-image work runs: inline, a local process pool, or a Dask cluster.

Consumes a picklable function and a list of picklable tasks; yields the results in completion
order with a tqdm bar. ``workers <= 1`` (or a single task) runs inline in the caller; with
``clean.dask_address`` the tasks go to that Dask scheduler's workers instead.

What runs where: decode (``analysis.py``: decode, hash, normalise, write the copy), ORB
description and pair verification (``verify.py``) run on the workers; reading the manifest,
the analysis log, pHash and neighbour search, grouping and every output file stay in the
calling process. Dask workers read raw files and write normalised copies by path, so they must
see the project directory at the same path (a shared file system), as the crawl's do.
Results are keyed and sorted before use, so the outputs do not depend on where or in which
order the tasks ran. Every wait is bounded: no task finishing for ``TASK_TIMEOUT_S`` in the
local pool (``fanout.RESULT_TIMEOUT_S`` on Dask) stops the workers and raises StageError.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import cv2

if TYPE_CHECKING:  # a spawned worker imports this module: 0.13 CPU-s less without these two
    from tqdm import tqdm

    from pipeline.config import CleanConfig

Task = TypeVar("Task")
Result = TypeVar("Result")

# Peak bytes per decoded pixel in a decode worker: the decoded frame (up to 4 bytes, RGBA)
# plus its RGB conversion (3), and a margin; JPEGs decode at reduced scale and need far less.
BYTES_PER_PIXEL = 8
WORKER_BASE_BYTES = 250 * 2**20  # interpreter, NumPy, OpenCV, Pillow
DASK_KEY = "clean.dask_address"  # named in the errors of an unreachable or stalled cluster
WORKERS_KEY = "clean.workers"  # named in the error of a stuck local worker
# No task finishing for this long means a stuck worker process (one task is at most a few
# hundred images or pairs); the Dask path has the same bound (fanout.RESULT_TIMEOUT_S).
TASK_TIMEOUT_S = 3600.0


def _available_memory() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def worker_count(cfg: CleanConfig) -> int:
    """``clean.workers`` (0: one per CPU core), lowered so that every worker can hold an image
    of ``clean.max_image_pixels`` in the memory available now."""
    wanted = cfg.workers or (os.cpu_count() or 1)
    available = _available_memory()
    if available is None:
        return wanted
    per_worker = WORKER_BASE_BYTES + BYTES_PER_PIXEL * cfg.max_image_pixels
    return max(1, min(wanted, available // per_worker))


def _worker_init() -> None:
    # One thread per process: the pool already uses every core, and OpenCV's and BLAS's own
    # thread pools on top of it made ORB matching 3x slower when measured on 2 cores.
    cv2.setNumThreads(1)
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """OpenCV and BLAS on one thread inside, restored after (for an inline run's caller)."""
    from threadpoolctl import threadpool_limits

    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        cv2.setNumThreads(threads)


class WorkerPool:
    """Runs a phase's tasks inline, on one process pool shared by every phase of a run, or on
    a Dask cluster at ``dask_address``.

    Use as a context manager; the pool or Dask client (if one was started) is closed on exit.
    """

    def __init__(self, workers: int, dask_address: str | None = None) -> None:
        self.workers = workers
        self.dask_address = dask_address
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._client: Any = None

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def map(
        self, function: Callable[[Task], Result], tasks: Sequence[Task], desc: str, unit: str
    ) -> Iterator[Result]:
        """Results of ``function`` over ``tasks`` in completion order, with a tqdm bar."""
        from tqdm import tqdm  # only the calling process draws the bar

        with tqdm(total=len(tasks), desc=desc, unit=unit) as bar:
            if self.dask_address:
                yield from self._dask_map(self.dask_address, function, tasks, bar)
                return
            if self.workers <= 1 or len(tasks) < 2:
                # One thread here too: OpenCV's own pool made an inline clean of the
                # throughput bench's photos cost 53 CPU-s instead of 35 (same wall time).
                with _one_thread():
                    for task in tasks:
                        yield function(task)
                        bar.update()
                return
            if self._pool is None:
                # spawn, not fork: a child forked while the parent's OpenCV threads run hangs
                # (seen in this test suite). Like any multiprocessing code, a calling script
                # needs an `if __name__ == "__main__":` guard.
                self._pool = concurrent.futures.ProcessPoolExecutor(
                    self.workers,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_worker_init,
                )
            pending = {self._pool.submit(function, task) for task in tasks}
            while pending:
                done, pending = concurrent.futures.wait(
                    pending, timeout=TASK_TIMEOUT_S, return_when=concurrent.futures.FIRST_COMPLETED
                )
                if not done:
                    from pipeline.config import StageError  # not in a worker's imports

                    self._terminate()
                    raise StageError(
                        f"{WORKERS_KEY}: no {desc!r} task finished in this machine's "
                        f"{self.workers} worker processes for {TASK_TIMEOUT_S:g} s "
                        f"({len(pending)} of {len(tasks)} left); a worker is stuck"
                    )
                for future in done:
                    yield future.result()
                    bar.update()

    def _dask_map(
        self, address: str, function: Callable[[Task], Result], tasks: Sequence[Task], bar: tqdm
    ) -> Iterator[Result]:
        from pipeline.fanout import completed, connect

        if self._client is None:
            self._client = connect(address, DASK_KEY)
            self._client.run(_worker_init)
        futures = self._client.map(function, list(tasks), pure=False)
        for _, result in completed(self._client, futures, address=address, key=DASK_KEY, bar=bar):
            yield result

    def _terminate(self) -> None:
        """Stop the pool's processes, stuck ones too (shutting down waits for running tasks)."""
        if self._pool is None:
            return
        # Python 3.14 has terminate_workers(); before it, the executor's own process table.
        terminate = getattr(self._pool, "terminate_workers", None)
        if terminate is not None:
            terminate()
        else:
            for process in list(getattr(self._pool, "_processes", {}).values()):
                process.terminate()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
        if self._client is not None:
            self._client.close()
            self._client = None
