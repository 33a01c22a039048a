"""The process pool clean's decode and verification phases share.

Consumes a picklable function and a list of picklable tasks; yields the results in completion
order with a tqdm bar. ``workers <= 1`` (or a single task) runs inline in the caller.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import cv2
from tqdm import tqdm

from pipeline.config import CleanConfig

Task = TypeVar("Task")
Result = TypeVar("Result")


def worker_count(cfg: CleanConfig) -> int:
    """``clean.workers``, where 0 means one per CPU core."""
    return cfg.workers or (os.cpu_count() or 1)


def _worker_init() -> None:
    # One thread per process: the pool already uses every core, and OpenCV's and BLAS's own
    # thread pools on top of it made ORB matching 3x slower when measured on 2 cores.
    cv2.setNumThreads(1)
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


class WorkerPool:
    """Runs a phase's tasks inline or on one process pool shared by every phase of a run.

    Use as a context manager; the pool (if one was started) is shut down on exit.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def map(
        self, function: Callable[[Task], Result], tasks: Sequence[Task], desc: str, unit: str
    ) -> Iterator[Result]:
        """Results of ``function`` over ``tasks`` in completion order, with a tqdm bar."""
        with tqdm(total=len(tasks), desc=desc, unit=unit) as bar:
            if self.workers <= 1 or len(tasks) < 2:
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
            futures = [self._pool.submit(function, task) for task in tasks]
            for future in concurrent.futures.as_completed(futures):
                yield future.result()
                bar.update()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
