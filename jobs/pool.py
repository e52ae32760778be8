"""The pool of shard workers every pass runs on: Ray actors, or the same code in this process.

Written once here: how many workers and what each asks Ray for, the start-up check (a codec
that cannot be built stops the job before OUTPUT is touched), keeping a bounded number of
shards in flight per worker, retrying a failed shard (on a fresh actor when its actor died),
replacing an actor where an item hung past ``--item-timeout`` (its shard finished without it,
``workers/actor.py``), and turning a storage outage into one resumable JobError. What a pass
is (which shards, where their parts go, what a shard that failed every attempt leaves behind)
is the runner's.

``RayPool`` is what jobs use. ``LocalPool`` runs the very same ``ShardWorker.process`` in this
process, one shard after another: the bench's naive loop, ``JobSpec.in_process`` (small jobs,
debugging, fast tests) and anything that must not start Ray use it. It cannot replace its
process: a thread abandoned after ``--item-timeout`` lingers in it until it returns (it stops
at its next stage boundary, so it writes nothing unless it hung in the write itself; the next
items run on a fresh codec).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Protocol

from ratefit.cluster.connect import cluster_cpus, cluster_gpus, connect
from ratefit.jobs.errors import JobError
from ratefit.workers.actor import ShardWorker
from ratefit.workers.items import Shard
from ratefit.workers.storage import StorageUnavailable, redact

log = logging.getLogger("ratefit")
MAX_ATTEMPTS = 3
IN_FLIGHT_PER_WORKER = 2


@dataclass
class Done:
    """One shard at the end of its attempts: the worker's summary, or why every attempt failed."""

    shard: Shard
    attempts: int
    summary: dict[str, Any] | None = None
    failure: str | None = None


class Pool(Protocol):
    retried: int   # shard attempts retried so far

    def run(self, shards: Iterable[Shard]) -> Iterator[Done]: ...

    def close(self) -> None: ...


def _outage(shard: Shard, e: StorageUnavailable) -> JobError:
    # Not the items' fault: stop rather than record an outage as bad items. Every committed
    # shard stays committed, so the same command resumes.
    cause = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    return JobError(f"shard {shard.index}: {cause}. Nothing is lost: re-run the same "
                    "command once the store answers, and the job resumes")


