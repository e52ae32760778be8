"""A budget job's first pass: probe each image's rate–distortion curve, write no bitstreams.

Runs on the same shard actors as compression (same read/decode policy, same codec), one row
per item in ``OUTPUT/_plan/probes/``; failures become rows that the encode pass repeats as
errors, so every input still gets exactly one manifest row.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ratefit.codecs import container
from ratefit.codecs.base import capabilities_of
from ratefit.codecs.probe import probe, probe_values
from ratefit.workers.codec_loader import load_codec
from ratefit.workers.items import Item
from ratefit.workers.manifest import PROBE_SCHEMA
from ratefit.workers.memory import with_tile_fallback
from ratefit.workers.processor import ItemProcessor
from ratefit.workers.read import DEFAULT_MAX_PIXELS, read_image
from ratefit.workers.storage import open_fs

PROBES_DIR = "_plan/probes"


@dataclass
class ProbeConfig:
    output: str
    codec: str
    codec_options: dict[str, Any] = field(default_factory=dict)
    probes: int | None = None          # values per image; None: the codec kind's default
    storage_options: dict[str, Any] = field(default_factory=dict)
    max_pixels: int = DEFAULT_MAX_PIXELS
    manifest_dir: str = PROBES_DIR
    item_timeout_s: float | None = 600.0  # --item-timeout: an item past it is an error row (processor.py)


class Prober(ItemProcessor):
    schema = PROBE_SCHEMA

    def __init__(self, config: ProbeConfig):
        self.config = config
        self.codec = load_codec(config.codec, **config.codec_options)
        self.values = probe_values(self.codec.control, config.probes, capabilities_of(self.codec).sweep)
        self.out_fs, self.out_root = open_fs(config.output, config.storage_options)

    def start_row(self, item: Item, row: dict[str, Any]) -> None:
        row.update(codec=self.codec.name, target_kind=item.target.kind if item.target else None,
                   target_value=item.target.value if item.target else None)

    def process(self, item: Item, row: dict[str, Any], stages: list[str]) -> None:
        codec = self.codec
        stages.append("read")
        image, row["input_bytes"] = read_image(item, self.config.storage_options, self.config.max_pixels)
        row.update(width=image.width, height=image.height)
        stages.append("probe")
        t0 = time.perf_counter()
        overhead = container.header_size(codec.name, codec.weights_sha256, image.original_mode)

        def measure() -> list:
            prepared = codec.prepare(image.pixels)
            return [probe(codec, prepared, image.pixels, v, overhead) for v in self.values]

        points = with_tile_fallback(codec, measure, max(image.width, image.height), item.uri)
        row.update(status="ok", probe_value=[p.value for p in points],
                   probe_bytes=[p.stored_bytes for p in points], probe_psnr=[p.psnr for p in points],
                   probe_exact=all(p.exact for p in points), probe_ms=(time.perf_counter() - t0) * 1000.0)
