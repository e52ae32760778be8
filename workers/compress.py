"""Compress one item: read → decode → rate search → container → write → round-trip metrics.

Every failure becomes a row naming the stage and the cause; nothing here raises to Ray.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from ratefit.codecs import container
from ratefit.codecs.metrics import ms_ssim, psnr
from ratefit.codecs.rate import Target, search
from ratefit.codecs.registry import get_codec
from ratefit.workers.items import Item
from ratefit.workers.manifest import COMPRESS_SCHEMA, MANIFEST_DIR, empty_row
from ratefit.workers.read import DEFAULT_MAX_PIXELS, ItemError, read_image
from ratefit.workers.storage import atomic_write, full_url, open_fs, redact, safe_join


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


class Compressor:
    """Holds one loaded codec and the output filesystem for the life of a worker."""

    schema = COMPRESS_SCHEMA

    def __init__(self, config: CompressConfig):
        self.config = config
        self.codec = get_codec(config.codec, **config.codec_options)
        self.out_fs, self.out_root = open_fs(config.output, config.storage_options)

    def output_relpath(self, item: Item) -> str:
        return f"{item.relpath}.{self.codec.extension}"

    def __call__(self, item: Item, shard: int, attempt: int) -> dict[str, Any]:
        codec = self.codec
        row = empty_row(COMPRESS_SCHEMA)
        target = item.target or self.config.target
        row.update(input_uri=redact(item.uri), codec=codec.name, attempt=attempt, shard=shard,
                   target_kind=target.kind if target else None, target_value=target.value if target else None)
        stage = "plan"
        try:
            if item.error:
                raise ItemError("plan", item.error)
            try:
                out_path = safe_join(self.out_root, self.output_relpath(item))
            except ValueError as e:
                raise ItemError("plan", str(e)) from None
            row["output_uri"] = redact(full_url(self.out_fs, out_path))
            if target is None:
                raise ItemError("plan", "no target: give --target-bpp/--target-bytes/--target-psnr "
                                        "or a target_* column in the listing")
            stage = "read"
            image, row["input_bytes"] = read_image(item, self.config.storage_options, self.config.max_pixels)
            h, w = image.height, image.width
            row.update(width=w, height=h, original_mode=image.original_mode)

            stage = "encode"
            t0 = time.perf_counter()
            prepared = codec.prepare(image.pixels)
            overhead = container.header_size(codec.name, codec.weights_sha256, image.original_mode)
            outcome = search(codec, prepared, image.pixels, target, overhead)
            blob = container.pack(codec.name, outcome.payload, value=outcome.value, width=w, height=h,
                                  mode=image.original_mode, weights_sha256=codec.weights_sha256)
            row["encode_ms"] = (time.perf_counter() - t0) * 1000.0

            stage = "write"
            atomic_write(self.out_fs, out_path, blob)

            stage = "metrics"
            header, payload = container.unpack(blob)
            restored = codec.decode(payload, header.width, header.height, header.value)
            p = psnr(image.pixels, restored)
            row.update(
                status=outcome.status, error=outcome.reason, output_bytes=len(blob),
                bpp=len(blob) * 8.0 / (w * h), rate_param=outcome.value, encodes=outcome.encodes,
                psnr=p if math.isfinite(p) else float("inf"),
                ms_ssim=ms_ssim(image.pixels, restored) if self.config.ms_ssim else None,
            )
        except ItemError as e:
            row.update(status="error", error=redact(str(e)))
        except Exception as e:  # a codec or storage failure on this item only
            row.update(status="error", error=redact(f"{stage}: {type(e).__name__}: {e}"))
        return row
