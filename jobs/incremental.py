"""Incremental runs: the same compress job, run again and again over an archive that grows.

Each invocation is a *run* with its own id (UTC start time plus a random suffix, so ids sort
by start). It commits its manifest parts under ``OUTPUT/_manifest/run=<id>/`` and, once its
last part is in, its summary to ``OUTPUT/_runs/<id>.json`` and ``OUTPUT/_SUCCESS``. A run
leaves out every input the manifest already holds with the same size, version (ETag, or
mtime on local disks), codec and target, and an ``ok`` or ``unreachable`` row; changed inputs,
new ones and earlier ``error`` rows are planned. A killed run needs no special resume: its
committed parts are rows like any other run's, so the next run plans what is missing.

The manifest's current state (one row per input, its latest attempt) is
``workers.manifest.current_state``; ``ratefit manifest`` prints or exports it and ``ratefit
runs`` lists the runs.
"""

from __future__ import annotations

import calendar
import itertools
import json
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Iterator

import pyarrow as pa

from ratefit.jobs.build import build_pass, plan_items, plan_shards
from ratefit.jobs.runner import RunState, finish, prepare_output, run_pass, write_success
from ratefit.jobs.spec import JobSpec
from ratefit.workers.items import Item
from ratefit.workers.manifest import (MANIFEST_DIR, RETIRED_DIR, RETIRED_SCHEMA, RUN_PREFIX, STATE_DIR,
                                      current_state, latest_snapshot, part_bytes, part_files, write_snapshot,
                                      write_state)
from ratefit.workers.retire import retire_original, retired_dir, tombstone
from ratefit.workers.storage import atomic_write, open_fs, redact, stat_input, with_retries

RUNS_DIR = "_runs"
DONE_STATUSES = ("ok", "unreachable", "skipped")   # an unchanged input with one of these is not planned again


def new_run_id(after: str | None = None) -> str:
    """UTC start time plus a random suffix; always after ``after`` (the newest earlier run), so
    run ids increase from run to run even when drivers' clocks disagree."""
    now = time.gmtime()
    if after is not None and time.strftime("%Y%m%dT%H%M%SZ", now) <= after[:16]:
        now = time.gmtime(calendar.timegm(time.strptime(after[:16], "%Y%m%dT%H%M%SZ")) + 1)
    return time.strftime("%Y%m%dT%H%M%SZ", now) + "-" + uuid.uuid4().hex[:6]


@dataclass(frozen=True)
class Seen:
    """What the manifest says about one input: enough to decide whether it changed."""

    size: int | None
    version: str | None
    codec: str | None
    target_kind: str | None
    target_value: float | None
    status: str | None
    output_uri: str | None = None
    verified: bool | None = None
    retired: str | None = None

    def row(self, uri: str) -> dict[str, Any]:
        """The fields ``workers.retire`` needs, as a manifest row has them."""
        return {"input_uri": uri, "output_uri": self.output_uri, "status": self.status, "verified": self.verified,
                "source_version": self.version, "input_bytes": self.size}


@dataclass
class Delta:
    """How this run's plan relates to the manifest before it."""

    new_items: int = 0
    changed_items: int = 0        # same input, another size/version/codec/target: re-encoded, row superseded
    retried_items: int = 0        # unchanged, but its latest row is an error: tried again
    unchanged_items: int = 0      # left out
    kept_items: int = 0           # original retired: row and bitstream stay as they are, whatever changed

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def seen_inputs(fs, root: str) -> dict[str, Seen]:
    """The manifest's current state as a look-up by input URI (empty for a new OUTPUT)."""
    cols = ["input_bytes", "codec", "target_kind", "target_value", "status", "output_uri", "verified"]
    t = current_state(fs, root, cols).to_pydict()
    return {uri: Seen(*fields) for uri, *fields in zip(
        t["input_uri"], t["input_bytes"], t["source_version"], t["codec"], t["target_kind"], t["target_value"],
        t["status"], t["output_uri"], t["verified"], t["retired"])}


