"""Decode the next batch in threads while the current one runs through the network."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from retrain.devices import decode_workers

T = TypeVar("T")
R = TypeVar("R")


def decode_ahead(
    items: Sequence[T], decode: Callable[[T], R], batch_size: int, workers: int | None = None
) -> Iterator[tuple[int, list[T], list[R]]]:
    """Yield ``(start, items[start:start + batch_size], their decoded values)`` batch after batch, in order.

    At most two batches are decoded or in flight at once, so memory stays at two batches of pixels.
    An exception raised by ``decode`` comes out of the iteration.
    """
    starts = range(0, len(items), batch_size)
    with ThreadPoolExecutor(decode_workers(workers), thread_name_prefix="retrain-decode") as pool:
        ahead = [pool.submit(decode, item) for item in items[:batch_size]]
        for start in starts:
            futures = ahead
            nxt = items[start + batch_size : start + 2 * batch_size]
            ahead = [pool.submit(decode, item) for item in nxt]
            yield start, list(items[start : start + batch_size]), [f.result() for f in futures]
