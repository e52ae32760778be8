"""The pool of shard workers every pass runs on: Ray actors, or the same code in this process.

Written once here: how many workers and what each asks Ray for, the start-up check (a codec
that cannot be built stops the job before OUTPUT is touched), keeping a bounded number of
shards in flight per worker, retrying a failed shard (on another worker when its actor died),
replacing an actor where an item hung past ``--item-timeout`` (its shard finished without it,
``workers/actor.py``), and turning a storage outage into one resumable JobError. What a pass
is (which shards, where their parts go, what a shard that failed every attempt leaves behind)
is the runner's.

``RayPool`` is what jobs use. It follows the cluster: while shards remain it re-reads the alive
nodes (``ray.nodes()``, at most every ``REFRESH_S``) and sizes itself with ``pool_size``, a pure
function of that node list:

- **CPU codecs**: one actor (1 CPU) per CPU of the cluster. A node that joins mid-job gets
  actors; the job goes faster.
- **CUDA codecs** (``Pass.device == "cuda"``, ``gpus_per_worker`` unset): on every GPU node,
  one actor per CPU, each holding an equal share of a GPU (``num_gpus = 1/k``, k = CPUs per
  GPU, at most ``MAX_ACTORS_PER_GPU``), so CompressAI's single-threaded entropy coder runs on
  every core while the GPU does the transforms. With no GPU node in the cluster (an
  autoscaling cluster with GPU workers ``min 0``), the pool asks Ray for one GPU actor anyway
  (a pending actor is what an autoscaler scales up for) and, meanwhile, runs CPU stand-ins,
  one per CPU of the nodes without GPUs, so the job progresses. Once a GPU actor is ready the
  stand-ins get no new shards: they finish what they hold and stop (they are several times
  slower and would hold the job's last shards; the head's memory is better left to Ray). If the
  GPU nodes all leave, stand-ins start again. The pool asks for more than the cluster holds only
  while it has no GPU at all: to have an autoscaler add further nodes, give ``workers`` or
  ``min_workers``. An
  embedded Ray never gains nodes: there a CUDA codec without a GPU simply runs on CPU actors,
  with no GPU demand.
- ``gpus_per_worker`` wins: ``0`` keeps the codec on CPU actors (and asks for no GPU), ``g > 0``
  means GPU actors of ``g`` GPUs each and no CPU stand-ins (to insist on GPUs).
- ``workers`` fixes the number of actors (of each kind above): no growth; an actor that dies
  is replaced even where it then waits for room (a pending actor is demand for an autoscaler).

Only actors known ready (their ``ready()`` answered, i.e. the codec is built) get shards, so a
replacement or a demand actor that stays pending never holds work. When a node leaves, its
actors die; their shards go back to the queue and are retried on another worker
(``MAX_ATTEMPTS`` in all), and the slot is dropped unless the nodes still alive have room for
it, so the pool never keeps replacing an actor that cannot be scheduled. A retried shard
rewrites its manifest part, which is the shard's commit: nothing is lost, every item has one
row. ``min_workers`` / ``worker_wait_s`` (``--min-workers`` / ``--worker-wait``): processing
starts once that many actors are ready (CPU stand-ins count), the pool asks for at least that
many (those that do not fit are demand, so an autoscaler adds nodes for them), and a pool
without them for that long, at the start or, mid-job, without any ready worker after losing
them all, stops the job with a JobError saying what each worker asks for and what the cluster
has (resumable).

``LocalPool`` runs the very same ``ShardWorker.process`` in this
process, one shard after another: the bench's naive loop, ``JobSpec.in_process`` (small jobs,
debugging, fast tests) and anything that must not start Ray use it. It cannot replace its
process: a thread abandoned after ``--item-timeout`` lingers in it until it returns (it stops
at its next stage boundary, so it writes nothing unless it hung in the write itself; the next
items run on a fresh codec).
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Protocol, Sequence

from ratefit.cluster.connect import alive_nodes, connect, embedded
from ratefit.jobs.errors import JobError
from ratefit.workers.actor import ShardWorker
from ratefit.workers.items import Shard
from ratefit.workers.storage import StorageUnavailable, redact

log = logging.getLogger("ratefit")
MAX_ATTEMPTS = 3
IN_FLIGHT_PER_WORKER = 2
# Actors sharing one GPU at most. Each holds its own copy of the model, a CUDA context and its
# activations: about 1-2 GB of GPU memory for the learned codecs, so 8 fit a 16-24 GB GPU (T4,
# A10G, L4) with room to spare. More would trade the CPU cores they use for device memory.
MAX_ACTORS_PER_GPU = 8
REFRESH_S = 2.0   # how often (at most) the pool re-reads the cluster's nodes: one GCS call


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

    def workers_stats(self) -> dict[str, int]: ...

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


@dataclass(frozen=True)
class Sizing:
    """What the pool aims for on the cluster as it is now (``pool_size``)."""

    gpu_actors: int          # actors holding a share of a GPU (when there is no GPU yet: demand)
    gpus_per_actor: float    # ... that share
    cpu_actors: int          # actors without a GPU
    cpu_standins: bool       # the CPU actors are stand-ins: only while no GPU actor is ready


def _share(k: int) -> float:
    """1/k of a GPU, rounded down to Ray's resource granularity (0.0001) so k of them fit."""
    return math.floor(10_000 / k) / 10_000


