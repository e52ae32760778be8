"""Run a planned job over a pool of shard actors: resume, retries, progress, finish.

The driver only ever holds the shards in flight plus, per planned shard, its size and a
fingerprint of its inputs. After the last shard it checks every planned shard against its
committed manifest part (same count, same inputs, so every item has exactly one row) and
only then writes ``_SUCCESS``.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Iterator


from ratefit.cluster.connect import cluster_cpus, cluster_gpus, connect
from ratefit.jobs.progress import Progress
from ratefit.jobs.spec import JobSpec
from ratefit.workers.actor import ShardWorker
from ratefit.workers.items import Shard
from ratefit.workers.manifest import (MANIFEST_DIR, committed_rows, existing_parts, parquet_table, part_name,
                                     part_stats, shard_fingerprint, write_part)
from ratefit.workers.storage import (StorageUnavailable, atomic_write, fetch, open_fs, redact, set_retry_window,
                                     with_retries)

log = logging.getLogger("ratefit")
JOB_RECORD = "_ratefit_job.json"
SUCCESS = "_SUCCESS"
PLAN_DIR = "_plan"   # a budget job's probes, allocation and correction pass
MAX_ATTEMPTS = 3
IN_FLIGHT_PER_WORKER = 2


class JobError(RuntimeError):
    """The job could not complete; the message says why and what to do."""


def ratefit_version() -> str:
    try:
        return version("ratefit")
    except PackageNotFoundError:
        return "unknown"


@dataclass
class _Planned:
    count: int
    fingerprint: str


@dataclass
class _Slot:
    actor: Any
    busy: int = 0


@dataclass
class RunState:
    planned: dict[int, _Planned] = field(default_factory=dict)
    # part_stats of the parts committed during this pass (as their workers reported them);
    # finish reads back only the others. Clear it when parts are rewritten afterwards.
    stats: dict[int, dict[str, Any]] = field(default_factory=dict)
    resumed_shards: int = 0
    retried_shards: int = 0
    failed_shards: int = 0


def prepare_output(spec: JobSpec, fs, root: str) -> None:
    record_path = f"{root}/{JOB_RECORD}"
    manifest = f"{root}/{MANIFEST_DIR}"
    fs.invalidate_cache(root)
    if spec.overwrite:
        for path in (manifest, f"{root}/{PLAN_DIR}", f"{root}/{SUCCESS}", record_path):
            if fs.exists(path):
                fs.rm(path, recursive=True)
    elif fs.exists(record_path):
        old = json.loads(fs.cat_file(record_path))
        if old.get("spec_hash") != spec.spec_hash():
            raise JobError(
                f"{redact(spec.output)} already holds a different {old.get('kind', 'ratefit')} job "
                f"(spec hash {old.get('spec_hash', '?')[:12]}, this one {spec.spec_hash()[:12]}); "
                "use --overwrite to start over, or another OUTPUT")
    elif existing_parts(fs, manifest):
        raise JobError(f"{redact(spec.output)}/{MANIFEST_DIR} holds parts of an unknown job; "
                       "use --overwrite to start over, or another OUTPUT")
    record = {"kind": spec.kind, "spec_hash": spec.spec_hash(), "ratefit_version": ratefit_version(),
              "spec": spec.to_dict(redacted=True)}
    atomic_write(fs, record_path, json.dumps(record, indent=2).encode())


def _creation_error(e: Exception) -> str:
    """The exception line of an actor's failed constructor (Ray wraps it in a traceback)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^[\w.]+(Error|Exception): ", line):
            return redact(re.sub(r"^(?:[a-z_]\w*\.)+(?=[A-Z])", "", line))
    return redact(lines[-1] if lines else type(e).__name__)


def _failed_rows(shard: Shard, schema, attempt: int, reason: str) -> list[dict]:
    rows = []
    for item in shard.items:
        row = {name: None for name in schema.names}
        row.update(input_uri=redact(item.uri), status="error", attempt=attempt, shard=shard.index,
                   error=redact(f"worker: {reason}"))
        rows.append(row)
    return rows