def plan_changes(items: Iterable[Item], seen: dict[str, Seen], spec: JobSpec, delta: Delta,
                 backlog: list[tuple[Item, Seen]] | None = None, listed: set[str] | None = None) -> Iterator[Item]:
    """``items`` less the unchanged ones; counts what it keeps and leaves out in ``delta``.

    Inputs from a folder walk carry their size and version; a listing's do not, so an input
    the manifest has seen before is asked for them (one HEAD on S3) and a new one is not.
    With ``backlog``, unchanged inputs whose verified row was committed but whose original was
    never retired (an earlier run without --retire-originals, or killed before retiring) are
    collected there; ``listed`` collects every input URI the plan saw.
    """
    default = spec.default_target()
    for item in items:
        key = redact(item.uri) or ""
        if listed is not None:
            listed.add(key)
        before = seen.get(key)
        if before is None or item.error:
            delta.new_items += 1
            yield item
            continue
        size, version = item.size, item.version
        if version is None:
            size, version = stat_input(item.uri, spec.storage_options)
        if before.retired is not None:
            if version is None or version == before.version:
                # Its original is gone (or is the very version that was retired): re-encoding
                # would read a missing file or its own lossy bitstream. It stays as it is.
                continue
            delta.kept_items -= 1   # a new original at the same URI: planned like any change
        target = item.target or default
        same = (version is not None and before.version == version and before.size == size
                and before.codec == spec.codec and target is not None
                and before.target_kind == target.kind and before.target_value == target.value)
        if same and before.status in DONE_STATUSES:
            delta.unchanged_items += 1
            if backlog is not None and before.status == "ok" and before.verified and before.retired is None:
                backlog.append((item, before))
            continue
        if same:
            delta.retried_items += 1
        else:
            delta.changed_items += 1
        yield item


def state_totals(state: pa.Table) -> dict[str, Any]:
    """Counts over the current state (one row per input), for the run's summary."""
    t = state.select(["status", "input_bytes", "output_bytes", "retired"]).to_pydict()
    statuses: dict[str, int] = {}
    for s in t["status"]:
        statuses[s] = statuses.get(s, 0) + 1
    ok = [i for i, s in enumerate(t["status"]) if s == "ok"]
    return {"inputs": len(t["status"]), "statuses": statuses,
            "input_bytes": sum(t["input_bytes"][i] or 0 for i in ok),
            "output_bytes": sum(t["output_bytes"][i] or 0 for i in ok),
            "retired": sum(1 for r in t["retired"] if r is not None)}


def run(spec: JobSpec, items: Iterable[Item] | None = None) -> dict[str, Any]:
    """One incremental run of a compress job over ``items`` (default: the spec's inputs);
    returns (and commits) its summary."""
    t_start = time.time()
    fs, root = open_fs(spec.output, spec.storage_options)
    if spec.overwrite:
        discard_runs(fs, root)
    # After every earlier run and snapshot: a snapshot covers the runs up to its id.
    run_id = new_run_id(after=max([*run_ids(fs, root), latest_snapshot(fs, root)[0] or ""], default=None) or None)
    seen = seen_inputs(fs, root)
    items = plan_items(spec) if items is None else items
    delta = Delta(kept_items=sum(1 for before in seen.values() if before.retired is not None))
    backlog: list[tuple[Item, Seen]] | None = [] if spec.retire_originals else None
    listed: set[str] | None = set() if spec.retire_originals else None
    job_pass = build_pass(spec, "compress", run_id)
    shards = plan_shards(spec, plan_changes(items, seen, spec, delta, backlog, listed))
    first = next(shards, None)
    if first is None:   # nothing new or changed: no workers to start, only the spec check
        with_retries(lambda: prepare_output(spec, fs, root), f"prepare {redact(spec.output)}")
        state = RunState()
    else:
        state = run_pass(spec, itertools.chain([first], shards), job_pass)
    summary = finish(spec, fs, root, state, time.time() - t_start, manifest_dir=job_pass.manifest_dir, write=False)
    if backlog is not None and listed is not None:
        summary["retired_items"] += retire_backlog(spec, fs, root, run_id, backlog, seen, listed)
    state_now = write_snapshot(fs, root, run_id)   # the next run reads this instead of every part
    summary.update(run_id=run_id, **delta.to_dict(), wall_s=round(time.time() - t_start, 3),
                   state=state_totals(state_now))
    write_run_record(fs, root, summary)
    write_success(fs, root, summary)
    return summary


