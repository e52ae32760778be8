"""Reading a shard's items ahead of the one being compressed, in one background thread.

Fetching an input and decoding it (zlib, libjpeg, libavif) release the GIL, so while the
item in hand is in the codec, the next ones are read: the model never waits on storage after
the shard's first item. At most ``depth`` items are read ahead (bounded memory: a shard of
thousands of items never sits decoded in memory at once), and each read's outcome, an image
or the error it raised, is handed to its own item, so a bad input still fails only its row.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Generic, Sequence, TypeVar

from ratefit.workers.items import Item

T = TypeVar("T")


class ReadAhead(Generic[T]):
    """``read(item)`` for the items of one shard, up to ``depth`` ahead of the last taken."""

    def __init__(self, read: Callable[[Item], T], items: Sequence[Item], depth: int):
        self._read, self._items, self._depth = read, list(items), max(1, depth)
        self._index = {id(item): i for i, item in enumerate(self._items)}
        self._futures: dict[int, Future[T]] = {}
        self._submitted = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ratefit-read")

    def position(self, item: Item) -> int | None:
        return self._index.get(id(item))

    def _fill(self, upto: int) -> None:
        while self._submitted < min(upto, len(self._items)):
            i = self._submitted
            self._futures[i] = self._pool.submit(self._read, self._items[i])
            self._submitted += 1

    def peek(self, i: int) -> T:
        """Item ``i``'s read (waiting for it), left in place for its own ``take``."""
        self._fill(i + 1)
        return self._futures[i].result()

    def take(self, item: Item) -> tuple[bool, T | None]:
        """(True, its read) for an item of this shard, reading the next ones meanwhile; (False,
        None) for any other item (the caller reads it itself)."""
        i = self.position(item)
        if i is None or i not in self._futures and i < self._submitted:
            return False, None
        self._fill(i + 1 + self._depth)
        result = self._futures.pop(i).result()
        return True, result

    def __len__(self) -> int:
        return len(self._items)

    def item(self, i: int) -> Item | None:
        return self._items[i] if 0 <= i < len(self._items) else None

    def close(self) -> None:
        """Stop reading ahead (reads in flight finish in the background; nothing waits on them)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._futures.clear()
