"""Manifest parts: one Parquet file per shard under ``OUTPUT/_manifest/``.

A part is written only after every bitstream of its shard, so it doubles as the shard's
commit marker: resume skips shards whose part exists, and no row ever points at a
bitstream that was not fully written. Any Arrow tool reads ``_manifest/`` as one dataset.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections import Counter
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from ratefit.workers.storage import atomic_write, fetch, with_retries

MANIFEST_DIR = "_manifest"
RETIRED_DIR = "_retired"   # tombstones: one part per shard whose originals a run retired
RUN_PREFIX = "run="        # compress runs commit their parts under _manifest/run=<run id>/
STATE_DIR = "_state"       # snapshots of the current state, state-<run id>.parquet, one per finished run

# Columns both jobs share, in this order, so one query can read either manifest.
_COMMON = [
    ("input_uri", pa.string()),
    ("output_uri", pa.string()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("input_bytes", pa.int64()),
    ("output_bytes", pa.int64()),   # the stored file, container header included
]

COMPRESS_SCHEMA = pa.schema(_COMMON + [
    ("bpp", pa.float64()),
    ("target_kind", pa.string()),
    ("target_value", pa.float64()),
    ("psnr", pa.float64()),
    ("ms_ssim", pa.float64()),
    ("codec", pa.string()),
    ("rate_param", pa.float64()),
    ("encode_ms", pa.float64()),
    ("attempt", pa.int32()),
    ("encodes", pa.int32()),
    ("original_mode", pa.string()),
    ("shard", pa.int32()),
    ("verified", pa.bool_()),          # --verify: true once the stored file decoded as encoded; else null
    # Spatial codecs: the quality map used (generator name or PNG URL) and the PSNR where the
    # map asks for quality (q >= 0.5) and elsewhere; null without a map.
    ("qmap", pa.string()),
    ("psnr_roi", pa.float64()),
    ("psnr_outside", pa.float64()),
    # Latent refinement (--refine-steps): optimisation steps behind the coded latents (0 = none).
    ("refine_steps", pa.int32()),
    # Incremental runs: the run that wrote the row, and the input's version when it was read
    # ("etag:<ETag>" on S3, "mtime:<ns>" on local disks): with input_bytes, what tells a later
    # run whether the input changed.
    ("run_id", pa.string()),
    ("source_version", pa.string()),
    # Where an item's time went (ms; ratefit bench sums them): fetch + decode of the input,
    # the rate-independent analysis (prepare), latent refinement, cheap rate estimates during
    # the search, real encodes (entropy coding included), the write, and verify + metrics.
    ("read_ms", pa.float64()),
    ("analysis_ms", pa.float64()),
    ("refine_ms", pa.float64()),
    ("search_ms", pa.float64()),
    ("entropy_ms", pa.float64()),
    ("write_ms", pa.float64()),
    ("metrics_ms", pa.float64()),
    # What the search and the input cost: cheap rate estimates the search made (0 for codecs
    # without a rate model), and the input's frames (an animation is coded as its first frame).
    ("estimates", pa.int32()),
    ("frames", pa.int32()),
    # Archive fidelity: what travelled beside the pixels (the ICC profile, EXIF and XMP sizes in
    # bytes, 0 when the input had none or --strip-metadata dropped it), whether the input had a
    # (non-opaque) alpha and whether the output lost it (JPEG has none).
    ("has_icc", pa.bool_()),
    ("exif_bytes", pa.int32()),
    ("xmp_bytes", pa.int32()),
    ("has_alpha", pa.bool_()),
    ("alpha_dropped", pa.bool_()),
    # Checksums (SHA-256, hex) of the input file and of the stored output: a plain-file output
    # (jpeg, webp, avif, jxl) has no container header, so its row is what names it; and whether
    # decompressing restores the input file byte for byte (jxl-lossless of a JPEG).
    ("input_sha256", pa.string()),
    ("output_sha256", pa.string()),
    ("exact_original", pa.bool_()),
    # A ``skipped`` item (the result was not smaller than the input, --min-savings): the size
    # the result would have had. No output object exists for it.
    ("candidate_bytes", pa.int64()),
    # The item's name: its input's path relative to INPUT (``a/b.jpg``), which the reading API
    # yields as the key. With ``--layout webdataset`` the output is a member of a tar shard:
    # ``output_uri`` and ``shard_uri`` name the tar, ``offset``/``length`` the member's bytes
    # in it (one ranged GET); null for the files layout.
    ("key", pa.string()),
    ("shard_uri", pa.string()),
    ("offset", pa.int64()),
    ("length", pa.int64()),
])
STAGE_COLUMNS = ("read_ms", "analysis_ms", "refine_ms", "search_ms", "entropy_ms", "write_ms", "metrics_ms")

# A budget job's probe pass (``OUTPUT/_plan/probes/``): each image's R-D curve at a few
# control values, predicted stored bytes and PSNR, in probe order.
PROBE_SCHEMA = pa.schema(_COMMON + [
    ("codec", pa.string()),
    ("target_kind", pa.string()),      # a listing's per-item target: a cap (bytes/bpp) or a floor (psnr)
    ("target_value", pa.float64()),
    ("probe_value", pa.list_(pa.float64())),
    ("probe_bytes", pa.list_(pa.float64())),
    ("probe_psnr", pa.list_(pa.float64())),
    ("probe_exact", pa.bool_()),       # sizes from real encodes (classical codecs) or the rate model
    ("probe_ms", pa.float64()),
    ("attempt", pa.int32()),
    ("shard", pa.int32()),
])

DECOMPRESS_SCHEMA = pa.schema(_COMMON + [
    ("codec", pa.string()),
    ("decode_ms", pa.float64()),
    ("attempt", pa.int32()),
    ("shard", pa.int32()),
])


# One row per original a run retired (deleted, or moved to --retire-to), written only after the
# original's bitstream was decoded back and checked and the row saying so was committed.
RETIRED_SCHEMA = pa.schema([
    ("input_uri", pa.string()),
    ("output_uri", pa.string()),
    ("run_id", pa.string()),
    ("source_version", pa.string()),
    ("input_bytes", pa.int64()),
    ("action", pa.string()),          # "deleted" | "moved" | "already-absent" (a crash between delete and tombstone)
    ("moved_to", pa.string()),
    ("retired_at", pa.string()),      # UTC, ISO 8601
])


def parquet_table(data: bytes, columns: list[str] | None = None) -> pa.Table:
    """A whole Parquet file held in memory, as a table.

    Through an Arrow buffer and on the calling thread: ``pq.read_table`` on a Python file
    object (``io.BytesIO``) with threads can abort or hang the interpreter at exit
    (apache/arrow#34314, #50482), which a driver under ``ray job submit`` did.
    """
    return pq.read_table(pa.BufferReader(data), columns=columns, use_threads=False)


def part_name(shard_index: int) -> str:
    return f"part-{shard_index:05d}.parquet"


def empty_row(schema: pa.Schema) -> dict[str, Any]:
    return {name: None for name in schema.names}


def part_bytes(rows: Iterable[dict[str, Any]], schema: pa.Schema) -> bytes:
    table = pa.Table.from_pylist(list(rows), schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def write_part(fs, manifest_root: str, shard_index: int, rows: list[dict[str, Any]], schema: pa.Schema) -> str:
    path = f"{manifest_root}/{part_name(shard_index)}"
    atomic_write(fs, path, part_bytes(rows, schema))
    return path


def committed_rows(fs, manifest_root: str, shard_index: int) -> list[dict[str, Any]] | None:
    """The rows of a shard's committed part, or None when it has none."""
    try:
        return parquet_table(fetch(fs, f"{manifest_root}/{part_name(shard_index)}")).to_pylist()
    except FileNotFoundError:
        return None


def existing_parts(fs, manifest_root: str) -> set[int]:
    """Shard indices whose part is already committed (one listing call, not one per shard)."""
    fs.invalidate_cache(manifest_root)   # other processes (the workers) wrote parts since the last look
    try:
        names = with_retries(lambda: fs.ls(manifest_root, detail=False), f"list {manifest_root}")
    except FileNotFoundError:
        return set()
    done = set()
    for name in names:
        base = name.rstrip("/").rsplit("/", 1)[-1]
        if base.startswith("part-") and base.endswith(".parquet"):
            try:
                done.add(int(base[5:-8]))
            except ValueError:
                continue
    return done


def read_parts(fs, folder: str, columns: list[str] | None = None) -> pa.Table:
    """Every committed part under ``folder`` as written, in shard order: rows in planning order."""
    tables = [parquet_table(fetch(fs, n), columns) for n in part_files(fs, folder)]
    return pa.concat_tables(tables) if tables else pa.table({})


def part_files(fs, folder: str, after: str | None = None) -> list[str]:
    """Every ``part-*.parquet`` under ``folder``, one level of ``run=<id>/`` folders included.

    Sorted so that flat parts (jobs before incremental runs, budget jobs) come first, then
    runs in the order of their ids (which increase from run to run). ``after``: only the
    parts of runs whose id sorts after it (what a state snapshot of that run does not hold).
    """
    fs.invalidate_cache(folder)
    try:
        listed = with_retries(lambda: fs.ls(folder, detail=True), f"list {folder}")
    except FileNotFoundError:
        return []
    files, runs = [], []
    for entry in listed:
        name = entry["name"].rstrip("/")
        base = name.rsplit("/", 1)[-1]
        if entry.get("type") == "directory" and base.startswith(RUN_PREFIX):
            runs.append(name)
        elif base.startswith("part-") and base.endswith(".parquet"):
            files.append(name)
    files.sort()
    if after is not None:
        files = []
        runs = [r for r in runs if r.rsplit("/", 1)[-1][len(RUN_PREFIX):] > after]
    for run in sorted(runs):
        fs.invalidate_cache(run)   # s3fs drops a folder's cached listing, not its children's
        files.extend(sorted(n for n in with_retries(lambda: fs.ls(run, detail=False), f"list {run}")
                            if n.rstrip("/").rsplit("/", 1)[-1].startswith("part-")))
    return files


def _read_as(fs, path: str, schema: pa.Schema, names: list[str]) -> pa.Table:
    """A Parquet file's ``names`` columns typed as in ``schema``; a column older files lack is null."""
    t = parquet_table(fetch(fs, path))
    return pa.table([t.column(n).cast(schema.field(n).type) if n in t.column_names
                     else pa.nulls(len(t), schema.field(n).type) for n in names], names=names)


def read_all_parts(fs, folder: str, schema: pa.Schema, columns: list[str] | None = None,
                   after: str | None = None) -> pa.Table:
    """Every part under ``folder`` (runs included, or only runs after ``after``) as one table of
    ``schema``; older parts lacking a column get nulls, so manifests of earlier versions read."""
    names = columns or schema.names
    tables = [_read_as(fs, path, schema, names) for path in part_files(fs, folder, after)]
    if not tables:
        return pa.table({n: pa.array([], schema.field(n).type) for n in names})
    return pa.concat_tables(tables)


def latest_rows(table: pa.Table) -> pa.Table:
    """One row per ``input_uri``: the last one in ``table``'s order (parts are read oldest first)."""
    if len(table) == 0:
        return table
    uris = table.column("input_uri").to_pylist()
    last = {u: i for i, u in enumerate(uris)}
    return table.take(sorted(last.values()))


STATE_SCHEMA = COMPRESS_SCHEMA.append(pa.field("retired", pa.string()))


def latest_snapshot(fs, root: str) -> tuple[str | None, str | None]:
    """(run id, path) of the newest state snapshot under ``OUTPUT/_state/``, or (None, None)."""
    folder = f"{root}/{STATE_DIR}"
    fs.invalidate_cache(folder)
    try:
        names = with_retries(lambda: fs.ls(folder, detail=False), f"list {folder}")
    except FileNotFoundError:
        return None, None
    snaps = sorted(n for n in names if n.rstrip("/").rsplit("/", 1)[-1].startswith("state-"))
    if not snaps:
        return None, None
    return snaps[-1].rsplit("/", 1)[-1][len("state-"):-len(".parquet")], snaps[-1]


def current_state(fs, root: str, columns: list[str] | None = None) -> pa.Table:
    """The manifest as it stands: one row per input, its latest attempt, plus ``retired``
    (the tombstone's action when a run retired that very version of the original, else null).

    Reads the newest snapshot (``write_snapshot``, one file per finished run) and only the parts
    and tombstones of runs after it, so a nightly job does not re-read a year of parts; without
    a snapshot, every part.
    """
    names = list(dict.fromkeys(["input_uri", "source_version"] + (columns or COMPRESS_SCHEMA.names)))
    snap_id, snap_path = latest_snapshot(fs, root)
    tables, retired = [], {}
    if snap_path is not None:
        base = _read_as(fs, snap_path, STATE_SCHEMA, names + ["retired"])
        retired = {(u, v): a for u, v, a in zip(*(base.column(n).to_pylist()
                                                  for n in ("input_uri", "source_version", "retired"))) if a}
        tables.append(base.drop(["retired"]))
    tables.append(read_all_parts(fs, f"{root}/{MANIFEST_DIR}", COMPRESS_SCHEMA, names, after=snap_id))
    state = latest_rows(pa.concat_tables(tables))
    tomb = read_all_parts(fs, f"{root}/{RETIRED_DIR}", RETIRED_SCHEMA, ["input_uri", "source_version", "action"],
                          after=snap_id)
    retired.update({(u, v): a for u, v, a in zip(*(tomb.column(n).to_pylist()
                                                  for n in ("input_uri", "source_version", "action")))})
    actions = [retired.get((u, v)) for u, v in zip(state.column("input_uri").to_pylist(),
                                                     state.column("source_version").to_pylist())]
    return state.append_column("retired", pa.array(actions, pa.string()))


def write_state(fs, root: str, run_id: str, state: pa.Table) -> None:
    """Commit ``state`` (rows of the current state) as the snapshot after run ``run_id``."""
    buf = io.BytesIO()
    pq.write_table(state.select(STATE_SCHEMA.names).cast(STATE_SCHEMA), buf, compression="zstd")
    atomic_write(fs, f"{root}/{STATE_DIR}/state-{run_id}.parquet", buf.getvalue())


def write_snapshot(fs, root: str, run_id: str, keep: int = 2) -> pa.Table:
    """Commit the current state after run ``run_id`` as one file; older snapshots beyond ``keep`` go.

    Returns the state. The parts stay: they are the record, the snapshot a cache of their merge.
    """
    state = current_state(fs, root)
    write_state(fs, root, run_id, state)
    folder = f"{root}/{STATE_DIR}"
    fs.invalidate_cache(folder)
    snaps = sorted(n for n in fs.ls(folder, detail=False) if n.rstrip("/").rsplit("/", 1)[-1].startswith("state-"))
    for old in snaps[:-keep]:
        fs.rm_file(old)
    return state


def shard_fingerprint(uris: list[str]) -> str:
    """A shard's identity: its (redacted) input URIs in order."""
    return hashlib.sha256("\n".join(uris).encode("utf-8", "surrogatepass")).hexdigest()[:32]


def part_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What a job's summary needs of one committed part: counts and sums, not the rows.

    Computed by the worker that commits the part (and returned with the shard's result), or
    from a part read back when it was committed by an earlier run: the driver then reads
    back only what it did not see being written.
    """
    def column(name: str) -> list[Any]:
        return [r.get(name) for r in rows]

    stats: dict[str, Any] = {
        "count": len(rows),
        "fingerprint": shard_fingerprint([u or "" for u in column("input_uri")]),
        "statuses": dict(Counter(column("status"))),
        "input_bytes": sum(v or 0 for v in column("input_bytes")),
        "output_bytes": sum(v or 0 for v in column("output_bytes")),
        "verified": sum(1 for v in column("verified") if v is True),
        "verify_failures": sum(1 for v in column("verified") if v is False),
        "lossless": sum(1 for v in column("psnr") if v is not None and math.isinf(v)),
        # what ok rows saved: input bytes minus the stored file's
        "saved_bytes": sum((r.get("input_bytes") or 0) - (r.get("output_bytes") or 0)
                           for r in rows if r.get("status") == "ok"),
        # skipped items (kept as they are): what their results would have cost
        "skipped_candidate_bytes": sum(r.get("candidate_bytes") or 0 for r in rows if r.get("status") == "skipped"),
    }
    for name in ("bpp", "psnr", "ms_ssim"):
        finite = [v for v in column(name) if v is not None and math.isfinite(v)]
        stats[f"{name}_sum"], stats[f"{name}_n"] = float(sum(finite)), len(finite)
    return stats
