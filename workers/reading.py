"""Reading a compressed OUTPUT from Python: the images, decoded, without writing PNGs.

Why: a compress job turns a photo collection into a much smaller OUTPUT (loose files or tar
shards, any fsspec URL) and a Parquet manifest. A training pipeline or a notebook should read
that collection as it is, decoding each image in memory, instead of running ``ratefit
decompress`` into a second, larger copy first. The pixels are exactly those decompress would
write: every image goes through the same ``Restorer`` (``workers/decompress.py``), fetched by
``read_stored`` (one whole-object read, or one ranged read of a tar shard member).

What is read is the output's **current state** (``manifest.current_state``): one row per input,
its latest attempt, taking rows whose status kept an output (``ok``, ``unreachable``). An
incremental OUTPUT therefore reads as one collection, never with an image twice.

Three ways in, one per kind of consumer; all three list the same rows (``stored_rows``) and
decode them the same way:

A plain iterator (notebooks, scripts): streaming, decoded by a thread pool, in manifest order::

    from ratefit.workers.reading import read_output

    for key, image, row in read_output("s3://bucket/out", storage_options={"anon": False}):
        print(key, image.size, row["codec"], row["psnr"])        # image: a PIL.Image
    for key, pixels, row in read_output("/data/out", as_array=True, workers=4):
        ...                                                      # pixels: uint8 HxWx3 (HxWx4 with alpha)

A PyTorch dataset (training); each DataLoader worker reads its own share of the rows::

    import torch
    from ratefit.workers.reading import CompressedImages

    ds = CompressedImages("/data/out", codec_options={"gain-hyperprior": {"device": "cpu"}})
    for key, pixels, row in torch.utils.data.DataLoader(ds, batch_size=None, num_workers=4):
        ...                                                      # pixels: a uint8 tensor HxWxC

A Ray Dataset (distributed preprocessing)::

    from ratefit.workers.reading import ray_dataset

    ds = ray_dataset("s3://bucket/out", storage_options={...})
    ds.count(); ds.take(1)[0]["image"].shape                     # {"key", "image", "codec", "psnr", "bpp"}

Errors: an image whose output cannot be read or decoded (missing, changed since its row was
written, corrupt, over ``max_pixels``) raises ``ReadError`` naming its key and the cause; with
``errors="skip"`` (``read_output`` and ``CompressedImages``) it is logged and left out instead.
A storage outage (``StorageUnavailable``, after the storage layer's retries) always raises:
skipping it would silently drop every image.

Outputs are read at the URIs their rows name (``output_uri``), as decompress reads them: a
folder moved after it was written is read where it was written.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from typing import Any, Callable, Iterable, Iterator, Literal, Union

import numpy as np
import torch.utils.data
from PIL import Image

from ratefit.codecs.pillow import image_with_extras
from ratefit.workers.decompress import Restored, Restorer, read_stored, restored_relpath
from ratefit.workers.items import StoredOutput
from ratefit.workers.layout import STORED
from ratefit.workers.manifest import MANIFEST_DIR, STATE_DIR, current_state
from ratefit.workers.read import DEFAULT_MAX_PIXELS, ItemError, decode_image
from ratefit.workers.storage import StorageUnavailable, open_fs, redact, with_retries

log = logging.getLogger("ratefit")

Errors = Literal["raise", "skip"]
ImageLike = Union[Image.Image, np.ndarray]
CodecOptions = dict[str, dict[str, Any]]


class ReadError(RuntimeError):
    """One image of an OUTPUT could not be read or decoded; the message names its key and why.

    ``key`` and ``uri`` say which image; the original exception is ``__cause__`` (in this
    process). Constructible from the message alone, so it survives the trip back from a
    DataLoader worker or a Ray task.
    """

    def __init__(self, message: str, key: str | None = None, uri: str | None = None):
        super().__init__(message)
        self.key = key
        self.uri = uri

    def __reduce__(self):
        return type(self), (self.args[0], self.key, self.uri)


# ---------------------------------------------------------------------------------------------
# Listing


def stored_rows(url: str, storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The current-state rows of the compress OUTPUT at ``url`` that have a stored output, in
    manifest order; every row's ``key`` is filled in (derived from ``output_uri`` for rows of
    older versions, which did not record it).

    Raises FileNotFoundError when ``url`` holds no manifest: a mistyped URL must not read as
    an empty collection.
    """
    fs, root = open_fs(url, storage_options)
    if not any(with_retries(lambda d=d: fs.exists(f"{root}/{d}"), f"stat {root}/{d}") for d in (MANIFEST_DIR, STATE_DIR)):
        raise FileNotFoundError(f"{redact(url)}: no ratefit manifest here ({MANIFEST_DIR}/); "
                                "is it the OUTPUT of a compress job?")
    base = root.replace(os.sep, "/").rstrip("/") + "/"
    rows = []
    for row in current_state(fs, root).to_pylist():
        if row["status"] in STORED and row["output_uri"]:
            if not row.get("key"):
                row["key"] = key_of(fs._strip_protocol(row["output_uri"]).replace(os.sep, "/"), base)
            rows.append(row)
    return rows


