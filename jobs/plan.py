"""Planning: stream the inputs into deterministic shards.

Nothing here holds the whole listing: folders are walked in sorted order (S3 prefixes
page through ListObjectsV2, whose order is lexicographic), listing files are read in
record batches, and shards are yielded as they fill. The same inputs always give the
same shards, which is what makes resume by shard index safe; the runner also
fingerprints each shard so a changed listing is detected instead of mixed.
"""

from __future__ import annotations

import math
import os
import posixpath
from typing import Any, Iterable, Iterator

import fsspec

from ratefit.codecs.rate import TARGET_KINDS, Target
from ratefit.workers.items import Item, Shard, StoredOutput
from ratefit.workers.storage import is_local, open_fs, version_from, with_retries

LISTING_BATCH_ROWS = 8192
S3_PAGE_KEYS = 1000   # keys per ListObjectsV2 page (S3's maximum)


class PlanError(ValueError):
    """The input cannot be listed (missing folder, bad listing file)."""


# ------------------------------------------------------------------------- folder walks

Entry = tuple[str, "int | None", "str | None"]   # path, size, version (see storage.version_from)


def _walk_local(root: str, skip: str | None) -> Iterator[Entry]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and os.path.join(dirpath, d) != skip)
        for name in sorted(filenames):
            if not name.startswith("."):
                path = os.path.join(dirpath, name)
                try:
                    st = os.stat(path)
                except OSError:   # gone since the walk saw it: the read will say so
                    yield path, None, None
                    continue
                yield path, st.st_size, version_from({"mtime_ns": st.st_mtime_ns})


def _walk_s3(fs, root: str) -> Iterator[Entry]:
    """Page through an S3 prefix without materialising the whole listing.

    Each ListObjectsV2 page hands back a continuation token for the next; a page request
    that fails during a storage outage is asked again with the same token (with backoff)
    instead of ending the walk. The store's own key order is kept, and it is stable, which
    is what makes the shards the same on every run.
    """
    bucket, key, _ = fs.split_path(root)
    prefix = key.rstrip("/") + "/" if key else ""
    token = None
    while True:
        params = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": S3_PAGE_KEYS}
        if token:
            params["ContinuationToken"] = token
        page = with_retries(lambda: fs.call_s3("list_objects_v2", **params), f"list s3://{bucket}/{prefix}")
        for obj in page.get("Contents", []):
            if not obj["Key"].endswith("/"):
                yield f"{bucket}/{obj['Key']}", obj.get("Size"), version_from(obj)
        token = page.get("NextContinuationToken")
        if not page.get("IsTruncated") or not token:
            return


def walk_files(fs, root: str, skip: str | None = None) -> Iterator[Entry]:
    """Every file under ``root`` in a deterministic order, with its size and version."""
    if is_local(fs):
        if not os.path.isdir(root):
            raise PlanError(f"input folder not found: {root}")
        yield from _walk_local(root, skip)
    elif hasattr(fs, "call_s3") and "s3" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        yield from _walk_s3(fs, root)
    else:
        found = fs.find(root, detail=True)
        for path in sorted(found):
            yield path, found[path].get("size"), version_from(found[path])


def _relative(path: str, root: str) -> str:
    return posixpath.relpath(path.replace(os.sep, "/"), root.replace(os.sep, "/"))


def iter_folder(input_url: str, extensions: Iterable[str], storage_options: dict[str, Any] | None = None,
                skip_url: str | None = None) -> Iterator[Item]:
    fs, root = open_fs(input_url, storage_options)
    skip = None
    if skip_url is not None and is_local(fs):
        skip = os.path.abspath(open_fs(skip_url)[1])
    exts = tuple(e.lower() for e in extensions)
    for path, size, version in walk_files(fs, root, skip):
        if path.lower().endswith(exts):
            uri = path if is_local(fs) else fs.unstrip_protocol(path)
            yield Item(uri=uri, relpath=_relative(path, root), size=size, version=version)


def iter_stored_outputs(input_url: str, storage_options: dict[str, Any] | None = None) -> Iterator[Item]:
    """The outputs a compress job's manifest under INPUT names that the folder walk cannot find:
    plain files (``a/b.png.avif``) and members of tar shards (``--layout webdataset``, any
    codec); rows ``ok`` or ``unreachable`` (both stored their result).

    They have no container header or no file of their own, so the manifest is what says which
    objects are ratefit outputs, which codec wrote each, its checksum and, for a tar member, its
    bytes in the tar. Loose RFIC containers are found by the folder walk instead; a folder
    without a manifest has no such outputs to plan.
    """
    from ratefit.workers.manifest import current_state

    fs, root = open_fs(input_url, storage_options)
    state = current_state(fs, root, ["status", "output_uri", "codec", "output_sha256", "width", "height",
                                     "rate_param", "key", "shard_uri", "offset", "length"])
    rows = [r for r in state.to_pylist()
            if r["status"] in ("ok", "unreachable") and r["output_uri"]
            and (r["shard_uri"] or not r["output_uri"].endswith(".rfic"))]
    base = root.replace(os.sep, "/").rstrip("/") + "/"
    items = []
    for r in rows:
        path = fs._strip_protocol(r["output_uri"]).replace(os.sep, "/")
        stored = StoredOutput.of_row(r)
        relpath = r["key"] if r["shard_uri"] and r["key"] else path[len(base):]
        if not path.startswith(base):
            items.append(Item(uri=r["output_uri"], relpath=posixpath.basename(path), stored=stored,
                              error=f"manifest row names {r['output_uri']}, which is not under {input_url} "
                                    "(the folder was moved: decompress it where it was written)"))
            continue
        uri = path if is_local(fs) else fs.unstrip_protocol(path)
        items.append(Item(uri=uri, relpath=relpath, stored=stored))
    yield from sorted(items, key=lambda i: i.relpath)