def run_shards(spec: JobSpec, shards: Iterator[Shard], worker_config: Any, schema,
               codec_device: str = "cpu") -> dict[str, Any]:
    """Process ``shards`` on a pool of ShardWorker actors and finish the job."""
    t_start = time.time()
    state = run_pass(spec, shards, worker_config, schema, codec_device)
    fs, root = open_fs(spec.output, spec.storage_options)
    return finish(spec, fs, root, state, time.time() - t_start)


def run_pass(spec: JobSpec, shards: Iterator[Shard], worker_config: Any, schema, codec_device: str = "cpu",
             manifest_dir: str = MANIFEST_DIR, label: str | None = None) -> RunState:
    """Process ``shards`` until each has a committed part under ``OUTPUT/manifest_dir``.

    One pass of a job: a plain job has one; a budget job has a probe pass, the encode pass
    and a correction pass, each with its own parts folder (so each resumes on its own).
    ``worker_config.manifest_dir`` must name the same folder.
    """
    import ray
    from ray.exceptions import RayActorError, RayError

    set_retry_window(spec.storage_retry_s)
    fs, root = open_fs(spec.output, spec.storage_options)
    manifest_root = f"{root}/{manifest_dir}"
    started = connect(spec.address)
    state = RunState()
    progress = Progress(spec.progress, label or ("compress" if spec.kind == "compress" else "decompress"))
    slots: list[_Slot] = []
    try:
        gpus = spec.gpus_per_worker
        if gpus is None:
            gpus = 1.0 if codec_device == "cuda" and cluster_gpus() >= 1 else 0.0
        n_workers = spec.workers or (int(cluster_gpus() // gpus) if gpus > 0 else int(cluster_cpus()))
        n_workers = max(1, n_workers)
        # The driver restarts actors itself (a fresh one replaces a dead one), so it always
        # knows which attempt a shard is on and never loses capacity.
        remote_cls = ray.remote(ShardWorker).options(num_cpus=1, num_gpus=gpus, max_restarts=0, max_task_retries=0)
        slots = [_Slot(remote_cls.remote(worker_config, spec.storage_retry_s)) for _ in range(n_workers)]
        try:   # the workers build the codec: one that cannot be built stops the job here, OUTPUT untouched
            ray.get(slots[0].actor.ready.remote())
        except RayActorError as e:
            raise JobError(f"the workers could not start: {_creation_error(e)}") from None
        with_retries(lambda: prepare_output(spec, fs, root), f"prepare {redact(spec.output)}")
        done = existing_parts(fs, manifest_root)
        in_flight: dict[Any, tuple[_Slot, Any, Shard, int]] = {}

        def submit(slot: _Slot, shard: Shard, attempt: int) -> None:
            ref = slot.actor.process.remote(shard, attempt)
            slot.busy += 1
            in_flight[ref] = (slot, slot.actor, shard, attempt)

        def collect_one() -> None:
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            ref = ready[0]
            slot, actor, shard, attempt = in_flight.pop(ref)
            slot.busy -= 1
            try:
                summary = ray.get(ref)
                state.stats[shard.index] = summary["stats"]
                progress.advance(summary["items"], summary["input_bytes"])
            except StorageUnavailable as e:
                # Not the items' fault: stop rather than record an outage as bad items.
                # Every committed shard stays committed, so the same command resumes.
                cause = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                raise JobError(f"shard {shard.index}: {cause}. Nothing is lost: re-run the same "
                               "command once the store answers, and the job resumes") from None
            except RayError as e:
                reason = redact(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                if isinstance(e, RayActorError) and slot.actor is actor:
                    log.warning("worker for shard %d died (%s); starting a new one", shard.index, reason)
                    slot.actor = remote_cls.remote(worker_config, spec.storage_retry_s)
                if attempt < MAX_ATTEMPTS:
                    log.warning("shard %d attempt %d failed (%s); retrying", shard.index, attempt, reason)
                    state.retried_shards += 1
                    submit(min(slots, key=lambda s: s.busy), shard, attempt + 1)
                else:
                    state.failed_shards += 1
                    # A part committed before the failures (they came after it) stands.
                    rows = committed_rows(fs, manifest_root, shard.index)
                    if rows is None:
                        rows = _failed_rows(shard, schema, attempt, f"failed {attempt} times: {reason}")
                        write_part(fs, manifest_root, shard.index, rows, schema)
                    state.stats[shard.index] = part_stats(rows)
                    progress.advance(len(shard.items), 0)

        for shard in shards:
            uris = [redact(item.uri) or "" for item in shard.items]
            state.planned[shard.index] = _Planned(len(uris), shard_fingerprint(uris))
            if shard.index in done:
                state.resumed_shards += 1
                progress.advance(len(shard.items), 0)
                continue
            while True:
                slot = min(slots, key=lambda s: s.busy)
                if slot.busy < IN_FLIGHT_PER_WORKER:
                    break
                collect_one()
            submit(slot, shard, 1)
        while in_flight:
            collect_one()
    finally:
        progress.close()
        for slot in slots:
            try:
                ray.kill(slot.actor)
            except Exception:
                pass
        if started:
            ray.shutdown()
    return state


def finish(spec: JobSpec, fs, root: str, state: RunState, wall_s: float, manifest_dir: str = MANIFEST_DIR,
           write: bool = True) -> dict[str, Any]:
    """Check that every planned shard has exactly its part, summarise, and write ``_SUCCESS``.

    ``write=False`` only checks and summarises (a budget job's passes; it adds its plan to the
    summary and commits it with ``write_success``).
    """
    manifest_root = f"{root}/{manifest_dir}"
    committed = existing_parts(fs, manifest_root)
    stray = sorted(committed - set(state.planned))
    if stray:
        raise JobError(f"{len(stray)} manifest part(s) in {redact(spec.output)}/{manifest_dir} are not in this plan "
                       f"(e.g. {part_name(stray[0])}): the input changed since they were written; "
                       "re-run with --overwrite")
    totals: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    for index, planned in sorted(state.planned.items()):
        if index not in committed:
            raise JobError(f"shard {index} has no manifest part after the run; re-run to finish it")
        stats = state.stats.get(index)
        if stats is None:   # committed by an earlier run (or rewritten since): read it back
            table = parquet_table(fetch(fs, f"{manifest_root}/{part_name(index)}"))
            stats = part_stats(table.to_pylist())
        if stats["count"] != planned.count or stats["fingerprint"] != planned.fingerprint:
            raise JobError(f"manifest part {part_name(index)} does not match the planned shard "
                           f"({stats['count']} rows, {planned.count} planned): the input changed since it was "
                           "written; re-run with --overwrite")
        statuses.update(stats["statuses"])
        totals.update({k: v for k, v in stats.items() if k not in ("count", "fingerprint", "statuses")})
    in_bytes, out_bytes = totals["input_bytes"], totals["output_bytes"]
    verified_items, verify_failures = totals["verified"], totals["verify_failures"]

    def mean(name: str) -> float | None:
        return totals[f"{name}_sum"] / totals[f"{name}_n"] if totals[f"{name}_n"] else None

    items = sum(p.count for p in state.planned.values())
    summary: dict[str, Any] = {
        "kind": spec.kind,
        "items": items,
        "statuses": dict(statuses),
        "shards": len(state.planned),
        "resumed_shards": state.resumed_shards,
        "retried_shards": state.retried_shards,
        "failed_shards": state.failed_shards,
        "input_bytes": in_bytes,
        "output_bytes": out_bytes,
        "wall_s": round(wall_s, 3),
        "ratefit_version": ratefit_version(),
        "spec_hash": spec.spec_hash(),
        "spec": spec.to_dict(redacted=True),
    }
    if spec.kind == "compress":
        summary.update(mean_bpp=mean("bpp"), mean_psnr=mean("psnr"), mean_ms_ssim=mean("ms_ssim"),
                       lossless_items=totals["lossless"], saved_bytes=totals["saved_bytes"],
                       retired_items=totals["retired"])
        if spec.verify:
            # Counted from the rows: shards committed by an earlier run without --verify do not count.
            summary.update(verified_items=verified_items, verify_failures=verify_failures)
    if write:
        write_success(fs, root, summary)
    return summary


def write_success(fs, root: str, summary: dict[str, Any]) -> None:
    """Commit the whole job: ``_SUCCESS`` exists only once every planned item has its row."""
    atomic_write(fs, f"{root}/{SUCCESS}", json.dumps(summary, indent=2, allow_nan=False).encode())