def _creation_error(e: BaseException) -> str:
    """The exception line of an actor's failed constructor (Ray wraps it in a traceback)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^[\w.]+(Error|Exception): ", line):
            return redact(re.sub(r"^(?:[a-z_]\w*\.)+(?=[A-Z])", "", line))
    return redact(lines[-1] if lines else type(e).__name__)


def pool_size(device: str, workers: int | None, gpus_per_worker: float | None) -> tuple[int, float]:
    """(workers, GPUs per worker): one per GPU for a codec that prefers CUDA on a cluster with
    GPUs, else one per CPU; ``workers``/``gpus_per_worker`` from the spec win."""
    gpus = gpus_per_worker
    if gpus is None:
        gpus = 1.0 if device == "cuda" and cluster_gpus() >= 1 else 0.0
    n = workers or (int(cluster_gpus() // gpus) if gpus > 0 else int(cluster_cpus()))
    return max(1, n), gpus


@dataclass
class _Slot:
    actor: Any
    busy: int = 0


class RayPool:
    """Shard workers as Ray actors; started (and checked) on construction."""

    def __init__(self, config: Any, device: str, storage_retry_s: float, address: str | None = None,
                 workers: int | None = None, gpus_per_worker: float | None = None):
        import ray
        from ray.exceptions import RayActorError

        self.retried = 0
        self._config, self._retry_s = config, storage_retry_s
        self._started = connect(address)
        self._slots: list[_Slot] = []
        self._draining: list[Any] = []   # replaced actors still finishing shards sent to them
        try:
            n, gpus = pool_size(device, workers, gpus_per_worker)
            # The pool restarts actors itself (a fresh one replaces a dead one), so it always
            # knows which attempt a shard is on and never loses capacity.
            self._cls = ray.remote(ShardWorker).options(num_cpus=1, num_gpus=gpus, max_restarts=0,
                                                        max_task_retries=0)
            self._slots = [_Slot(self._new_actor()) for _ in range(n)]
            try:   # the workers build the codec: one that cannot be built stops the job here
                ray.get(self._slots[0].actor.ready.remote())
            except RayActorError as e:
                raise JobError(f"the workers could not start: {_creation_error(e)}") from None
        except BaseException:
            self.close()
            raise

    def _new_actor(self) -> Any:
        return self._cls.remote(self._config, self._retry_s)

    def run(self, shards: Iterable[Shard]) -> Iterator[Done]:
        """Process ``shards``, yielding each as it ends (in completion order)."""
        import ray
        from ray.exceptions import RayActorError, RayError

        in_flight: dict[Any, tuple[_Slot, Any, Shard, int]] = {}

        def submit(slot: _Slot, shard: Shard, attempt: int) -> None:
            ref = slot.actor.process.remote(shard, attempt)
            slot.busy += 1
            in_flight[ref] = (slot, slot.actor, shard, attempt)

        def retire(actor: Any) -> None:
            # Its shards in flight finish first (their items run on a fresh codec there).
            if not any(a is actor for _, a, _, _ in in_flight.values()):
                self._draining = [a for a in self._draining if a is not actor]
                try:
                    ray.kill(actor)
                except Exception:
                    pass
            elif not any(a is actor for a in self._draining):
                self._draining.append(actor)

        def collect_one() -> Done | None:
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            slot, actor, shard, attempt = in_flight.pop(ready[0])
            slot.busy -= 1
            for old in list(self._draining):   # ... killed once their last shard is back
                retire(old)
            try:
                summary = ray.get(ready[0])
                if summary.get("replace_actor"):   # an item hung there past --item-timeout
                    if slot.actor is actor:
                        log.warning("an item of shard %d hung past --item-timeout; replacing its worker",
                                    shard.index)
                        slot.actor = self._new_actor()
                    retire(actor)
                return Done(shard, attempt, summary=summary)
            except StorageUnavailable as e:
                raise _outage(shard, e) from None
            except RayError as e:
                reason = redact(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                if isinstance(e, RayActorError) and slot.actor is actor:
                    log.warning("worker for shard %d died (%s); starting a new one", shard.index, reason)
                    slot.actor = self._new_actor()
                if attempt >= MAX_ATTEMPTS:
                    return Done(shard, attempt, failure=f"failed {attempt} times: {reason}")
                log.warning("shard %d attempt %d failed (%s); retrying", shard.index, attempt, reason)
                self.retried += 1
                submit(min(self._slots, key=lambda s: s.busy), shard, attempt + 1)
                return None

        for shard in shards:
            while True:
                slot = min(self._slots, key=lambda s: s.busy)
                if slot.busy < IN_FLIGHT_PER_WORKER:
                    break
                done = collect_one()
                if done is not None:
                    yield done
            submit(slot, shard, 1)
        while in_flight:
            done = collect_one()
            if done is not None:
                yield done

    def close(self) -> None:
        import ray

        for actor in [slot.actor for slot in self._slots] + self._draining:
            try:
                ray.kill(actor)
            except Exception:
                pass
        self._slots, self._draining = [], []
        if self._started:
            ray.shutdown()
            self._started = False


class LocalPool:
    """The same shard code without Ray: one worker in this process, shards in order."""

    def __init__(self, config: Any, storage_retry_s: float):
        self.retried = 0
        self._config, self._retry_s = config, storage_retry_s
        self._worker = self._new_worker()

    def _new_worker(self) -> ShardWorker:
        try:
            return ShardWorker(self._config, self._retry_s)
        except StorageUnavailable:
            raise
        except Exception as e:   # as an actor's failed constructor: the job stops, OUTPUT untouched
            raise JobError(f"the workers could not start: {redact(f'{type(e).__name__}: {e}')}") from None

    def run(self, shards: Iterable[Shard]) -> Iterator[Done]:
        for shard in shards:
            attempt = 1
            while True:
                try:
                    summary = self._worker.process(shard, attempt)
                except StorageUnavailable as e:
                    raise _outage(shard, e) from None
                except Exception as e:   # a crash in the shard code itself: a fresh worker tries again
                    reason = redact(f"{type(e).__name__}: {e}")
                    if attempt >= MAX_ATTEMPTS:
                        yield Done(shard, attempt, failure=f"failed {attempt} times: {reason}")
                        break
                    log.warning("shard %d attempt %d failed (%s); retrying", shard.index, attempt, reason)
                    self.retried += 1
                    attempt += 1
                    self._worker = self._new_worker()
                    continue
                yield Done(shard, attempt, summary=summary)
                break

    def close(self) -> None:
        pass


def open_pool(config: Any, device: str, *, in_process: bool, storage_retry_s: float, address: str | None = None,
              workers: int | None = None, gpus_per_worker: float | None = None) -> Pool:
    """The pool a pass runs on: in this process when asked, else Ray actors."""
    if in_process:
        return LocalPool(config, storage_retry_s)
    return RayPool(config, device, storage_retry_s, address, workers, gpus_per_worker)
