"""Compress one item: read → decode → rate search → container → write → round-trip metrics.

Every failure becomes a row naming the stage and the cause (``workers/processor.py``: only a
storage outage is raised, so the job stops and a re-run resumes).
"""

from __future__ import annotations

import hashlib
import math
import posixpath
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ratefit.codecs import container
from ratefit.codecs import qmap as qmaps
from ratefit.codecs.base import EMBEDDABLE, CodecError, Extras, capabilities_of, payload_weights_sha256
from ratefit.codecs.metrics import ms_ssim, psnr
from ratefit.codecs.rate import Outcome, Target, aim, search
from ratefit.workers.codec_loader import load_codec
from ratefit.workers.decompress import check_container, decode_payload, decode_plain, stored_extras
from ratefit.workers.items import Item
from ratefit.workers.layout import FileLayout, make_layout
from ratefit.workers.manifest import COMPRESS_SCHEMA, MANIFEST_DIR
from ratefit.workers.memory import with_tile_fallback
from ratefit.workers.processor import ItemProcessor
from ratefit.workers.readahead import ReadAhead
from ratefit.workers.read import DEFAULT_MAX_PIXELS, DecodedImage, ItemError, read_image, read_quality_map
from ratefit.workers.storage import open_fs, redact, stat_input


@dataclass
class CompressConfig:
    output: str
    codec: str
    codec_options: dict[str, Any] = field(default_factory=dict)
    target: Target | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    max_pixels: int = DEFAULT_MAX_PIXELS
    ms_ssim: bool = True
    manifest_dir: str = MANIFEST_DIR    # a budget job's correction pass commits its rows elsewhere
    verify: bool = False                # read each stored file back and decode it before its row says ok
    qmap: str | None = None             # spatial codecs: a map generator name or a folder of PNG maps
    run_id: str | None = None           # incremental runs: written into every row
    retire: bool = False                # --retire-originals: the actor retires verified originals after commit
    retire_to: str | None = None        # ... moving them under this prefix instead of deleting them
    refine_steps: int = 0               # latent refinement steps per image before the final search (0 = off)
    strip_metadata: bool = False        # --strip-metadata: no EXIF, XMP or ICC profile travels (pixels go to sRGB)
    srgb: bool = False                  # --srgb: pixels converted to sRGB through their profile, which is dropped
    min_savings: float = 0.0            # --min-savings: a result must be this fraction smaller than its input
    item_timeout_s: float | None = 600.0  # --item-timeout: an item past it is an error row (processor.py)
    layout: str = "files"               # --layout: one file per output, or webdataset tar shards (layout.py)
    batch: int | None = None            # images analysed per pass (codecs with prepare_batch); None: 8 on CUDA, else 1


@dataclass
class _Read:
    """One item's read, done ahead (``readahead.py``) or inline: what its row records, even
    when it failed (a listing input's size and version are asked before it is read)."""

    stat: tuple[int | None, str | None] | None = None
    image: DecodedImage | None = None
    input_bytes: int | None = None
    error: Exception | None = None
    ms: float = 0.0


