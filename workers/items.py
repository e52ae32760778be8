"""The unit of work that travels from the planner to the workers: small, picklable."""

from __future__ import annotations

from dataclasses import dataclass, field

from ratefit.codecs.rate import Target


@dataclass(frozen=True)
class StoredOutput:
    """An output planned from its manifest row: a plain file (``a/b.png.avif``), which has no
    container header, so the row says which codec wrote it, its checksum and its size; or a
    member of a tar shard (any codec), which the row also locates."""

    codec: str
    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    value: float | None = None
    offset: int | None = None    # a member of a tar shard (--layout webdataset): its bytes in the tar
    length: int | None = None
    name: str | None = None      # ... and the item's name (the manifest's key), which the tar path does not give

    @classmethod
    def of_row(cls, row: dict) -> "StoredOutput":
        """The stored output a manifest row describes (any row of the compress schema)."""
        member = bool(row.get("shard_uri"))
        return cls(codec=row["codec"], sha256=row.get("output_sha256"), width=row.get("width"),
                   height=row.get("height"), value=row.get("rate_param"),
                   offset=row.get("offset") if member else None, length=row.get("length") if member else None,
                   name=row.get("key") if member else None)


@dataclass(frozen=True)
class Item:
    uri: str                      # where to read the input (fsspec URL or local path)
    relpath: str                  # path under OUTPUT that the result mirrors
    target: Target | None = None  # per-item target from a listing; None = the job's default
    error: str | None = None      # a planning problem (e.g. a path escaping OUTPUT): becomes an error row
    qmap_uri: str | None = None   # a listing's quality map for this item (spatial codecs)
    size: int | None = None       # the input's size and version when planned (folder walks give
    version: str | None = None    # them for free; incremental runs compare them with the manifest)
    stored: StoredOutput | None = None   # decompress jobs: a plain-file output planned from the manifest


@dataclass(frozen=True)
class Shard:
    index: int
    items: tuple[Item, ...] = field(default_factory=tuple)