def key_of(path: str, base: str) -> str:
    """An output's key from its path: relative to OUTPUT (``base``, ending in ``/``), less the
    container suffix and the codec's extension (``a/b.png.ghp.rfic`` → ``a/b.png``,
    ``a/b.jpg.avif`` → ``a/b.jpg``), the way decompress names what it restores.
    A path outside OUTPUT (the folder was moved) keeps its full path."""
    rel = path[len(base):] if path.startswith(base) else path
    return restored_relpath(rel, original_file=True)


# ---------------------------------------------------------------------------------------------
# Decoding one row


def to_image(restored: Restored) -> Image.Image:
    """A restored output as a PIL image: RGB (RGBA with alpha) carrying ``icc_profile``,
    ``exif`` and ``xmp`` in ``info`` as ``png_bytes`` writes them; or, where the output
    restores its original file (jxl-lossless of a JPEG), that file opened as it is."""
    if restored.original is not None:
        im = Image.open(io.BytesIO(restored.original))
        im.load()
        return im
    return image_with_extras(restored.pixels, restored.extras)


def to_array(restored: Restored, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A restored output as a writable uint8 array, HxWx3 or HxWx4 with alpha: the pixels an
    input is read as (a restored original file is decoded the way ratefit reads inputs)."""
    if restored.original is not None:
        image = decode_image(restored.original, max_pixels)
        pixels, alpha = image.pixels, image.extras.alpha
    else:
        pixels, alpha = restored.pixels, restored.extras.alpha
    if alpha is not None:
        return np.dstack([pixels, alpha])
    return np.require(pixels, np.uint8, ["C", "W"])   # torch.as_tensor warns on read-only arrays


class _Reader:
    """Reads and decodes rows of one OUTPUT; each thread gets its own ``Restorer`` (codecs
    hold torch models and caches, which are not shared between threads)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None, codec_options: CodecOptions | None,
                 max_pixels: int, as_array: bool):
        self.fs, _root = open_fs(url, storage_options)
        self.codec_options = codec_options or {}
        self.max_pixels = max_pixels
        self.as_array = as_array
        self._local = threading.local()

    def restorer(self) -> Restorer:
        restorer = getattr(self._local, "restorer", None)
        if restorer is None:
            restorer = self._local.restorer = Restorer(self.codec_options, None, self.max_pixels)
        return restorer

    def restore(self, row: dict[str, Any]) -> Restored:
        """The row's output read and restored; any failure a ReadError naming the key."""
        return restore_row(self.fs, row, self.restorer())

    def __call__(self, row: dict[str, Any]) -> tuple[str, ImageLike, dict[str, Any]]:
        restored = self.restore(row)
        try:
            image = to_array(restored, self.max_pixels) if self.as_array else to_image(restored)
        except Exception as e:
            raise _read_error(row, e) from e
        return row["key"], image, row


def restore_row(fs: Any, row: dict[str, Any], restorer: Restorer) -> Restored:
    """One current-state row's output, fetched (whole, or its tar member's range) and decoded."""
    uri = row["output_uri"]
    try:
        stored = StoredOutput.of_row(row)
        data = read_stored(fs, fs._strip_protocol(uri), stored)
        return restorer.restore(data, stored, uri)
    except Exception as e:   # ItemError (read / decode), StorageUnavailable, a codec's own bug
        raise _read_error(row, e) from e


