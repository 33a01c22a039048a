"""Fan-out to a Dask cluster: one picklable function over picklable tasks on the scheduler at a
params key's address, for the stages whose per-image work can leave the machine (the audit's and
the transfer stages' feature extraction with ``dask_map``; clean's analysis and verification
keep one client for all their phases, with ``connect`` and ``completed``).

Consumes the address (``tcp://host:8786``), the params key it came from (named in every error),
the function (importable by its module path on the workers: they need this package installed)
and the tasks; yields ``(task index, result)`` pairs as tasks finish, with a tqdm bar, so a
caller can save each result at once (a killed run keeps what finished) or put them back in task
order. Every wait is bounded: connecting (``CONNECT_TIMEOUT_S``) and the gap between two
finished tasks (``RESULT_TIMEOUT_S``); either raises StageError naming the key and the address.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pipeline.config import StageError

if TYPE_CHECKING:
    from tqdm import tqdm

Task = TypeVar("Task")
Result = TypeVar("Result")

CONNECT_TIMEOUT_S = 30.0  # a scheduler that does not answer by then is not there
# No task finishing for this long means lost workers (Dask reruns a dead worker's tasks on the
# others, but waits forever when none is left); one task is a few hundred images.
RESULT_TIMEOUT_S = 3600.0


def connect(address: str, key: str) -> Any:
    """A ``distributed.Client`` of the scheduler at ``address`` (from params key ``key``).

    Raises StageError naming ``key`` when dask.distributed is not installed, and naming ``key``
    and ``address`` when the scheduler does not answer within ``CONNECT_TIMEOUT_S``.
    """
    try:
        from distributed import Client
    except ImportError:
        raise StageError(
            f"{key}: running on Dask needs dask.distributed (pip install '.[dask]')"
        ) from None
    try:
        return Client(address, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:
        raise StageError(
            f"{key}: cannot reach the Dask scheduler at {address!r} within "
            f"{CONNECT_TIMEOUT_S:g} s ({exc}); start one (`dask scheduler`) or set {key}: null "
            "to run in this process"
        ) from None


def completed(
    client: Any, futures: Sequence[Any], *, address: str, key: str, bar: tqdm | None = None
) -> Iterator[tuple[int, Any]]:
    """``(index into futures, result)`` as each finishes; a task's own exception is re-raised
    as it was raised on the worker. Raises StageError naming ``key`` and ``address`` when no
    task finishes for ``RESULT_TIMEOUT_S``."""
    from distributed import wait

    index = {future.key: n for n, future in enumerate(futures)}
    pending = set(futures)
    while pending:
        try:
            with client.as_current():  # wait() asks for the current client
                done, pending = wait(
                    pending, timeout=RESULT_TIMEOUT_S, return_when="FIRST_COMPLETED"
                )
        except TimeoutError:
            raise StageError(
                f"{key}: no task finished on the Dask cluster at {address!r} for "
                f"{RESULT_TIMEOUT_S:g} s ({len(pending)} of {len(futures)} left); "
                "are its workers alive?"
            ) from None
        for future in sorted(done, key=lambda f: index[f.key]):
            yield index[future.key], future.result()
            future.release()  # the cluster need not keep what the caller now holds
            if bar is not None:
                bar.update()


def dask_map(
    function: Callable[[Task], Result],
    tasks: Sequence[Task],
    *,
    address: str,
    key: str,
    desc: str,
    unit: str = "task",
) -> Iterator[tuple[int, Result]]:
    """``(index into tasks, function(task))`` for every task, in completion order, on a client
    of its own (``connect``; closed at the end), with a tqdm bar. Raises as ``connect`` and
    ``completed`` do."""
    from tqdm import tqdm

    client = connect(address, key)
    try:
        futures = client.map(function, list(tasks), pure=False)
        with tqdm(total=len(futures), desc=desc, unit=unit) as bar:
            yield from completed(client, futures, address=address, key=key, bar=bar)
    finally:
        client.close(timeout=CONNECT_TIMEOUT_S)


def in_task_order(results: Iterator[tuple[int, Result]], count: int) -> list[Result]:
    """``dask_map``'s results put back in task order. Raises ValueError if one is missing."""
    ordered: list[Result | None] = [None] * count
    seen = 0
    for n, result in results:
        ordered[n] = result
        seen += 1
    if seen != count:
        raise ValueError(f"expected {count} results, got {seen}")
    return ordered  # type: ignore[return-value]


_BUILT: dict[str, Any] = {}  # this process's, by built_once's key


def built_once(key: object, build: Callable[[], Result]) -> Result:
    """``build()``, called once per process for each ``key`` (JSON-able: what the result
    depends on) and kept: a long-lived Dask worker builds a feature extractor once, not once
    per task."""
    text = json.dumps(key, sort_keys=True, default=str)
    if text not in _BUILT:
        _BUILT[text] = build()
    return _BUILT[text]


def _is_file(weights: str) -> bool:
    return weights.endswith((".h5", ".keras")) or "/" in weights


def worker_weights(weights: str) -> str:
    """``weights`` as a worker must be given it: a weights file by absolute path (a worker's
    working folder is not this process's); named weights (imagenet, none, …) unchanged."""
    return str(Path(weights).absolute()) if _is_file(weights) else weights


def weights_stamp(weights: str) -> list[object]:
    """What a worker's cached extractor must be rebuilt on: the name, and for a weights file its
    size and modification time (a long-lived worker outlives a retrained file)."""
    if not _is_file(weights) or not Path(weights).is_file():
        return [weights]
    stat = Path(weights).stat()
    return [weights, stat.st_size, stat.st_mtime_ns]
