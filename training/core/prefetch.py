"""Cut the next training batches in a thread while the model trains on the current one.

Why a thread and not DataLoader workers: on a 2-core line PC a worker process slowed every
training step by ~65 % over a whole run (docs/benchmarks.md, "Data pipeline vs train step"),
while cutting and augmenting in the training loop left the model idle ~20 % of each step. The
patch work is mostly OpenCV and NumPy, which release the GIL, so a thread fills the gaps of the
training step (its Python dispatch, the optimizer, single-threaded ops) without a second process.

The batches are exactly the loader's, in the same order (one producer iterates the loader), so a
seeded run stays reproducible. The producer runs at most `depth` batches ahead: the hard
negatives and positives set between epochs are read by the next epoch's iterator, which only
starts when the trainer asks for that epoch.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
_DONE = object()


class Prefetcher(Iterator[T]):
    """Iterate `source` in a daemon thread, `depth` items ahead; close() stops it early."""

    def __init__(self, source: Iterable[T], depth: int = 2) -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._finished = False
        self._thread = threading.Thread(target=self._produce, args=(iter(source),), name="patch-prefetch",
                                        daemon=True)
        self._thread.start()

    def _produce(self, it: Iterator[T]) -> None:
        try:
            for item in it:
                if not self._offer(item):
                    return
            self._offer(_DONE)
        except BaseException as e:  # handed to the consumer, which raises it where it asked for a batch
            self._offer(_Failure(e))

    def _offer(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __next__(self) -> T:
        if self._finished:
            raise StopIteration
        item = self._queue.get()
        if item is _DONE:
            self._finished = True
            self._thread.join()
            raise StopIteration
        if isinstance(item, _Failure):
            self._finished = True
            self._thread.join()
            raise item.error
        return item  # type: ignore[no-any-return]

    def close(self) -> None:
        """Stop the producer (a run that ends mid-epoch) and wait for it: no thread outlives the epoch."""
        self._finished = True
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error
