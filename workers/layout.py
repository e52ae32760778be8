"""Where a compress pass puts its outputs: one object per image, or one tar shard per job shard.

``files`` (the default) writes ``OUTPUT/<relative path>.<codec ext>`` as each item finishes.
``webdataset`` holds a shard's outputs until its last item, then writes one standard tar,
``OUTPUT/shards/<run>/shard-NNNNN.tar``, whole, before the shard's manifest part: the part
stays the commit, so no row ever names a tar that was not fully written. Each image is two
members, ``<key>.<codec ext>`` and ``<key>.json`` (what a consumer uses of its manifest row),
where ``<key>`` is the item's relative path with the dots of its file name turned into ``_``
(webdataset groups a sample's members by the name up to the first dot). The row records
``shard_uri``, ``offset`` and ``length``, so one image is one ranged GET.

Why shards: at millions of images one object per image means millions of PUTs and GETs, object
stores bill small objects as if they were larger (S3 Glacier Instant Retrieval counts any
object under 128 KB as 128 KB), and training pipelines read tar shards far faster than loose
files. A shard is immutable once committed: an incremental run writes new shards under its own
run id; an image re-encoded later leaves its old member behind (dead bytes, not compacted).

The per-item code (``workers/compress.py``) only calls ``put``, ``read_back`` and ``discard``;
``ShardWorker`` calls ``begin`` and ``commit`` around each shard.
"""

from __future__ import annotations

import io
import json
import math
import posixpath
import tarfile
import time
from typing import Any

from ratefit.workers.read import ItemError
from ratefit.workers.storage import atomic_write, fetch, full_url, redact, safe_join

LAYOUTS = ("files", "webdataset")
SHARDS_DIR = "shards"
STORED = ("ok", "unreachable")   # statuses whose output was kept (the rest have none)


def member_key(relpath: str) -> str:
    """``a/b.c.png`` → ``a/b_c_png``: a webdataset sample key (no dot in the file name)."""
    head, _, name = relpath.replace("\\", "/").rpartition("/")
    name = name.replace(".", "_")
    return f"{head}/{name}" if head else name


# What a sample's ``.json`` member carries of its manifest row: what a consumer of the image uses
# (the manifest has the rest: timings, metadata sizes, where it is in the tar). Every member
# costs a 512 B header and pads to 512 B blocks: a row under 512 B takes one block per image.
JSON_FIELDS = ("key", "input_uri", "codec", "rate_param", "width", "height", "bpp", "psnr", "ms_ssim",
               "target_kind", "target_value", "output_sha256", "has_alpha", "has_icc", "exact_original", "run_id")


def json_row(row: dict[str, Any]) -> bytes:
    """A row's consumer fields as strict JSON, nulls left out (an infinite PSNR, that of a
    lossless output, is left out too: ``exact_original`` says it)."""
    clean = {k: row[k] for k in JSON_FIELDS
             if row.get(k) is not None and not (isinstance(row[k], float) and not math.isfinite(row[k]))}
    return json.dumps(clean, sort_keys=True, separators=(",", ":")).encode("utf-8")


class FileLayout:
    """One object per output, written as its item finishes."""

    sharded = False

    def __init__(self, fs: Any, root: str):
        self.fs, self.root = fs, root

    def path(self, name: str, ext: str) -> str:
        """Where item ``name`` (its relative path) coded as ``ext`` goes: a ValueError if it escapes OUTPUT."""
        return safe_join(self.root, f"{name}.{ext}")

    def uri(self, name: str, ext: str) -> str:
        """The row's ``output_uri`` (for a tar shard: until the shard commits)."""
        return redact(full_url(self.fs, self.path(name, ext)))

    def begin(self, shard_index: int) -> None:
        pass

    def put(self, name: str, ext: str, blob: bytes) -> None:
        atomic_write(self.fs, self.path(name, ext), blob)

    def read_back(self, name: str, ext: str) -> bytes:
        return fetch(self.fs, self.path(name, ext))

    def discard(self, name: str, ext: str) -> None:
        """Remove an output that must not outlive its row (a failed verify, a skipped item's old file)."""
        path = self.path(name, ext)
        try:
            if self.fs.exists(path):
                self.fs.rm_file(path)
        except FileNotFoundError:
            pass

    def commit(self, shard_index: int, rows: list[dict[str, Any]], verify: bool) -> None:
        pass


