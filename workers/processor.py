"""The skeleton every per-item worker shares (compress, probe, decompress): one row per item,
whatever happens to it.

A processor fills its row stage by stage (``stages`` names where it is). Whatever goes wrong
becomes that row's ``error``, naming the stage: an ItemError as it says, any other exception
as ``<stage>: <type>: <message>``. The one exception is a storage outage (StorageUnavailable):
it is not the item's fault, so it is raised, the shard stops, the job reports it and a re-run
resumes, instead of recording good inputs as errors. This rule is written here once.

An item runs in the processor's worker thread while the caller waits up to ``timeout_s``
(``--item-timeout``). An item past it becomes an error row at the stage it was in, and the
processor is ``poisoned``: the hung thread cannot be stopped, so it is abandoned. Its
``stages`` raise ItemCancelled at its next stage boundary (so it never reaches the write
stage, unless it hung in the write itself) and whatever it returns is dropped. The shard
worker then builds a fresh processor (a fresh codec: no lock or state the hung thread holds is
shared) and, under Ray, the actor is replaced after the shard, which ends the thread with its
process.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import weakref
from typing import Any, Callable

import pyarrow as pa

from ratefit.workers.items import Item
from ratefit.workers.manifest import empty_row
from ratefit.workers.read import ItemError
from ratefit.workers.storage import StorageUnavailable, redact

log = logging.getLogger("ratefit")
DEFAULT_ITEM_TIMEOUT_S = 600.0


class ItemCancelled(BaseException):
    """Raised in an abandoned item's thread at its next stage boundary (a BaseException, so a
    codec's or storage layer's ``except Exception`` does not swallow it)."""


class Stages(list):
    """The stages an item went through (the last names where it is); once ``cancel``-led, the
    next ``append`` raises ItemCancelled, so an abandoned item stops before its next stage."""

    def __init__(self, first: str):
        super().__init__([first])
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def append(self, stage: str) -> None:
        if self.cancelled:
            raise ItemCancelled(f"item abandoned before stage {stage!r}")
        super().append(stage)


class _Attempt:
    """One item handed to the worker thread: its outcome, unless the caller gave up on it first."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.abandoned = False
        self.error: BaseException | None = None


class _ItemThread:
    """One daemon thread running a processor's items one after another (a daemon, so a hung
    item never keeps the process from exiting)."""

    def __init__(self, owner: Any):
        self.jobs: "queue.SimpleQueue[Callable[[], None] | None]" = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, args=(self.jobs,), name="ratefit-item", daemon=True)
        self.thread.start()
        weakref.finalize(owner, self.jobs.put, None)   # the thread ends with its processor

    @staticmethod
    def _loop(jobs: "queue.SimpleQueue[Callable[[], None] | None]") -> None:
        while True:
            job = jobs.get()
            if job is None:
                return
            job()
            del job   # holds its processor: let it go while waiting for the next


class ItemProcessor:
    """Subclasses set ``schema`` and implement ``process``; ``out_fs``/``out_root`` name OUTPUT."""

    schema: pa.Schema
    out_fs: Any
    out_root: str
    poisoned = False                # an item timed out: its thread may still hold the codec
    _item_thread: _ItemThread | None = None
    _timeout_s: float | None = None

    @property
    def timeout_s(self) -> float | None:
        """Seconds an item may take: ``config.item_timeout_s`` (default 600) unless set on the
        processor. A config of None (or infinity) runs items inline in the caller's thread, unbounded."""
        if self._timeout_s is not None:
            return self._timeout_s
        config = getattr(self, "config", None)
        return getattr(config, "item_timeout_s", DEFAULT_ITEM_TIMEOUT_S) if config is not None else None

    @timeout_s.setter
    def timeout_s(self, value: float | None) -> None:
        self._timeout_s = value

    def start_row(self, item: Item, row: dict[str, Any]) -> None:
        """Fields known before any work (codec, target, what was planned)."""

    def process(self, item: Item, row: dict[str, Any], stages: list[str]) -> None:
        """Do the work and fill ``row`` (status included); raise on failure."""
        raise NotImplementedError

    def failed(self, row: dict[str, Any], error: ItemError) -> None:
        """Record ``error`` in ``row``; a processor may also undo fields that no longer hold."""
        row.update(status="error", error=redact(str(error)))

    def __call__(self, item: Item, shard: int, attempt: int) -> dict[str, Any]:
        row = empty_row(self.schema)
        row.update(input_uri=redact(item.uri), attempt=attempt, shard=shard)
        self.start_row(item, row)
        stages = Stages("plan")   # the stage a failure happened in, for the row's message
        timeout = self.timeout_s
        if timeout is None or not math.isfinite(timeout):
            self._run(item, row, stages)
            return row
        return self._run_bounded(item, row, stages, timeout)

    def _run_bounded(self, item: Item, row: dict[str, Any], stages: Stages, timeout: float) -> dict[str, Any]:
        """``_run`` in the worker thread; an item past ``timeout`` seconds is given up."""
        work = dict(row)    # the thread's own row: nothing it does late can touch what is returned
        state = _Attempt()

        def job() -> None:
            error = None
            try:
                self._run(item, work, stages)
            except BaseException as e:   # ItemCancelled included: the item was given up
                error = e
            with state.lock:
                if not state.abandoned:   # else the row was already reported: drop this one
                    state.error = error
                    state.done.set()

        if self._item_thread is None:
            self._item_thread = _ItemThread(self)
        self._item_thread.jobs.put(job)
        if not state.done.wait(timeout):
            with state.lock:
                if not state.done.is_set():
                    state.abandoned = True
                    stages.cancel()
            if state.abandoned:
                self.poisoned = True
                self._item_thread = None   # it may never come back; a later item gets a new one
                late = dict(work)          # the fields the item got before it hung
                log.warning("%s: %s timed out after %g s (--item-timeout); its thread is abandoned",
                            redact(item.uri), stages[-1], timeout)
                self.failed(late, ItemError(stages[-1], f"timed out after {timeout:g} s (--item-timeout)"))
                return late
        if state.error is not None:
            raise state.error
        return work

    def _run(self, item: Item, row: dict[str, Any], stages: Stages) -> None:
        try:
            if item.error:
                raise ItemError("plan", item.error)
            self.process(item, row, stages)
        except StorageUnavailable:
            raise
        except ItemError as e:
            self.failed(row, e)
        except Exception as e:   # a codec or storage failure on this item only
            self.failed(row, ItemError(stages[-1], f"{type(e).__name__}: {e}"))