class TimedCodec:
    """A codec whose prepare/estimate/encode/decode calls add up their time (ms) in ``ms``.

    Rate control sees it as the codec itself, so the manifest can say where an item's
    encode time went (analysis, cheap estimates, real encodes) without rate control or the
    codecs knowing about timing.
    """

    def __init__(self, codec: Any):
        self._codec = codec
        self.ms: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        if name == "estimate_exact" and hasattr(self._codec, name):   # timed with the estimates
            return lambda prepared, value: self._timed("estimate_exact", prepared, value)
        return getattr(self._codec, name)

    def _timed(self, method: str, *args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return getattr(self._codec, method)(*args)
        finally:
            self.ms[method] += (time.perf_counter() - t0) * 1000.0

    def prepare(self, image: np.ndarray, *qmap: np.ndarray | None, **extras: Extras) -> Any:
        t0 = time.perf_counter()
        try:
            return self._codec.prepare(image, *qmap, **extras)
        finally:
            self.ms["prepare"] += (time.perf_counter() - t0) * 1000.0

    def estimate(self, prepared: Any, value: float) -> float | None:
        return self._timed("estimate", prepared, value)

    def encode(self, prepared: Any, value: float) -> bytes:
        return self._timed("encode", prepared, value)

    def decode(self, payload: bytes, width: int, height: int, value: float) -> np.ndarray:
        return self._timed("decode", payload, width, height, value)

    def reconstruct(self, prepared: Any, value: float) -> np.ndarray:
        return self._timed("reconstruct", prepared, value)

    def refine(self, prepared: Any, image: np.ndarray, value: float, steps: int) -> Any:
        return self._timed("refine", prepared, image, value, steps)


class VerifyError(ItemError):
    """A stored bitstream did not read back as written; the file has been removed."""

    def __init__(self, message: str):
        super().__init__("verify", message)


class Compressor(ItemProcessor):
    """Holds one loaded codec and the output filesystem for the life of a worker."""

    schema = COMPRESS_SCHEMA

    def __init__(self, config: CompressConfig, layout: FileLayout | None = None):
        """``layout``: where outputs go; the shard worker passes its own, which outlives a
        processor replaced after a timeout (a tar shard's members are held there)."""
        self.config = config
        self.codec = load_codec(config.codec, **config.codec_options)
        self.capabilities = capabilities_of(self.codec)
        self.spatial = self.capabilities.spatial
        if config.qmap and not self.spatial:
            raise CodecError(f"--qmap {config.qmap}: codec {config.codec} has no spatial rate control "
                             f"(quality maps need gain-hyperprior-roi)")
        if config.refine_steps and not self.capabilities.refine:
            raise CodecError(f"--refine-steps {config.refine_steps}: codec {config.codec} has no latent "
                             f"refinement (gain-hyperprior has)")
        caps = self.capabilities
        # What the output keeps beside the colour: a container keeps everything in its sections,
        # a plain file what its format embeds.
        self.keeps = caps.embeds if caps.plain_file else EMBEDDABLE
        self.out_fs, self.out_root = open_fs(config.output, config.storage_options)
        self.layout = layout or make_layout(config.layout, self.out_fs, self.out_root, config.run_id)
        # Warm start: the rate search of an item begins at the control value the item before it
        # in the same shard landed on (neighbouring images of a collection land close). Reset at
        # each shard, so an item's output depends only on its shard, not on which actor ran it.
        self._warm: tuple[int, float] | None = None   # (shard, control value)
        self.batch = max(1, int(config.batch or (8 if self.codec.device == "cuda" else 1))) \
            if self.capabilities.batch and not self.spatial else 1
        self._ahead: ReadAhead[_Read] | None = None
        self._batched: dict[str, tuple[Any, float]] = {}   # item name -> (prepared, its share of the ms)

    def begin_shard(self, items: list[Item]) -> None:
        """Read the shard's items ahead of the one being coded (``batch`` of them, at least one)."""
        self.end_shard()
        self._ahead = ReadAhead(self._read, items, depth=self.batch)

    def end_shard(self) -> None:
        if self._ahead is not None:
            self._ahead.close()
        self._ahead, self._batched = None, {}

    def __call__(self, item: Item, shard: int, attempt: int) -> dict[str, Any]:
        self._shard = shard
        return super().__call__(item, shard, attempt)

    def start_row(self, item: Item, row: dict[str, Any]) -> None:
        target = item.target or self.config.target
        row.update(codec=self.codec.name, run_id=self.config.run_id, key=redact(item.relpath),
                   source_version=item.version, input_bytes=item.size,   # as planned, until read
                   target_kind=target.kind if target else None, target_value=target.value if target else None)

    def failed(self, row: dict[str, Any], error: ItemError) -> None:
        super().failed(row, error)
        if isinstance(error, VerifyError):   # the file was removed: nothing stored, nothing verified
            row.update(output_uri=None, verified=False)

    def process(self, item: Item, row: dict[str, Any], stages: list[str]) -> None:
        codec = self.codec
        target = item.target or self.config.target
        try:
            row["output_uri"] = self.layout.uri(item.relpath, codec.extension)
        except ValueError as e:
            raise ItemError("plan", str(e)) from None
        lossless = self.capabilities.lossless
        if target is None and not lossless:
            raise ItemError("plan", "no target: give --target-bpp/--target-bytes/--target-psnr "
                                    "or a target_* column in the listing")
        if target is not None and lossless:
            raise ItemError("plan", f"codec {codec.name} is lossless: rate targets do not apply "
                                    f"(the listing gives target_{target.kind})")
        stages.append("read")
        ahead, read = self._ahead.take(item) if self._ahead is not None else (False, None)
        if not ahead:
            read = self._read(item)
        if read.stat is not None:
            row["input_bytes"], row["source_version"] = read.stat
        if read.error is not None:
            raise read.error
        image, row["input_bytes"], row["read_ms"] = read.image, read.input_bytes, read.ms
        row.update(width=image.width, height=image.height, original_mode=image.original_mode, frames=image.frames,
                   input_sha256=image.sha256)
        self.keep_what_travels(image, row)

        stages.append("qmap")
        qmap = self.quality_map(item, image, row)
        with_tile_fallback(codec, lambda: self._encode_write_measure(image, target, item.relpath, row, stages, qmap),
                           max(image.width, image.height), item.uri)

    def _read(self, item: Item) -> _Read:
        """Stat (a listing's input: before reading, so a change in between is seen next run) and read."""
        t0 = time.perf_counter()
        read = _Read()
        try:
            if item.version is None and self.config.run_id:
                read.stat = stat_input(item.uri, self.config.storage_options)
            cfg = self.config
            plain_pixels = cfg.srgb or cfg.strip_metadata
            read.image, read.input_bytes = read_image(
                item, cfg.storage_options, cfg.max_pixels, keep_icc=not plain_pixels and "icc" in self.keeps,
                keep_metadata=not cfg.strip_metadata,
                keep_source=self.capabilities.restores_original and not plain_pixels)
        except Exception as e:   # raised in its own item's read stage, so it fails that row only
            read.error = e
        read.ms = (time.perf_counter() - t0) * 1000.0
        return read

    def _prepare(self, timed: TimedCodec, image: DecodedImage, name: str, qmap: np.ndarray | None) -> Any:
        """The codec's ``prepare`` of this item: from a batch made with the items after it in
        the shard (codecs with ``prepare_batch``, ``batch`` > 1), else on its own."""
        if self.spatial:
            return timed.prepare(image.pixels, qmap)
        if self.capabilities.embeds:
            return timed.prepare(image.pixels, extras=image.extras)
        ready = self._batched.pop(name, None)
        if ready is not None:
            timed.ms["prepare"] += ready[1]
            return ready[0]
        group = self._batch_after(name, image)
        if len(group) > 1:
            t0 = time.perf_counter()
            try:
                prepared = self.codec.prepare_batch([im.pixels for _, im in group])
            except Exception:   # e.g. out of memory for the batch: each item on its own instead
                prepared = None
            if prepared is not None:
                share = (time.perf_counter() - t0) * 1000.0 / len(group)
                for (other, _), p in zip(group[1:], prepared[1:]):
                    self._batched[other] = (p, share)
                timed.ms["prepare"] += share
                return prepared[0]
        return timed.prepare(image.pixels)

    def _batch_after(self, name: str, image: DecodedImage) -> list[tuple[str, DecodedImage]]:
        """This item and the next ones of its shard of the same size (read ahead, waiting for
        their reads), up to ``batch``; none larger than the codec's tile."""
        group = [(name, image)]
        ahead = self._ahead
        tile = getattr(self.codec, "tile", 0) or 0
        if self.batch <= 1 or ahead is None or (tile and max(image.width, image.height) > tile):
            return group
        i = next((k for k in range(len(ahead)) if ahead.item(k).relpath == name), None)
        if i is None:
            return group
        shape = image.pixels.shape
        for j in range(i + 1, i + self.batch):
            other = ahead.item(j)
            if other is None:
                break
            read = ahead.peek(j)
            if read.error is not None or read.image is None or read.image.pixels.shape != shape \
                    or (tile and max(read.image.width, read.image.height) > tile):
                break
            group.append((other.relpath, read.image))
        return group

    def keep_what_travels(self, image: DecodedImage, row: dict[str, Any]) -> None:
        """Fit the image's extras to what the output keeps, and say in the row what travelled.

        An alpha the output cannot keep (JPEG) is composited onto white, as a viewer shows it.
        """
        extras = image.extras
        row["has_alpha"] = extras.alpha is not None
        row["alpha_dropped"] = extras.alpha is not None and "alpha" not in self.keeps
        if row["alpha_dropped"]:
            image.pixels = image.matted()
        image.extras = extras.only(self.keeps)
        kept = image.extras
        row.update(has_icc=kept.icc is not None, exif_bytes=len(kept.exif or b""), xmp_bytes=len(kept.xmp or b""))

    def quality_map(self, item: Item, image: DecodedImage, row: dict[str, Any]) -> np.ndarray | None:
        """The item's quality map: its listing's PNG, else the job's generator or PNG folder; None without."""
        source = item.qmap_uri or self.config.qmap
        if source is None:
            return None
        if not self.spatial:
            raise ItemError("qmap", f"codec {self.codec.name} has no spatial rate control: the listing's "
                                    f"qmap_uri needs gain-hyperprior-roi")
        if item.qmap_uri is None and source in qmaps.GENERATORS:
            row["qmap"] = source
            try:
                return qmaps.generate(source, image.pixels)
            except qmaps.QmapError as e:
                raise ItemError("qmap", str(e)) from None
        if item.qmap_uri is None:   # a folder of PNGs mirroring the input: a/b.jpg -> FOLDER/a/b.png
            source = source.rstrip("/") + "/" + posixpath.splitext(item.relpath)[0] + ".png"
        row["qmap"] = redact(source)
        return read_quality_map(source, self.config.storage_options, image.height, image.width)

    def _encode_write_measure(self, image: DecodedImage, target: Target, name: str, row: dict[str, Any],
                              stages: list[str], qmap: np.ndarray | None = None) -> None:
        """Everything after reading, as one unit an out-of-memory retry can run again."""
        codec = self.codec
        h, w = image.height, image.width
        stages.append("encode")
        t0 = time.perf_counter()
        timed = TimedCodec(codec)
        caps = self.capabilities
        prepared = self._prepare(timed, image, name, qmap)
        if caps.plain_file:
            overhead, sections = 0, {}
        else:   # the container's sections carry the extras, and count in the target
            sections = container.sections_of(image.extras)
            overhead = container.header_size(codec.name, codec.weights_sha256, image.original_mode, sections)
        steps = self.config.refine_steps
        if steps:
            # Refine at the value the search would pick, then search again on the refined
            # latents: the ceiling holds and the real encode stays one.
            prepared = timed.refine(prepared, image.pixels, aim(timed, prepared, image.pixels, target, overhead), steps)
        if caps.lossless:
            value = codec.control.low
            outcome = Outcome(value, timed.encode(prepared, value), "ok", None, encodes=1)
        else:
            shard = getattr(self, "_shard", None)
            start = self._warm[1] if self._warm is not None and self._warm[0] == shard else None
            outcome = search(timed, prepared, image.pixels, target, overhead, start=start)
            if outcome.status == "ok" and not codec.control.discrete:
                self._warm = (shard, outcome.value)
        if caps.plain_file:
            blob = outcome.payload
        else:
            blob = container.pack(codec.name, outcome.payload, value=outcome.value, width=w, height=h,
                                  mode=image.original_mode, sections=sections,
                                  weights_sha256=payload_weights_sha256(codec, outcome.payload))
        exact = self.exact_original(outcome.payload, image) if caps.restores_original else None
        t1 = time.perf_counter()
        row.update(encode_ms=(t1 - t0) * 1000.0, analysis_ms=timed.ms["prepare"], refine_ms=timed.ms["refine"],
                   search_ms=timed.ms["estimate"] + timed.ms["estimate_exact"] + timed.ms["decode"], entropy_ms=timed.ms["encode"],
                   refine_steps=steps, exact_original=exact, rate_param=outcome.value, encodes=outcome.encodes,
                   estimates=outcome.estimates)
        if self.not_smaller(len(blob), row, name):
            return

        stages.append("write")
        self.layout.put(name, codec.extension, blob)
        t2 = time.perf_counter()
        row["write_ms"] = (t2 - t1) * 1000.0

        row["output_sha256"] = hashlib.sha256(blob).hexdigest()
        if self.config.verify:
            stages.append("verify")
            restored = self.verify(name, blob, prepared, outcome.value, image, exact)
            row["verified"] = True
            stages.append("metrics")
        else:
            stages.append("metrics")
            # A codec with ``reconstruct`` gives the decoder's very pixels without decoding the
            # stream (``verify`` checks that equality on every item it verifies).
            restored = None if exact else (timed.reconstruct(prepared, outcome.value) if caps.reconstruct
                                           else codec.decode(outcome.payload, w, h, outcome.value))
        if exact:   # the input file comes back byte for byte: its picture is the input's
            p, q = float("inf"), (1.0 if self.config.ms_ssim else None)
        else:
            p = psnr(image.pixels, restored)
            q = ms_ssim(image.pixels, restored) if self.config.ms_ssim else None
        row.update(
            status=outcome.status, error=outcome.reason, output_bytes=len(blob),
            bpp=len(blob) * 8.0 / (w * h), psnr=p if math.isfinite(p) else float("inf"), ms_ssim=q,
        )
        if qmap is not None:
            row["psnr_roi"], row["psnr_outside"] = qmaps.region_psnr(image.pixels, restored, qmaps.roi_mask(qmap))
        row["metrics_ms"] = (time.perf_counter() - t2) * 1000.0

    def exact_original(self, payload: bytes, image: DecodedImage) -> bool:
        """Whether ``payload`` gives the input file back byte for byte (checked, never assumed)."""
        original = self.codec.original_of(payload)
        if original is None:
            return False
        if hashlib.sha256(original).hexdigest() != image.sha256:
            raise ItemError("encode", f"{self.codec.name}: the reconstructed original differs from the input "
                                      f"({len(original)} B, SHA-256 mismatch)")
        return True

    def not_smaller(self, size: int, row: dict[str, Any], name: str) -> bool:
        """The skip rule: a result not smaller than its input (by --min-savings) is not kept.

        The row says ``skipped`` with the sizes, no output object is left (an earlier run's
        output at that path goes too), and such an item is never retired.
        """
        limit = row["input_bytes"] * (1.0 - self.config.min_savings)
        if size < row["input_bytes"] and size <= limit:
            return False
        rule = (f" (--min-savings {self.config.min_savings:g} allows at most {int(limit):,} B)"
                if self.config.min_savings else "")
        row.update(status="skipped", output_uri=None, candidate_bytes=size,
                   error=f"kept original: {size:,} B output ≥ {row['input_bytes']:,} B input{rule}"
                   if size >= row["input_bytes"] else f"kept original: {size:,} B output{rule}")
        self.layout.discard(name, self.codec.extension)
        return True

    def verify(self, name: str, blob: bytes, prepared: Any, value: float, image: DecodedImage,
               exact: bool | None = None) -> np.ndarray:
        """Read the stored file back, decode it as a decompress job would, and compare.

        The stored bytes must equal what was written; the decoded picture must equal the
        encoder's own reconstruction bit for bit where the codec has one (the learned codecs,
        on the same device type). Classical codecs have no separate reconstruction: for them
        the check is the byte comparison plus a clean decode to the right size. Lossless codecs
        must give the input back: the original file's SHA-256 where they restore it (JPEG →
        JPEG XL → the same JPEG), else the very pixels. A container's alpha section must give the
        alpha back exactly. On a mismatch the file is removed, so no row and no file outlives a
        bitstream that does not decode. (A tar shard's member is read back whole when the shard
        is written: ``TarLayout.commit``.)
        """
        codec = self.codec
        try:
            stored = self.layout.read_back(name, codec.extension)
            if stored != blob:
                raise VerifyError(f"stored file is {len(stored)} bytes and differs from the {len(blob)} written")
            # Byte-equal to what this codec just wrote: a header names this codec, and the
            # input already passed the pixel limit when it was read.
            try:
                if self.capabilities.plain_file:
                    payload = stored
                    decoded = decode_plain(codec, payload, image.width, image.height, value)
                    extras = stored_extras(codec, payload)
                else:
                    header, payload = check_container(stored, max_pixels=1 << 62)
                    decoded = decode_payload(codec, header, payload)
                    extras = stored_extras(codec, payload, header)
            except ItemError as e:
                raise VerifyError(f"stored file does not decode: {e.message}") from None
            self.verify_lossless(decoded, extras, image, exact)
            if self.capabilities.reconstruct:
                expected = codec.reconstruct(prepared, value)
                if not np.array_equal(decoded, expected):
                    diff = np.abs(decoded.astype(np.int16) - expected.astype(np.int16))
                    raise VerifyError(f"decoded picture differs from the encoder's reconstruction in "
                                      f"{int(np.count_nonzero(diff))} samples (max {int(diff.max())} levels)")
            return decoded
        except VerifyError:
            try:
                self.layout.discard(name, codec.extension)
            except Exception:
                pass
            raise

    def verify_lossless(self, decoded: np.ndarray, extras: Extras, image: DecodedImage, exact: bool | None) -> None:
        """What a lossless output and a kept alpha must give back exactly.

        A restored original's SHA-256 was checked on these very bytes before the write
        (``exact_original``; the stored file equals them), so it is not reconstructed again.
        """
        caps = self.capabilities
        alpha = image.extras.alpha
        if alpha is not None and (not caps.plain_file or caps.lossless):
            if extras.alpha is None or not np.array_equal(extras.alpha, alpha):
                raise VerifyError("stored alpha differs from the input's")
        if not caps.lossless:
            return
        if not exact and not np.array_equal(decoded, image.pixels):
            raise VerifyError("lossless output does not decode to the input's pixels")