def _read_error(row: dict[str, Any], e: BaseException) -> ReadError:
    uri = redact(row.get("output_uri"))
    cause = str(e) if isinstance(e, (ItemError, StorageUnavailable)) else f"{type(e).__name__}: {redact(str(e))}"
    return ReadError(f"{row.get('key')}: cannot read its output {uri}: {cause}", row.get("key"), uri)


# ---------------------------------------------------------------------------------------------
# Streaming


def _ordered(fn: Callable[[dict[str, Any]], Any], rows: Iterable[dict[str, Any]], workers: int,
             prefetch: int) -> Iterator[Future]:
    """``fn`` over ``rows`` on ``workers`` threads, as futures in ``rows``' order, at most
    ``prefetch`` submitted ahead of the consumer (bounded memory). Closing the iterator
    cancels what was not started and waits for the few items in flight."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ratefit-read")
    pending: deque[Future] = deque()
    it = iter(rows)
    try:
        for row in islice(it, prefetch):
            pending.append(pool.submit(fn, row))
        while pending:
            done = pending.popleft()
            for row in islice(it, 1):   # keep the pool busy while the consumer works
                pending.append(pool.submit(fn, row))
            yield done
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _stream(reader: Callable[[dict[str, Any]], Any], rows: list[dict[str, Any]], workers: int,
            errors: Errors) -> Iterator[Any]:
    """``reader``'s results in row order; a ReadError raised, or logged and skipped."""
    with contextlib.closing(_ordered(reader, rows, workers, prefetch=2 * workers)) as futures:
        for future in futures:
            try:
                result = future.result()
            except ReadError as e:
                if errors == "raise" or isinstance(e.__cause__, StorageUnavailable):
                    raise
                log.warning("skipped %s", e)
                continue
            yield result


def _check(workers: int, errors: Errors) -> None:
    """Refuse bad arguments when called, not at the first image."""
    if errors not in ("raise", "skip"):
        raise ValueError(f"errors: 'raise' or 'skip', got {errors!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers: a positive number of threads, got {workers!r}")


def read_output(url: str, *, storage_options: dict[str, Any] | None = None, as_array: bool = False,
                workers: int = 8, codec_options: CodecOptions | None = None,
                max_pixels: int = DEFAULT_MAX_PIXELS, errors: Errors = "raise",
                ) -> Iterator[tuple[str, ImageLike, dict[str, Any]]]:
    """Every image of the compress OUTPUT at ``url`` as ``(key, image, row)``, in manifest order.

    ``key`` is the input's path relative to INPUT (``sub/b.jpg``); ``image`` a PIL image (RGB,
    RGBA with alpha, ICC / EXIF / XMP in ``info``; a restored original file as it is) or, with
    ``as_array``, a uint8 array HxWx3 (HxWx4 with alpha); ``row`` the image's manifest row (a
    dict of the compress schema plus ``retired``).

    Streaming: the rows are listed first (one manifest read), then read and decoded by
    ``workers`` threads at most ``2 * workers`` images ahead of the caller, so memory stays
    bounded whatever the collection's size. Each thread loads its own codecs (for a learned
    codec, its own model copy: few threads suffice on one GPU).

    ``codec_options``: per codec name, the options to build it with (``{"gain-hyperprior":
    {"device": "cpu", "weights": URL}}``); default the codec's defaults (bundled weights).
    ``errors``: ``"raise"`` (default) raises ReadError naming the first image that fails;
    ``"skip"`` logs it and goes on. An outage of the store always raises.
    """
    _check(workers, errors)
    rows = stored_rows(url, storage_options)
    reader = _Reader(url, storage_options, codec_options, max_pixels, as_array)
    return _stream(reader, rows, workers, errors)


# ---------------------------------------------------------------------------------------------
# PyTorch