def pool_size(nodes: Sequence[Mapping[str, float]], device: str, workers: int | None = None,
              gpus_per_worker: float | None = None, *, min_workers: int = 1, demand: bool = True) -> Sizing:
    """How many actors of each kind the cluster whose alive nodes have ``nodes`` (their total
    resources, as ``ray.nodes()`` gives them) holds for a codec that wants ``device``.

    One actor needs 1 CPU. CPU codecs (and ``gpus_per_worker == 0``): one per CPU. CUDA codecs:
    on each GPU node as many actors as it has CPUs, at most ``MAX_ACTORS_PER_GPU`` per GPU, each
    with 1/k of a GPU (k the largest such count per GPU over the GPU nodes), plus CPU stand-ins,
    one per CPU of the nodes without GPUs. With no GPU node, ``demand`` asks for one GPU actor
    anyway (an autoscaler adds a node for it; an embedded Ray, which cannot grow, says
    ``demand=False``). ``gpus_per_worker > 0``: GPU actors of that share only. ``workers``
    fixes the number of actors of each kind (stand-ins: no more than the CPUs they may use);
    without it, at least ``min_workers`` GPU actors (CPU actors for CPU codecs) are asked for,
    whether they fit or not: those that do not are an autoscaler's demand.
    """
    cpus = [int(n.get("CPU", 0) + 1e-9) for n in nodes]
    gpus = [float(n.get("GPU", 0)) for n in nodes]
    total_cpus = sum(cpus)
    if gpus_per_worker == 0 or (gpus_per_worker is None and device != "cuda"):
        return Sizing(0, 0.0, workers or max(min_workers, total_cpus), False)
    if gpus_per_worker is not None:   # the spec's share: as many as the GPUs and CPUs hold
        fit = sum(min(c, int(g / gpus_per_worker + 1e-9)) for c, g in zip(cpus, gpus))
        return Sizing(workers or max(min_workers, fit), gpus_per_worker, 0, False)
    gpu_nodes = [(c, g) for c, g in zip(cpus, gpus) if g > 0]
    standin_cpus = sum(c for c, g in zip(cpus, gpus) if g <= 0)
    if not gpu_nodes and not demand:   # nothing can join: the codec runs on CPU actors
        return Sizing(0, 0.0, workers or max(min_workers, total_cpus), False)
    k = min(MAX_ACTORS_PER_GPU, max([max(1, int(c / g + 1e-9)) for c, g in gpu_nodes], default=MAX_ACTORS_PER_GPU))
    fit = sum(min(c, int(g * k + 1e-9)) for c, g in gpu_nodes)
    standins = min(workers, standin_cpus) if workers else standin_cpus
    return Sizing(workers or max(min_workers, fit), _share(k), standins, True)


@dataclass(eq=False)
class _Slot:
    """One actor of the pool: pending until its ``ready()`` answers, then it takes shards."""

    actor: Any
    gpus: float              # its share of a GPU (0: a CPU actor)
    ready_ref: Any = None    # its ready() call, until it answers
    ready: bool = False
    node: str | None = None  # the node it runs on, once ready
    busy: int = 0            # shards in flight on it

    @property
    def kind(self) -> str:
        return "gpu" if self.gpus > 0 else "cpu"


def _asks(kind: str, gpus: float) -> str:
    return f"1 CPU + {gpus:g} GPU" if kind == "gpu" else "1 CPU"