def discard_runs(fs, root: str) -> None:
    """--overwrite: forget earlier runs, except what no re-run could bring back.

    An item whose original was retired has its bitstream as the only copy and its row as the
    only record of where it came from. So when some were retired, their current rows are
    carried over into a fresh state snapshot (with their ``retired`` action) and ``_retired/``
    stays; everything else is discarded and re-encoded from the originals. The carried items
    are then kept by every later run (``plan_changes``), and their bitstreams are never touched.
    """
    carried = None
    if part_files(fs, f"{root}/{RETIRED_DIR}") or latest_snapshot(fs, root)[1] is not None:
        state = current_state(fs, root)
        retired = state.column("retired").to_pylist()
        keep = [i for i, r in enumerate(retired) if r is not None]
        if keep:
            carried = state.take(keep)
    for name in (RUNS_DIR, MANIFEST_DIR, STATE_DIR):
        if fs.exists(f"{root}/{name}"):
            fs.rm(f"{root}/{name}", recursive=True)
    if carried is not None:
        write_state(fs, root, new_run_id(), carried)


def retire_backlog(spec: JobSpec, fs, root: str, run_id: str, backlog: list[tuple[Item, Seen]],
                   seen: dict[str, Seen], listed: set[str]) -> int:
    """Retire what earlier runs committed and verified but did not retire, and record, as
    ``already-absent``, verified inputs gone from the input without a tombstone (a run killed
    between a delete and its tombstone). Serial in the driver: in steady state it is empty."""
    tombs = []
    for item, before in backlog:
        tomb = retire_original(item.uri, item.relpath, before.row(redact(item.uri) or ""), run_id, spec.retire_to,
                               spec.storage_options)
        if tomb is not None:
            tombs.append(tomb)
    # Not listed is not gone (the operator may have pointed this run at another INPUT): only an
    # input that is really missing gets an already-absent tombstone.
    tombs += [tombstone(before.row(uri), run_id, "already-absent") for uri, before in seen.items()
              if uri not in listed and before.status == "ok" and before.verified and before.retired is None
              and stat_input(uri, spec.storage_options) == (None, None)]
    if tombs:   # the driver's own part, beside the workers' part-NNNNN
        atomic_write(fs, f"{root}/{retired_dir(run_id)}/part-driver.parquet", part_bytes(tombs, RETIRED_SCHEMA))
    return len(tombs)


def write_run_record(fs, root: str, summary: dict[str, Any]) -> None:
    atomic_write(fs, f"{root}/{RUNS_DIR}/{summary['run_id']}.json",
                 json.dumps(summary, indent=2, allow_nan=False).encode())


def run_ids(fs, root: str) -> dict[str, bool]:
    """Every run id of OUTPUT, finished (a record in ``_runs/``) or not (only a manifest folder)."""
    ids: dict[str, bool] = {}
    fs.invalidate_cache(root)
    for folder, finished in ((f"{root}/{RUNS_DIR}", True), (f"{root}/{MANIFEST_DIR}", False)):
        fs.invalidate_cache(folder)
        try:
            names = with_retries(lambda: fs.ls(folder, detail=False), f"list {folder}")
        except FileNotFoundError:
            continue
        for name in names:
            base = name.rstrip("/").rsplit("/", 1)[-1]
            if finished and base.endswith(".json"):
                ids[base[:-5]] = True
            elif not finished and base.startswith(RUN_PREFIX):
                ids.setdefault(base[len(RUN_PREFIX):], False)
    return ids


def list_runs(output: str, storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every run of OUTPUT, oldest first: finished ones from ``_runs/``, and run folders in the
    manifest without a record as ``unfinished`` (killed, or still running)."""
    fs, root = open_fs(output, storage_options)
    return [json.loads(fs.cat_file(f"{root}/{RUNS_DIR}/{rid}.json")) if finished
            else {"run_id": rid, "status": "unfinished"} for rid, finished in sorted(run_ids(fs, root).items())]
