"""Retiring originals (``--retire-originals``): delete, or move away, what has a proven replacement.

An original is retired only when all of these hold, in this order:
1. its bitstream was written, read back from storage and decoded to the encoder's own
   reconstruction (the ``--verify`` path; the row says ``verified``);
2. the manifest part holding that row is committed (the worker retires after ``write_part``);
3. the original is still the version that was encoded (same size and ETag/mtime), so an
   original replaced in the meantime is kept and re-encoded by the next run.
Then it is deleted (or copied to the ``--retire-to`` prefix and deleted) and a tombstone row
is committed under ``OUTPUT/_retired/run=<id>/``. A run killed anywhere in between leaves every
input either in place or with a committed, verified bitstream; a crash between the delete and
the tombstone is mended by the next run's sweep (tombstone ``already-absent``).
"""

from __future__ import annotations

import time
from typing import Any, Iterable

from ratefit.workers.items import Item
from ratefit.workers.manifest import RETIRED_DIR, RETIRED_SCHEMA, RUN_PREFIX, committed_rows, empty_row, write_part
from ratefit.workers.storage import (StorageUnavailable, atomic_write, fetch, full_url, open_fs, redact, safe_join,
                                     source_stat, with_retries)


def retired_dir(run_id: str) -> str:
    return f"{RETIRED_DIR}/{RUN_PREFIX}{run_id}"


def retirable(row: dict[str, Any]) -> bool:
    return row.get("status") == "ok" and row.get("verified") is True and row.get("output_uri") is not None


def tombstone(row: dict[str, Any], run_id: str, action: str, moved_to: str | None = None) -> dict[str, Any]:
    """The tombstone of a manifest row's original (``action``: deleted, moved, already-absent)."""
    tomb = empty_row(RETIRED_SCHEMA)
    tomb.update(input_uri=row["input_uri"], output_uri=row["output_uri"], run_id=run_id,
                source_version=row.get("source_version"), input_bytes=row.get("input_bytes"),
                action=action, moved_to=moved_to, retired_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return tomb


def retire_original(uri: str, relpath: str, row: dict[str, Any], run_id: str, retire_to: str | None,
                    storage_options: dict[str, Any]) -> dict[str, Any] | None:
    """Retire one original whose verified row is committed; the tombstone row, or None if kept."""
    fs, path = open_fs(uri, storage_options)
    try:
        size, version = source_stat(fs, path)
    except FileNotFoundError:
        return tombstone(row, run_id, "already-absent")
    if version is None or version != row.get("source_version") or size != row.get("input_bytes"):
        return None   # replaced since it was read: keep it; the next run sees a changed input
    moved_to = None
    if retire_to:
        dest_fs, dest_root = open_fs(retire_to, storage_options)
        dest = safe_join(dest_root, relpath)
        atomic_write(dest_fs, dest, fetch(fs, path))
        moved_to = redact(full_url(dest_fs, dest))
    with_retries(lambda: fs.rm_file(path), f"delete {redact(uri)}")
    return tombstone(row, run_id, "moved" if moved_to else "deleted", moved_to)


def retire_shard(items: Iterable[Item], rows: list[dict[str, Any]], run_id: str, retire_to: str | None,
                 storage_options: dict[str, Any], out_fs, out_root: str, shard_index: int,
                 retry: bool = False) -> int:
    """Retire a committed shard's verified originals and commit their tombstones; returns how many.

    A failure on one original keeps it (it is retried by the next run's sweep) and does not
    stop the others; a storage outage stops, as everywhere else. A retried shard keeps the
    tombstones an earlier attempt committed and adds the rest.
    """
    folder = f"{out_root}/{retired_dir(run_id)}"
    tombs = (committed_rows(out_fs, folder, shard_index) or []) if retry else []
    done = {t["input_uri"] for t in tombs}
    for item, row in zip(items, rows):
        if not retirable(row) or row["input_uri"] in done:
            continue
        try:
            tomb = retire_original(item.uri, item.relpath, row, run_id, retire_to, storage_options)
        except StorageUnavailable:
            raise
        except Exception:
            continue
        if tomb is not None:
            tombs.append(tomb)
    if len(tombs) > len(done):
        write_part(out_fs, folder, shard_index, tombs, RETIRED_SCHEMA)
    return len(tombs) - len(done)
