"""The Ray actor that processes shards: one loaded codec per actor, one shard per call.

Per shard: every item's bitstream is written first (with ``--layout webdataset``, the shard's
tar, whole), then the shard's manifest part, which commits the shard. The actor is a plain class here; the runner wraps it with
``ray.remote`` and the resources it needs (a GPU when the codec wants one and the cluster
has them).

An item past ``--item-timeout`` leaves its processor poisoned (``workers/processor.py``): the
worker builds a fresh one (a fresh codec) for the rest of the shard, and the shard's result
says ``replace_actor``, so the pool replaces this process and the hung thread ends with it.
"""

from __future__ import annotations

from typing import Any

from ratefit.workers.compress import CompressConfig, Compressor
from ratefit.workers.decompress import DecompressConfig, Decompressor
from ratefit.workers.items import Shard
from ratefit.workers.manifest import MANIFEST_DIR, committed_rows, part_stats, write_part
from ratefit.workers.probe import ProbeConfig, Prober
from ratefit.workers.retire import retire_shard
from ratefit.workers.storage import set_retry_window


class ShardWorker:
    def __init__(self, config: CompressConfig | DecompressConfig | ProbeConfig, storage_retry_s: float | None = None):
        if storage_retry_s is not None:
            set_retry_window(storage_retry_s)
        self.config = config
        self.layout = None   # compress: where outputs go, kept across a replaced processor
        self.processor = self._new_processor()
        self.layout = getattr(self.processor, "layout", None)
        self.replace_actor = False   # an item hung here: its thread lives on until the process ends
        self.manifest_root = f"{self.processor.out_root}/{getattr(config, 'manifest_dir', MANIFEST_DIR)}"

    def _new_processor(self) -> Compressor | Decompressor | Prober:
        config = self.config
        if isinstance(config, CompressConfig):
            return Compressor(config, layout=self.layout)
        if isinstance(config, ProbeConfig):
            return Prober(config)
        return Decompressor(config)

    def _process_items(self, shard: Shard, attempt: int) -> list[dict[str, Any]]:
        rows = []
        begin = getattr(self.processor, "begin_shard", None)
        if begin is not None:   # compress: the shard's inputs are read ahead of the codec
            begin(shard.items)
        try:
            for item in shard.items:
                if self.processor.poisoned:   # an item timed out: the items after it get a fresh codec
                    self.replace_actor = True  # (which reads them as they come)
                    getattr(self.processor, "end_shard", lambda: None)()
                    self.processor = self._new_processor()
                rows.append(self.processor(item, shard.index, attempt))
        finally:
            end = getattr(self.processor, "end_shard", None)
            if end is not None:
                end()
        self.replace_actor = self.replace_actor or self.processor.poisoned
        return rows

    def process(self, shard: Shard, attempt: int = 1) -> dict[str, Any]:
        # A retry of a shard whose part is already committed (its worker died after the commit,
        # e.g. while retiring originals) keeps those rows: redoing them could turn a verified
        # row into an error for an original that is already gone.
        fs = self.processor.out_fs
        rows = committed_rows(fs, self.manifest_root, shard.index) if attempt > 1 else None
        if rows is None:
            if self.layout is not None:
                self.layout.begin(shard.index)
            rows = self._process_items(shard, attempt)
            if self.layout is not None:   # a tar shard is written whole before the part commits it
                self.layout.commit(shard.index, rows, verify=self.config.verify)
            write_part(fs, self.manifest_root, shard.index, rows, self.processor.schema)
        stats = part_stats(rows)
        config = self.processor.config
        if getattr(config, "retire", False):   # only now: every row of the shard is committed
            stats["retired"] = retire_shard(shard.items, rows, config.run_id, config.retire_to,
                                            config.storage_options, self.processor.out_fs,
                                            self.processor.out_root, shard.index, retry=attempt > 1)
        return {"shard": shard.index, "items": len(rows), "statuses": stats["statuses"],
                "input_bytes": stats["input_bytes"], "output_bytes": stats["output_bytes"], "stats": stats,
                "replace_actor": self.replace_actor}

    def ready(self) -> str | None:
        """Called once the codec is built: the pool sends shards only to actors that answered.
        Returns the Ray node this actor runs on (None outside Ray), so the pool can drop the
        actors of a node that left the cluster."""
        try:
            import ray

            return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        except Exception:   # not in a Ray worker: nothing to tell
            return None
