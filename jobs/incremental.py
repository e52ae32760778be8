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

import json
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Iterator

from ratefit.jobs.spec import JobSpec
from ratefit.workers.items import Item
from ratefit.workers.manifest import MANIFEST_DIR, RUN_PREFIX, current_state
from ratefit.workers.storage import atomic_write, open_fs, redact, source_stat, with_retries

RUNS_DIR = "_runs"
DONE_STATUSES = ("ok", "unreachable")   # an unchanged input with one of these is not planned again


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def run_manifest_dir(run_id: str) -> str:
    return f"{MANIFEST_DIR}/{RUN_PREFIX}{run_id}"


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
            try:
                size, version = source_stat(*open_fs(item.uri, spec.storage_options))
            except Exception:   # gone or unreadable: the read will say so in the row
                size, version = None, None
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


def state_totals(fs, root: str) -> dict[str, Any]:
    """Counts over the current state (one row per input), for the run's summary."""
    t = current_state(fs, root, ["status", "input_bytes", "output_bytes"]).to_pydict()
    statuses: dict[str, int] = {}
    for s in t["status"]:
        statuses[s] = statuses.get(s, 0) + 1
    ok = [i for i, s in enumerate(t["status"]) if s == "ok"]
    return {"inputs": len(t["input_uri"]), "statuses": statuses,
            "input_bytes": sum(t["input_bytes"][i] or 0 for i in ok),
            "output_bytes": sum(t["output_bytes"][i] or 0 for i in ok),
            "retired": sum(1 for r in t["retired"] if r is not None)}


def write_run_record(fs, root: str, summary: dict[str, Any]) -> None:
    atomic_write(fs, f"{root}/{RUNS_DIR}/{summary['run_id']}.json",
                 json.dumps(summary, indent=2, allow_nan=False).encode())


def list_runs(output: str, storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every run of OUTPUT, oldest first: finished ones from ``_runs/``, and run folders in the
    manifest without a record as ``unfinished`` (killed, or still running)."""
    fs, root = open_fs(output, storage_options)
    runs: dict[str, dict[str, Any]] = {}
    fs.invalidate_cache(root)
    for folder, finished in ((f"{root}/{RUNS_DIR}", True), (f"{root}/{MANIFEST_DIR}", False)):
        try:
            names = with_retries(lambda: fs.ls(folder, detail=False), f"list {folder}")
        except FileNotFoundError:
            continue
        for name in names:
            base = name.rstrip("/").rsplit("/", 1)[-1]
            if finished and base.endswith(".json"):
                runs[base[:-5]] = json.loads(fs.cat_file(name))
            elif not finished and base.startswith(RUN_PREFIX) and base[len(RUN_PREFIX):] not in runs:
                runs[base[len(RUN_PREFIX):]] = {"run_id": base[len(RUN_PREFIX):], "status": "unfinished"}
    return [runs[k] for k in sorted(runs)]