class RayPool:
    """Shard workers as Ray actors, following the cluster; started (and checked) on construction:
    it returns once ``min_workers`` actors are ready (see the module's docstring)."""

    def __init__(self, config: Any, device: str, storage_retry_s: float, address: str | None = None,
                 workers: int | None = None, gpus_per_worker: float | None = None, min_workers: int = 1,
                 worker_wait_s: float = 600.0):
        import ray

        self.retried = 0
        self._config, self._retry_s = config, storage_retry_s
        self._device, self._workers, self._gpus_per_worker = device, workers, gpus_per_worker
        self._min_workers, self._wait_s = min_workers, worker_wait_s
        self._slots: list[_Slot] = []
        self._pending: dict[Any, _Slot] = {}      # ready() refs of the actors not ready yet
        self._draining: list[_Slot] = []          # dropped slots still finishing shards sent to them
        self._in_flight: dict[Any, tuple[_Slot, Shard, int]] = {}
        self._broken: dict[str, str] = {}         # kind -> why its actors could not be built
        self._nodes: list[tuple[str, dict[str, float]]] = []
        self._sizing = Sizing(0, 0.0, 0, False)
        self._refreshed = -math.inf
        self._processing = False
        self._winding_down = False   # every shard is out: no more actors are worth starting
        self._stats = {"started": 0, "peak": 0, "gpu": 0}
        self._started = connect(address)
        # The pool restarts actors itself (a fresh one replaces a dead one), so it always
        # knows which attempt a shard is on.
        self._cls = ray.remote(ShardWorker)
        try:
            self._demand = not embedded()   # an embedded Ray never gains a node: no GPU demand there
            self._refresh(force=True)
            if self._sizing.cpu_standins and not any(r.get("GPU", 0) > 0 for _, r in self._nodes):
                log.warning("no GPU in the cluster yet: asking Ray for a GPU worker (an autoscaler adds a GPU "
                            "node for it) and running %d CPU worker(s) meanwhile", self._sizing.cpu_actors)
            self._wait_for_workers(min_workers, stalled=False)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ actors
    def _new_slot(self, gpus: float) -> None:
        actor = self._cls.options(num_cpus=1, num_gpus=gpus, max_restarts=0,
                                  max_task_retries=0).remote(self._config, self._retry_s)
        slot = _Slot(actor, gpus, actor.ready.remote())
        self._pending[slot.ready_ref] = slot
        self._slots.append(slot)

    def _retire(self, slot: _Slot) -> None:
        """Stop ``slot``'s actor once the shards in flight on it are back (they finish there)."""
        import ray

        if slot.busy:
            if not any(s is slot for s in self._draining):
                self._draining.append(slot)
            return
        self._draining = [s for s in self._draining if s is not slot]
        try:
            ray.kill(slot.actor)
        except Exception:
            pass

    def _drop(self, slot: _Slot) -> None:
        if any(s is slot for s in self._slots):
            self._slots = [s for s in self._slots if s is not slot]
            self._pending.pop(slot.ready_ref, None)
            self._retire(slot)

    def _ready_slots(self) -> list[_Slot]:
        return [s for s in self._slots if s.ready]

    def _refresh(self, force: bool = False) -> None:
        """Re-read the cluster (at most every REFRESH_S unless ``force``) and add or drop actors
        so the pool matches what it can hold now."""
        now = time.monotonic()
        if not force and now - self._refreshed < REFRESH_S:
            return
        self._refreshed = now
        self._nodes = alive_nodes()
        alive = {node for node, _ in self._nodes}
        for slot in [s for s in self._slots if s.ready and s.node is not None and s.node not in alive]:
            log.warning("a node left the cluster: dropping its worker (its shards are retried elsewhere)")
            self._drop(slot)
        gpus_per_worker = self._gpus_per_worker
        if "gpu" in self._broken and "cpu" not in self._broken and gpus_per_worker is None:
            gpus_per_worker = 0.0   # GPU workers cannot start: the codec runs on CPU actors everywhere
        self._sizing = sizing = pool_size([r for _, r in self._nodes], self._device, self._workers,
                                          gpus_per_worker, min_workers=self._min_workers, demand=self._demand)
        targets = {"gpu": sizing.gpu_actors, "cpu": sizing.cpu_actors}
        if sizing.cpu_standins:
            if any(s.ready and s.kind == "gpu" for s in self._slots):
                targets["cpu"] = 0   # GPU workers are up: the CPU stand-ins finish their shards and stop
            elif any(r.get("GPU", 0) > 0 for _, r in self._nodes):
                # A GPU node is there, its workers are starting: keep the stand-ins that run, start no more.
                targets["cpu"] = min(targets["cpu"], sum(s.kind == "cpu" for s in self._slots))
        for kind in self._broken:
            targets[kind] = 0
        for kind, target in targets.items():
            mine = [s for s in self._slots if s.kind == kind]
            if len(mine) < target:
                log.info("the cluster has room for %d more %s worker(s)", target - len(mine), kind.upper())
                for _ in range(target - len(mine)):
                    self._new_slot(sizing.gpus_per_actor if kind == "gpu" else 0.0)
            elif len(mine) > target:
                # Pending ones first: they hold no shard. Ready ones go only when none of this
                # kind is wanted (the stand-ins once GPU workers are up).
                surplus = mine if target == 0 else [s for s in reversed(mine) if not s.ready][:len(mine) - target]
                if target == 0 and kind == "cpu" and sizing.cpu_standins and any(s.ready for s in surplus):
                    log.warning("GPU workers are ready: the %d CPU worker(s) finish their shards and stop",
                                sum(s.ready for s in surplus))
                for slot in surplus:
                    self._drop(slot)

    def _on_ready(self, ref: Any) -> None:
        """A pending actor's ready() answered: it takes shards now, or it could not start."""
        import ray
        from ray.exceptions import RayActorError, RayError

        slot = self._pending.pop(ref, None)
        if slot is None or not any(s is slot for s in self._slots):
            return   # dropped meanwhile
        try:
            slot.node = ray.get(ref)
        except RayError as e:
            self._drop(slot)
            if isinstance(e, RayActorError) and e.actor_init_failed:
                reason = _creation_error(e)
                if not self._processing:   # the codec cannot be built: stop before OUTPUT is touched
                    raise JobError(f"the workers could not start: {reason}") from None
                log.warning("a %s worker could not start (%s); no more of them are started", slot.kind.upper(),
                            reason)
                self._broken[slot.kind] = reason
                self._refresh(force=True)
                if not self._slots:
                    raise JobError(f"no worker can start any more: {reason}. Every committed shard stays "
                                   "committed: re-run the same command to resume") from None
            else:   # its node went before it was ready
                log.warning("a worker was lost before it was ready (%s)", type(e).__name__)
                self._refresh(force=True)
            return
        slot.ready = True
        ready = self._ready_slots()
        self._stats["peak"] = max(self._stats["peak"], len(ready))
        self._stats["gpu"] = max(self._stats["gpu"], sum(s.kind == "gpu" for s in ready))
        if self._processing:
            log.info("a %s worker joined the pool (%d ready)", slot.kind.upper(), len(ready))
        if not self._winding_down:
            self._refresh(force=slot.kind == "gpu" and self._sizing.cpu_standins)

    def _wait_message(self, wanted: int, stalled: bool) -> str:
        have: dict[str, float] = {}
        for _, resources in self._nodes:
            for name in ("CPU", "GPU"):
                have[name] = have.get(name, 0.0) + resources.get(name, 0.0)
        kinds = sorted({s.kind: s.gpus for s in self._slots}.items()) or [("cpu", 0.0)]
        asks = " or ".join(f"{_asks(k, g)} ({k.upper()} workers)" for k, g in kinds)
        cluster = ", ".join(f"{v:g} {k}" for k, v in have.items()) or "nothing"
        ready = len(self._ready_slots())
        if stalled:
            head = (f"no worker was ready for {self._wait_s:g} s (--worker-wait) after the job lost its workers; "
                    "every committed shard stays committed: re-run the same command once the cluster has room")
        else:
            head = (f"only {ready} of {wanted} workers (--min-workers) were ready after {self._wait_s:g} s "
                    "(--worker-wait)")
        return (f"{head}. Each worker asks for {asks}; the cluster's {len(self._nodes)} alive node(s) have "
                f"{cluster} in all. Add nodes that fit (an autoscaler adds them for pending workers), "
                "lower --min-workers, or raise --worker-wait")

    def _wait_for_workers(self, wanted: int, stalled: bool) -> None:
        """Wait until ``wanted`` actors are ready, following the cluster meanwhile; JobError past
        ``worker_wait_s``."""
        import ray

        deadline = time.monotonic() + self._wait_s
        while len(self._ready_slots()) < wanted:
            left = deadline - time.monotonic()
            if left <= 0:
                raise JobError(self._wait_message(wanted, stalled))
            self._refresh()
            if self._pending:
                done, _ = ray.wait(list(self._pending), num_returns=1, timeout=min(REFRESH_S, left))
                for ref in done:
                    self._on_ready(ref)
            else:
                time.sleep(min(REFRESH_S, left))

    # ------------------------------------------------------------------ shards
    def _free_slot(self) -> _Slot | None:
        free = [s for s in self._slots if s.ready and s.busy < IN_FLIGHT_PER_WORKER]
        return min(free, key=lambda s: (s.busy, s.kind != "gpu")) if free else None

    def _submit(self, slot: _Slot, shard: Shard, attempt: int) -> None:
        if not self._processing:
            self._processing = True
            self._stats["started"] = len(self._ready_slots())
        ref = slot.actor.process.remote(shard, attempt)
        slot.busy += 1
        self._in_flight[ref] = (slot, shard, attempt)

    def _collect(self, ref: Any, retry: deque[tuple[Shard, int]]) -> Done | None:
        """The end of one shard attempt: Done, or None when it is queued again."""
        import ray
        from ray.exceptions import RayActorError, RayError

        slot, shard, attempt = self._in_flight.pop(ref)
        slot.busy -= 1
        for old in list(self._draining):   # ... stopped once their last shard is back
            self._retire(old)
        mine = any(s is slot for s in self._slots)
        try:
            summary = ray.get(ref)
        except StorageUnavailable as e:
            raise _outage(shard, e) from None
        except RayError as e:
            reason = redact(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            if isinstance(e, RayActorError) and mine:
                log.warning("worker for shard %d died (%s)", shard.index, reason)
                self._drop(slot)
                self._refresh(force=True)   # a replacement where the cluster still has room for one
            if attempt >= MAX_ATTEMPTS:
                return Done(shard, attempt, failure=f"failed {attempt} times: {reason}")
            log.warning("shard %d attempt %d failed (%s); retrying", shard.index, attempt, reason)
            self.retried += 1
            retry.append((shard, attempt + 1))
            return None
        if summary.get("replace_actor") and mine:   # an item hung there past --item-timeout
            log.warning("an item of shard %d hung past --item-timeout; replacing its worker", shard.index)
            self._drop(slot)
            if not self._winding_down:
                self._refresh(force=True)
        return Done(shard, attempt, summary=summary)

    def run(self, shards: Iterable[Shard]) -> Iterator[Done]:
        """Process ``shards``, yielding each as it ends (in completion order)."""
        import ray

        retry: deque[tuple[Shard, int]] = deque()   # attempts to make again, before new shards
        source = iter(shards)
        exhausted = False
        while True:
            slot = self._free_slot()
            while slot is not None:   # fill the ready workers: retries first, then new shards
                if retry:
                    self._submit(slot, *retry.popleft())
                elif not exhausted and (shard := next(source, None)) is not None:
                    self._submit(slot, shard, 1)
                else:
                    exhausted = True
                    break
                slot = self._free_slot()
            work_left = bool(retry) or not exhausted
            self._winding_down = not work_left
            if not work_left and not self._in_flight:
                return
            if not self._in_flight:   # work waits and no worker is ready
                self._wait_for_workers(1, stalled=True)
                continue
            if work_left:
                self._refresh()   # nodes that joined get actors while there is work for them
            done, _ = ray.wait(list(self._in_flight) + list(self._pending), num_returns=1, timeout=REFRESH_S)
            for ref in done:
                if ref in self._pending:
                    self._on_ready(ref)
                elif ref in self._in_flight:
                    result = self._collect(ref, retry)
                    if result is not None:
                        yield result

    def workers_stats(self) -> dict[str, int]:
        """Ready workers when the first shard went out, the most ready at once, and the most
        GPU workers ready at once (0: everything ran on CPU actors)."""
        return dict(self._stats)

    def close(self) -> None:
        import ray

        for slot in self._slots + self._draining:
            try:
                ray.kill(slot.actor)
            except Exception:
                pass
        self._slots, self._draining, self._pending, self._in_flight = [], [], {}, {}
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

    def workers_stats(self) -> dict[str, int]:
        return {"started": 1, "peak": 1, "gpu": 0}

    def close(self) -> None:
        pass


def open_pool(config: Any, device: str, *, in_process: bool, storage_retry_s: float, address: str | None = None,
              workers: int | None = None, gpus_per_worker: float | None = None, min_workers: int = 1,
              worker_wait_s: float = 600.0) -> Pool:
    """The pool a pass runs on: in this process when asked, else Ray actors."""
    if in_process:
        return LocalPool(config, storage_retry_s)
    return RayPool(config, device, storage_retry_s, address, workers, gpus_per_worker, min_workers, worker_wait_s)