class CompressedImages(torch.utils.data.IterableDataset):
    """The images of a compress OUTPUT as a PyTorch ``IterableDataset``.

    The rows are listed once, here (every DataLoader worker then holds the same list); each
    worker reads ``rows[worker_id::num_workers]``, so every image is yielded exactly once
    across workers, and decodes its share with ``workers`` threads of its own.

    An item is ``(key, uint8 array HxWxC, row)`` (a PIL image with ``as_array=False``), or
    what ``transform(key, image, row)`` returns. Use ``DataLoader(ds, batch_size=None)``:
    without batching, the loader's ``default_convert`` turns the array into a uint8 tensor and
    leaves ``key`` and the row dict as they are (its values are str, int, float, bool or None).
    Images differ in size, so batching needs a ``transform`` that crops or resizes them (and
    a ``collate_fn`` that drops the rows, which hold None).
    """

    def __init__(self, url: str, *, storage_options: dict[str, Any] | None = None, as_array: bool = True,
                 workers: int = 2, codec_options: CodecOptions | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, errors: Errors = "raise",
                 transform: Callable[[str, ImageLike, dict[str, Any]], Any] | None = None):
        super().__init__()
        _check(workers, errors)
        self.url = url
        self.storage_options = storage_options
        self.as_array = as_array
        self.workers = workers
        self.codec_options = codec_options
        self.max_pixels = max_pixels
        self.errors = errors
        self.transform = transform
        self.rows = stored_rows(url, storage_options)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        rows = self.rows if info is None else self.rows[info.id::info.num_workers]
        reader = _Reader(self.url, self.storage_options, self.codec_options, self.max_pixels, self.as_array)
        for key, image, row in _stream(reader, rows, self.workers, self.errors):
            yield (key, image, row) if self.transform is None else self.transform(key, image, row)


# ---------------------------------------------------------------------------------------------
# Ray Data

# What a Ray task needs of a row to read it, and what it returns besides the image.
_RAY_FIELDS = ("key", "output_uri", "codec", "output_sha256", "width", "height", "rate_param",
               "shard_uri", "offset", "length", "psnr", "bpp")
_ray_restorers: dict[str, Restorer] = {}   # per Ray worker process: codecs load once, not per row
_ray_lock = threading.Lock()


def _ray_restorer(codec_options: CodecOptions | None, max_pixels: int) -> Restorer:
    cache_key = json.dumps([codec_options or {}, max_pixels], sort_keys=True, default=repr)
    with _ray_lock:
        if cache_key not in _ray_restorers:
            _ray_restorers[cache_key] = Restorer(codec_options or {}, None, max_pixels)
        return _ray_restorers[cache_key]


def _ray_read(item: dict[str, Any], *, url: str, storage_options: dict[str, Any] | None,
              codec_options: CodecOptions | None, max_pixels: int) -> dict[str, Any]:
    """One row (as Ray Data hands it over) → ``{"key", "image", "codec", "psnr", "bpp"}``."""
    row = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in item.items()}
    fs, _root = open_fs(url, storage_options)   # fsspec caches the instance per process
    restored = restore_row(fs, row, _ray_restorer(codec_options, max_pixels))
    try:
        image = to_array(restored, max_pixels)
    except Exception as e:
        raise _read_error(row, e) from e
    return {"key": row["key"], "image": image, "codec": row["codec"], "psnr": row["psnr"], "bpp": row["bpp"]}


def ray_dataset(url: str, *, storage_options: dict[str, Any] | None = None,
                codec_options: CodecOptions | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                **map_options: Any):
    """The images of the compress OUTPUT at ``url`` as a lazy ``ray.data.Dataset`` of
    ``{"key": str, "image": uint8 HxWxC, "codec": str, "psnr": float, "bpp": float}``.

    The rows are listed here, on the driver; the reads and decodes run in Ray tasks, each
    worker process loading its codecs once. ``map_options`` go to ``Dataset.map`` (e.g.
    ``num_gpus=1`` for a learned codec on GPUs, ``concurrency``). An image that fails raises
    ReadError in its task (Ray's ``DataContext.max_errored_blocks`` can tolerate some). The
    dataset is lazy and one row per image: ``count()`` alone reads no image (``materialize()``
    reads them all once).
    Connect to Ray first (``ray.init``), or Ray Data starts a local one.
    """
    import functools

    import ray.data

    rows = stored_rows(url, storage_options)
    items = [{k: r.get(k) for k in _RAY_FIELDS} for r in rows]
    fn = functools.partial(_ray_read, url=url, storage_options=storage_options, codec_options=codec_options,
                           max_pixels=max_pixels)
    return ray.data.from_items(items).map(fn, **map_options)
