"""The skeleton every per-item worker shares (compress, probe, decompress): one row per item,
whatever happens to it.

A processor fills its row stage by stage (``stages`` names where it is). Whatever goes wrong
becomes that row's ``error``, naming the stage: an ItemError as it says, any other exception
as ``<stage>: <type>: <message>``. The one exception is a storage outage (StorageUnavailable):
it is not the item's fault, so it is raised, the shard stops, the job reports it and a re-run
resumes, instead of recording good inputs as errors. This rule is written here once.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from ratefit.workers.items import Item
from ratefit.workers.manifest import empty_row
from ratefit.workers.read import ItemError
from ratefit.workers.storage import StorageUnavailable, redact


class ItemProcessor:
    """Subclasses set ``schema`` and implement ``process``; ``out_fs``/``out_root`` name OUTPUT."""

    schema: pa.Schema
    out_fs: Any
    out_root: str

    def start_row(self, item: Item, row: dict[str, Any]) -> None:
        """Fields known before any work (codec, target, what was planned)."""

    def process(self, item: Item, row: dict[str, Any], stages: list[str]) -> None:
        """Do the work and fill ``row`` (status included); raise on failure."""
        raise NotImplementedError

    def failed(self, row: dict[str, Any], error: ItemError) -> None:
        """Record ``error`` in ``row``; a processor may also undo fields that no longer hold."""
        row.update(status="error", error=redact(str(error)))

    def __call__(self, item: Item, shard: int, attempt: int) -> dict[str, Any]:
        row = empty_row(self.schema)
        row.update(input_uri=redact(item.uri), attempt=attempt, shard=shard)
        self.start_row(item, row)
        stages = ["plan"]   # the stage a failure happened in, for the row's message
        try:
            if item.error:
                raise ItemError("plan", item.error)
            self.process(item, row, stages)
        except StorageUnavailable:
            raise
        except ItemError as e:
            self.failed(row, e)
        except Exception as e:   # a codec or storage failure on this item only
            self.failed(row, ItemError(stages[-1], f"{type(e).__name__}: {e}"))
        return row
