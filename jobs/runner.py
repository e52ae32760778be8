"""Run a pass of a job over the pool of shard workers, and finish the job.

A pass (``jobs/build.py``) names its worker config, where its parts go and how it resumes;
the pool (``jobs/pool.py``) runs its shards. The driver only ever holds the shards in flight
plus, per planned shard, its size and a fingerprint of its inputs. After the last shard it
checks every planned shard against its committed manifest part (same count, same inputs, so
every item has exactly one row) and only then writes ``_SUCCESS``.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Iterator

from ratefit.jobs.build import PLAN_DIR, RESUME_BY_SHARD, Pass
from ratefit.jobs.errors import JobError
from ratefit.jobs.pool import open_pool
from ratefit.jobs.progress import Progress
from ratefit.jobs.spec import JobSpec
from ratefit.workers.items import Shard
from ratefit.workers.manifest import (MANIFEST_DIR, committed_rows, existing_parts, parquet_table, part_name,
                                     part_stats, shard_fingerprint, write_part)
from ratefit.workers.storage import atomic_write, fetch, open_fs, redact, set_retry_window, with_retries

JOB_RECORD = "_ratefit_job.json"
SUCCESS = "_SUCCESS"

__all__ = ["JobError", "RunState", "finish", "prepare_output", "run_pass", "run_shards", "write_success"]


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
class RunState:
    planned: dict[int, _Planned] = field(default_factory=dict)
    # part_stats of the parts committed during this pass (as their workers reported them);
    # finish reads back only the others. Clear it when parts are rewritten afterwards.
    stats: dict[int, dict[str, Any]] = field(default_factory=dict)
    resumed_shards: int = 0
    retried_shards: int = 0
    failed_shards: int = 0
    workers: dict[str, int] | None = None   # the pool's workers_stats() (None: no pool ran)


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
        if not spec.same_job(old):
            raise JobError(
                f"{redact(spec.output)} already holds a different {old.get('kind', 'ratefit')} job "
                f"(spec hash {old.get('spec_hash', '?')[:12]}, this one {spec.spec_hash()[:12]}; "
                f"{spec.hash_fields_note()}); use --overwrite to start over, or another OUTPUT")
    elif existing_parts(fs, manifest):
        raise JobError(f"{redact(spec.output)}/{MANIFEST_DIR} holds parts of an unknown job; "
                       "use --overwrite to start over, or another OUTPUT")
    record = {"kind": spec.kind, "spec_hash": spec.spec_hash(), "spec_hash_version": spec.HASH_VERSION,
              "ratefit_version": ratefit_version(), "spec": spec.to_dict(redacted=True)}
    atomic_write(fs, record_path, json.dumps(record, indent=2).encode())


def _failed_rows(shard: Shard, schema, attempt: int, reason: str) -> list[dict]:
    rows = []
    for item in shard.items:
        row = {name: None for name in schema.names}
        row.update(input_uri=redact(item.uri), status="error", attempt=attempt, shard=shard.index,
                   error=redact(f"worker: {reason}"))
        rows.append(row)
    return rows


def run_shards(spec: JobSpec, shards: Iterator[Shard], job_pass: Pass) -> dict[str, Any]:
    """Run a one-pass job (decompress) and finish it."""
    t_start = time.time()
    state = run_pass(spec, shards, job_pass)
    fs, root = open_fs(spec.output, spec.storage_options)
    return finish(spec, fs, root, state, time.time() - t_start)


def run_pass(spec: JobSpec, shards: Iterator[Shard], job_pass: Pass, total: int | None = None) -> RunState:
    """Process ``shards`` until each has a committed part under ``OUTPUT/<job_pass.manifest_dir>``.

    A plain job has one pass; a budget job has a probe pass, the encode pass and a correction
    pass, each with its own parts folder (so each resumes on its own). ``total``: the pass's item
    count where the caller already knows it (progress then shows an ETA); shards are streamed,
    so it is not counted here.
    """
    set_retry_window(spec.storage_retry_s)
    fs, root = open_fs(spec.output, spec.storage_options)
    manifest_root = f"{root}/{job_pass.manifest_dir}"
    state = RunState()
    progress = Progress(spec.progress, job_pass.name, every_s=spec.progress_every_s, total=total)
    pool = None
    completed = False
    try:
        # The pool starts (and checks) the workers first: a codec that cannot be built stops
        # the job here, with OUTPUT untouched.
        pool = open_pool(job_pass.config, job_pass.device, in_process=spec.in_process,
                         storage_retry_s=spec.storage_retry_s, address=spec.address, workers=spec.workers,
                         gpus_per_worker=spec.gpus_per_worker, min_workers=spec.min_workers,
                         worker_wait_s=spec.worker_wait_s)
        with_retries(lambda: prepare_output(spec, fs, root), f"prepare {redact(spec.output)}")
        done = existing_parts(fs, manifest_root) if job_pass.resume == RESUME_BY_SHARD else set()

        def to_run() -> Iterator[Shard]:
            for shard in shards:
                uris = [redact(item.uri) or "" for item in shard.items]
                state.planned[shard.index] = _Planned(len(uris), shard_fingerprint(uris))
                if shard.index in done:
                    state.resumed_shards += 1
                    progress.advance(len(shard.items), 0, resumed=True)
                    continue
                yield shard

        for result in pool.run(to_run()):
            shard = result.shard
            if result.summary is not None:
                state.stats[shard.index] = result.summary["stats"]
                progress.advance(result.summary["items"], result.summary["input_bytes"],
                                 errors=result.summary["statuses"].get("error", 0))
                continue
            state.failed_shards += 1
            # A part committed before the failures (they came after it) stands.
            rows = committed_rows(fs, manifest_root, shard.index)
            if rows is None:
                rows = _failed_rows(shard, job_pass.schema, result.attempts, result.failure or "failed")
                write_part(fs, manifest_root, shard.index, rows, job_pass.schema)
            state.stats[shard.index] = part_stats(rows)
            progress.advance(len(shard.items), 0, errors=state.stats[shard.index]["statuses"].get("error", 0))
        state.retried_shards = pool.retried
        state.workers = pool.workers_stats()
        completed = True
    finally:
        progress.close(completed)
        if pool is not None:
            pool.close()
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
        "workers": state.workers,
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
                       retired_items=totals["retired"], skipped_items=statuses.get("skipped", 0),
                       skipped_candidate_bytes=totals["skipped_candidate_bytes"])
        if spec.verify:
            # Counted from the rows: shards committed by an earlier run without --verify do not count.
            summary.update(verified_items=verified_items, verify_failures=verify_failures)
    if write:
        write_success(fs, root, summary)
    return summary


def write_success(fs, root: str, summary: dict[str, Any]) -> None:
    """Commit the whole job: ``_SUCCESS`` exists only once every planned item has its row."""
    atomic_write(fs, f"{root}/{SUCCESS}", json.dumps(summary, indent=2, allow_nan=False).encode())