# ------------------------------------------------------------------------ listing files

def _listing_batches(url: str, storage_options: dict[str, Any] | None) -> Iterator[dict[str, list]]:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    wanted = ["uri", "qmap_uri"] + [f"target_{k}" for k in TARGET_KINDS]
    with fsspec.open(url, "rb", **(storage_options or {})) as f:
        if url.lower().endswith(".parquet"):
            pf = pq.ParquetFile(f)
            names = set(pf.schema_arrow.names)
            if "uri" not in names:
                raise PlanError(f"listing {url} has no 'uri' column (columns: {', '.join(sorted(names))})")
            for batch in pf.iter_batches(batch_size=LISTING_BATCH_ROWS, columns=[c for c in wanted if c in names]):
                yield batch.to_pydict()
        else:
            reader = pacsv.open_csv(f, read_options=pacsv.ReadOptions(block_size=1 << 20),
                                    convert_options=pacsv.ConvertOptions(
                                        column_types={"uri": pa.string(), "qmap_uri": pa.string(),
                                                      **{f"target_{k}": pa.float64()
                                                                             for k in TARGET_KINDS}},
                                        strings_can_be_null=True))
            names = set(reader.schema.names)
            if "uri" not in names:
                raise PlanError(f"listing {url} has no 'uri' column (columns: {', '.join(sorted(names))})")
            for batch in reader:
                d = batch.to_pydict()
                yield {k: d[k] for k in wanted if k in d}


def _resolve(uri: str, base_fs, base_dir: str) -> str:
    """A listing's relative path as a URL beside the listing file; absolute ones as given."""
    if "://" in uri or uri.startswith("/"):
        return uri
    return posixpath.join(base_dir, uri) if is_local(base_fs) else base_fs.unstrip_protocol(posixpath.join(base_dir, uri))


def _row_item(uri: Any, targets: dict[str, Any], base_fs, base_dir: str, row_no: int,
              qmap_uri: Any = None) -> Item:
    if not isinstance(uri, str) or not uri.strip():
        return Item(uri=f"<listing row {row_no}>", relpath=f"_invalid/row-{row_no}", error=f"listing row {row_no}: empty uri")
    uri = uri.strip()
    given = [(k, v) for k, v in targets.items() if v is not None and not (isinstance(v, float) and math.isnan(v))]
    target, error = None, None
    if len(given) > 1:
        error = f"listing row {row_no} gives several targets ({', '.join(k for k, _ in given)}); give one"
    elif given:
        try:
            target = Target(given[0][0], float(given[0][1]))
        except (TypeError, ValueError) as e:
            error = f"listing row {row_no}: {e}"
    has_protocol = "://" in uri
    if has_protocol or uri.startswith("/"):
        path = fsspec.core.strip_protocol(uri) if has_protocol else uri
        base = base_dir.rstrip("/") + "/"
        rel = path[len(base):] if path.startswith(base) else path.lstrip("/")
    else:
        rel = uri
        parts = uri.replace("\\", "/").split("/")
        if ".." in parts:
            error = error or f"listing row {row_no}: path {uri!r} escapes the listing's folder"
        uri = _resolve(uri, base_fs, base_dir)
    if ".." in rel.replace("\\", "/").split("/"):
        error = error or f"listing row {row_no}: path {rel!r} would escape OUTPUT"
    qmap = _resolve(qmap_uri.strip(), base_fs, base_dir) if isinstance(qmap_uri, str) and qmap_uri.strip() else None
    return Item(uri=uri, relpath=rel, target=target, error=error, qmap_uri=qmap)


def iter_listing(url: str, storage_options: dict[str, Any] | None = None) -> Iterator[Item]:
    """Items from a Parquet or CSV listing with a ``uri`` column and optional target_* and qmap_uri columns.

    Relative URIs are resolved against the listing file's folder and mirror under OUTPUT
    as given; absolute ones mirror their path below that folder, or their full path.
    """
    base_fs, listing_path = open_fs(url, storage_options)
    base_dir = posixpath.dirname(listing_path)
    row_no = 0
    try:
        for batch in _listing_batches(url, storage_options):
            uris = batch["uri"]
            cols = {k: batch.get(f"target_{k}") for k in TARGET_KINDS}
            qmap_uris = batch.get("qmap_uri")
            for i, uri in enumerate(uris):
                row_no += 1
                targets = {k: (c[i] if c is not None else None) for k, c in cols.items()}
                yield _row_item(uri, targets, base_fs, base_dir, row_no, qmap_uris[i] if qmap_uris else None)
    except FileNotFoundError:
        raise PlanError(f"listing file not found: {url}") from None
    except (ValueError, OSError) as e:   # pyarrow.ArrowInvalid is a ValueError
        raise PlanError(f"listing {url} cannot be read (after {row_no} rows): {e}") from None


# ------------------------------------------------------------------------------ shards

def shard(items: Iterable[Item], size: int) -> Iterator[Shard]:
    batch: list[Item] = []
    index = 0
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield Shard(index, tuple(batch))
            index += 1
            batch = []
    if batch:
        yield Shard(index, tuple(batch))
