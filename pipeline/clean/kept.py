"""What a clean worker keeps between tasks: a byte-bounded, least-recently-used store.

Consumes a key and a function that makes the value (read a grey, compute detail, unpickle a
described image); produces the value, made once and kept while the store's ``limit()`` bytes
allow. Used by describe.py for greys (which verify.py reads too, with content boxes), by
verify.py for detail, and by describe.py's ``DescribedCache`` for what it reads of a run's
describe store. What a worker keeps is of one run (``enter_run``): a re-crawl may rewrite an
image at the same path, so a long-lived (Dask) worker forgets an earlier run's.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np


def nbytes(value: object) -> int:
    """The bytes of the arrays in ``value`` (an array, or a tuple of them, nested)."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, tuple):
        return sum(nbytes(item) for item in value)
    return 0


class Kept:
    """Values up to ``limit()`` bytes (as ``size(key, value)`` counts them; by default the
    value's arrays), least recently used out."""

    def __init__(
        self,
        limit: Callable[[], int],
        size: Callable[[Any, Any], int] = lambda key, value: nbytes(value),
    ) -> None:
        self.limit = limit
        self.size = size
        self.items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self.held = 0

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        found = self.items.get(key)
        if found is not None:
            self.items.move_to_end(key)
            return found[0]
        value = make()
        size = self.size(key, value)
        while self.items and self.held + size > self.limit():
            self.held -= self.items.popitem(last=False)[1][1]
        self.items[key] = (value, size)
        self.held += size
        return value

    def clear(self) -> None:
        self.items.clear()
        self.held = 0


_run = [""]  # the run whose files this process's caches hold
_forgets: list[Callable[[], None]] = []


def run_scoped(forget: Callable[[], None]) -> None:
    """Register a cache of one run's files: ``forget`` empties it."""
    _forgets.append(forget)


def enter_run(run: str) -> None:
    """Called by each worker task with its run's id: the caches of another run are emptied."""
    if run != _run[0]:
        forget_run()
        _run[0] = run


def forget_run() -> None:
    """Empty every run-scoped cache of this process (an inline run's caller, at its end)."""
    for forget in _forgets:
        forget()
    _run[0] = ""
