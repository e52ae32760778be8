"""Device memory: an item that does not fit is retried alone with smaller tiles.

A worker holds one codec for many items; one huge image must not take the worker down or
make every later item pay for it. Codecs that tile (capability ``tiles``: a ``tile`` in pixels) get
half the tile size per retry, down to MIN_TILE, and their own size back afterwards.
"""

from __future__ import annotations

import gc
import logging
from typing import Any, Callable, TypeVar

from ratefit.codecs.base import capabilities_of
from ratefit.workers.storage import redact

log = logging.getLogger("ratefit")
T = TypeVar("T")
MIN_TILE = 256    # smallest tile an out-of-memory retry goes down to (pixels)
TILE_STEP = 64    # tiles are whole multiples of the learned codecs' padding


def is_out_of_memory(error: BaseException) -> bool:
    """A device (GPU) allocation failure, as torch raises it."""
    return type(error).__name__ == "OutOfMemoryError" or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


def release_device_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass


def with_tile_fallback(codec: Any, work: Callable[[], T], largest_side: int, what: str) -> T:
    """Run ``work``; on out-of-memory, shrink ``codec.tile`` and run it again.

    Without tiles to shrink (a codec that does not tile, or MIN_TILE reached), the error
    stands, for this item only.
    """
    tile0 = codec.tile if capabilities_of(codec).tiles else None
    try:
        while True:
            try:
                return work()
            except Exception as e:
                if not is_out_of_memory(e) or tile0 is None:
                    raise
                smaller = ((codec.tile or largest_side) // 2) // TILE_STEP * TILE_STEP
                if smaller < MIN_TILE:
                    raise
                release_device_memory()
                log.warning("%s: out of memory on the device (%s); retrying it alone with %d px tiles",
                            redact(what), type(e).__name__, smaller)
                codec.tile = smaller
    finally:
        if tile0 is not None:
            codec.tile = tile0