class TarLayout(FileLayout):
    """A shard's outputs held in memory and written as one tar before the shard's part."""

    sharded = True

    def __init__(self, fs: Any, root: str, run_id: str | None):
        super().__init__(fs, root)
        self.folder = posixpath.join(root, SHARDS_DIR, run_id or "run")
        self.members: dict[str, tuple[str, str, bytes]] = {}   # output uri -> (item name, ext, bytes)

    def tar_path(self, shard_index: int) -> str:
        return posixpath.join(self.folder, f"shard-{shard_index:05d}.tar")

    def begin(self, shard_index: int) -> None:
        self.members = {}

    def put(self, name: str, ext: str, blob: bytes) -> None:
        self.members[self.uri(name, ext)] = (name, ext, blob)

    def read_back(self, name: str, ext: str) -> bytes:
        return self.members[self.uri(name, ext)][2]

    def discard(self, name: str, ext: str) -> None:
        self.members.pop(self.uri(name, ext), None)   # committed shards are never rewritten

    def commit(self, shard_index: int, rows: list[dict[str, Any]], verify: bool) -> None:
        """Write the shard's tar, then point its rows at their members.

        Only rows that kept an output get a member (a timed-out item's late result has an
        error row and is left out). With ``verify`` the tar is read back and every member's
        bytes compared before any row says so; a mismatch turns those rows into errors.
        """
        kept = [(row, self.members[row["output_uri"]]) for row in rows
                if row.get("status") in STORED and row.get("output_uri") in self.members]
        if not kept:
            return
        path = self.tar_path(shard_index)
        shard_uri = redact(full_url(self.fs, path))
        data, spans = self._tar(kept)
        atomic_write(self.fs, path, data)
        stored = fetch(self.fs, path) if verify else data
        for (row, (_name, _ext, blob)), (offset, length) in zip(kept, spans):
            row.update(shard_uri=shard_uri, offset=offset, length=length, output_uri=shard_uri)
            if verify and stored[offset:offset + length] != blob:
                row.update(status="error", verified=False, output_uri=None,
                           error=str(ItemError("verify", f"the member read back from {shard_uri} at {offset} "
                                                         f"differs from the {length} B written")))

    @staticmethod
    def _tar(kept: list[tuple[dict[str, Any], tuple[str, str, bytes]]]) -> tuple[bytes, list[tuple[int, int]]]:
        """The tar's bytes and, per output, its member's (offset, length) read back from the tar itself."""
        buf, now, used = io.BytesIO(), int(time.time()), set()
        names = []
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for row, (name, ext, blob) in kept:
                key = member_key(redact(name))   # a listing's signed URL leaves no secret in a member name
                unique, n = key, 1
                while unique in used:   # two names that only differ in dots and underscores
                    unique, n = f"{key}_{n}", n + 1
                used.add(unique)
                names.append(f"{unique}.{ext}")
                for member, payload in ((names[-1], blob), (f"{unique}.json", json_row(row))):
                    info = tarfile.TarInfo(member)
                    info.size, info.mtime, info.mode = len(payload), now, 0o644
                    tar.addfile(info, io.BytesIO(payload))
        data = buf.getvalue()
        with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
            where = {m.name: (m.offset_data, m.size) for m in tar.getmembers()}
        return data, [where[name] for name in names]


def make_layout(name: str, fs: Any, root: str, run_id: str | None = None) -> FileLayout:
    if name == "files":
        return FileLayout(fs, root)
    if name == "webdataset":
        return TarLayout(fs, root, run_id)
    raise ValueError(f"layout {name!r}: expected one of {', '.join(LAYOUTS)}")
