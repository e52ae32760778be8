"""The job spec: one validated object behind the CLI, ``ray job submit`` and the Python API.

A spec is built from CLI flags or a YAML/JSON file (any fsspec URL). Its hash covers what a
re-run into the same OUTPUT must agree on (``hashed_fields``): what changes an output's bytes
for the same input, plus, for jobs that resume by shard, what shapes the shards and the plan.
Codec and target are left to the rows of compress jobs, whose incremental runs re-plan items
whose codec or target changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import fsspec
import yaml

from ratefit.codecs.rate import Target
from ratefit.workers.layout import LAYOUTS
from ratefit.workers.read import DEFAULT_MAX_PIXELS
from ratefit.workers.storage import redact, redact_options

DEFAULT_CODEC = "gain-hyperprior"
DEFAULT_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif", ".avif")
LISTING_SUFFIXES = (".parquet", ".csv")
# What the spec hash covers (``JobSpec.spec_hash``), by what a job's outputs and resume depend on.
# Every job: what changes an output's bytes for the same input. Codec and target are not among
# them for compress jobs: each row records its own, and an incremental run re-plans the items
# whose codec or target changed instead of refusing the job.
_HASH_OUTPUT = {"kind": None, "codec_options": {}, "weights": None, "qmap": None, "refine_steps": 0,
                "strip_metadata": False, "srgb": False, "min_savings": 0.0, "progressive": None}
# Jobs that resume by shard (budget, decompress) also need the same shards and, for budgets, the plan.
_HASH_SHARDS = {"input": None, "extensions": None, "shard_size": None, "max_pixels": None}
_HASH_BUDGET = {"codec": None, "budget_bytes": None, "budget_bpp": None, "min_psnr": None, "objective": "psnr",
                "probes": None}
MAX_REFINE_STEPS = 10_000
OBJECTIVES = ("psnr", "mse")   # a budget job maximises mean PSNR over items, or minimises total squared error


def weights_options(codec_options: dict[str, Any], weights: str | None,
                    storage_options: dict[str, Any]) -> dict[str, Any]:
    opts = dict(codec_options)
    if weights:
        opts["weights"] = weights
        if storage_options and "://" in weights and not weights.startswith("file://"):
            opts.setdefault("storage_options", storage_options)
    return opts


class SpecError(ValueError):
    """The spec is invalid; the message says which field and why."""


@dataclass
class JobSpec:
    input: str
    output: str
    kind: str = "compress"           # "compress" | "decompress"
    codec: str = DEFAULT_CODEC
    codec_options: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None          # --weights: the learned codec's weights (file, folder or "zoo")
    target_bpp: float | None = None
    target_bytes: float | None = None
    target_psnr: float | None = None
    budget_bytes: float | None = None   # one budget for the whole collection (stored files, headers included)
    budget_bpp: float | None = None     # ... as total bits over total pixels
    min_psnr: float | None = None       # budget jobs: a quality floor per image
    objective: str = "psnr"
    probes: int | None = None           # budget jobs: probe values per image (default by codec kind)
    qmap: str | None = None             # a quality-map generator name or a folder of PNG maps (spatial codecs)
    refine_steps: int = 0               # latent refinement steps per image (learned codecs; 0 = off)
    strip_metadata: bool = False        # drop EXIF, XMP and the ICC profile (pixels converted to sRGB first)
    srgb: bool = False                  # convert pixels to sRGB through their ICC profile, then drop it
    min_savings: float = 0.0            # keep an input as it is unless its result is this fraction smaller
    layout: str = "files"               # "files": one object per output; "webdataset": one tar per shard
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
    shard_size: int = 16
    workers: int | None = None         # actors, a fixed number; default: follow the cluster (jobs/pool.py)
    gpus_per_worker: float | None = None  # None: a share of a GPU per CUDA codec actor, sized by the nodes
    min_workers: int = 1               # start processing once this many actors are ready (not hashed)
    worker_wait_s: float = 600.0       # ... waiting at most this long for them (not hashed)
    max_pixels: int = DEFAULT_MAX_PIXELS
    progressive: int | None = None     # decompress jobs: decode only the first K latent groups (a preview; qarv)
    ms_ssim: bool = True
    verify: bool = False               # decode each stored file back on the worker (not hashed: outputs are the same)
    retire_originals: bool = False     # delete each original once its verified row is committed (implies verify)
    retire_to: str | None = None       # ... or move it under this prefix (implies retire_originals)
    storage_retry_s: float = 120.0     # how long storage operations ride out an outage before the job stops
    item_timeout_s: float = 600.0      # an item's work past this is an error row (not hashed: outputs are the same)
    overwrite: bool = False
    storage_options: dict[str, Any] = field(default_factory=dict)
    address: str | None = None         # Ray address; None = embedded local Ray (or the submitting cluster)
    in_process: bool = False           # run the shards in this process, without Ray (small jobs, debugging)
    progress: bool | None = None       # None: a bar on a terminal outside CI, else log lines; False: neither
    progress_every_s: float = 30.0     # seconds between progress lines in logs (not hashed: outputs are the same)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        if not self.input or not isinstance(self.input, str):
            raise SpecError("input: give a folder URL or a listing file (.parquet/.csv)")
        if not self.output or not isinstance(self.output, str):
            raise SpecError("output: give a folder URL")
        if self.kind not in ("compress", "decompress"):
            raise SpecError(f"kind: must be compress or decompress, got {self.kind!r}")
        given = [k for k in ("target_bpp", "target_bytes", "target_psnr") if getattr(self, k) is not None]
        if len(given) > 1:
            raise SpecError(f"give at most one job-wide target, got {', '.join(given)}")
        for k in given:
            try:
                Target(k.removeprefix("target_"), float(getattr(self, k)))
            except (TypeError, ValueError) as e:
                raise SpecError(f"{k}: {e}") from None
            setattr(self, k, float(getattr(self, k)))
        budgets = [k for k in ("budget_bytes", "budget_bpp") if getattr(self, k) is not None]
        if len(budgets) > 1 or (budgets and given):
            raise SpecError(f"give one of a job-wide target or a budget, got {', '.join(given + budgets)}")
        for k in budgets + (["min_psnr"] if self.min_psnr is not None else []):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise SpecError(f"{k}: must be a positive number, got {v!r}")
            setattr(self, k, float(v))
        if self.min_psnr is not None and not budgets:
            raise SpecError("min_psnr is a floor for budget jobs: give --budget-bytes or --budget-bpp "
                            "(for one image at a quality, use --target-psnr)")
        if self.objective not in OBJECTIVES:
            raise SpecError(f"objective: must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.probes is not None and (not isinstance(self.probes, int) or isinstance(self.probes, bool)
                                        or not 2 <= self.probes <= 64):
            raise SpecError(f"probes: must be an integer within 2..64, got {self.probes!r}")
        lossless = self.kind == "compress" and self._codec_is_lossless()
        if lossless and (given or budgets):
            raise SpecError(f"codec {self.codec} is lossless: rate targets and budgets do not apply "
                            f"(drop {', '.join('--' + k.replace('_', '-') for k in given + budgets)})")
        for k in ("strip_metadata", "srgb"):
            if not isinstance(getattr(self, k), bool):
                raise SpecError(f"{k}: must be true or false, got {getattr(self, k)!r}")
        v = self.min_savings
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
            raise SpecError(f"min_savings: must be a fraction within [0, 1) (0.1 = at least 10% smaller), got {v!r}")
        self.min_savings = float(v)
        if self.layout not in LAYOUTS:
            raise SpecError(f"layout: must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.layout != "files" and (self.kind != "compress" or budgets):
            raise SpecError(f"layout {self.layout}: compress jobs with a per-item target only (a budget job's "
                            "correction pass rewrites outputs, which tar shards do not allow yet; a decompress "
                            "job writes PNG files)")
        if self.kind == "compress" and not given and not budgets and not self.is_listing and not lossless:
            raise SpecError("no target: give --target-bpp, --target-bytes or --target-psnr, a budget "
                            "(--budget-bytes, --budget-bpp), or a listing file with per-item target_* columns")
        if isinstance(self.extensions, str):
            self.extensions = tuple(e.strip() for e in self.extensions.split(",") if e.strip())
        self.extensions = tuple(("." + e.lstrip(".")).lower() for e in self.extensions)
        if not self.extensions:
            raise SpecError("extensions: give at least one")
        for k in ("shard_size", "max_pixels"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SpecError(f"{k}: must be a positive integer, got {v!r}")
        v = self.storage_retry_s
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise SpecError(f"storage_retry_s: must be a number of seconds >= 0, got {v!r}")
        v = self.progressive
        if v is not None:
            if self.kind != "decompress":
                raise SpecError("progressive: applies to decompress jobs only")
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise SpecError(f"progressive: must be a number of latent groups >= 0, got {v!r}")
        v = self.item_timeout_s
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise SpecError(f"item_timeout_s: must be a number of seconds > 0, got {v!r}")
        self.item_timeout_s = float(v)
        v = self.progress_every_s
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise SpecError(f"progress_every_s: must be a number of seconds > 0, got {v!r}")
        self.progress_every_s = float(v)
        if self.workers is not None and (not isinstance(self.workers, int) or isinstance(self.workers, bool)
                                         or self.workers < 1):
            raise SpecError(f"workers: must be a positive integer, got {self.workers!r}")
        v = self.min_workers
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise SpecError(f"min_workers: must be a positive integer, got {v!r}")
        if self.workers is not None and v > self.workers:
            raise SpecError(f"min_workers: {v} is more than the {self.workers} workers asked for (--workers)")
        v = self.worker_wait_s
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise SpecError(f"worker_wait_s: must be a number of seconds > 0, got {v!r}")
        self.worker_wait_s = float(v)
        if self.gpus_per_worker is not None:
            try:
                gpus = float(self.gpus_per_worker)
            except (TypeError, ValueError):
                gpus = math.nan
            if isinstance(self.gpus_per_worker, bool) or not (0 <= gpus <= 8):
                raise SpecError(f"gpus_per_worker: must be a number within 0..8, got {self.gpus_per_worker!r}")
            self.gpus_per_worker = gpus
        if not isinstance(self.in_process, bool):
            raise SpecError(f"in_process: must be true or false, got {self.in_process!r}")
        if not isinstance(self.storage_options, dict) or not isinstance(self.codec_options, dict):
            raise SpecError("storage_options and codec_options must be mappings")
        if self.weights is not None and (not isinstance(self.weights, str) or not self.weights):
            raise SpecError(f"weights: give a file or folder URL (or 'zoo'), got {self.weights!r}")
        if self.weights and "weights" in self.codec_options and self.codec_options["weights"] != self.weights:
            raise SpecError("weights given twice (--weights and codec_options.weights) with different values")
        if self.qmap is not None:
            self._validate_qmap(budgets)
        if not isinstance(self.refine_steps, int) or isinstance(self.refine_steps, bool) \
                or not 0 <= self.refine_steps <= MAX_REFINE_STEPS:
            raise SpecError(f"refine_steps: must be an integer within 0..{MAX_REFINE_STEPS}, got {self.refine_steps!r}")
        if self.refine_steps and budgets:
            raise SpecError("refine_steps: budget jobs do not refine latents yet (their probes price unrefined "
                            "curves); give a per-item target instead")
        if self.retire_to is not None:
            if not isinstance(self.retire_to, str) or not self.retire_to.strip():
                raise SpecError(f"retire_to: give a folder URL, got {self.retire_to!r}")
            self.retire_originals = True
        if self.retire_originals:
            if self.kind != "compress" or budgets:
                raise SpecError("retire_originals: only plain compress jobs retire originals (not budget or "
                                "decompress jobs)")
            self.verify = True   # an original goes only once its bitstream decoded back as encoded
        if self.kind == "compress":
            from ratefit.codecs.registry import list_codecs
            if self.codec not in list_codecs():
                raise SpecError(f"codec: unknown {self.codec!r}; known: {', '.join(list_codecs())}")

    def _codec_is_lossless(self) -> bool:
        from ratefit.codecs.base import capabilities_of
        from ratefit.codecs.registry import factory_of, list_codecs

        return self.codec in list_codecs() and capabilities_of(factory_of(self.codec)).lossless

    def _validate_qmap(self, budgets: list[str]) -> None:
        from ratefit.codecs.qmap import GENERATORS

        if not isinstance(self.qmap, str) or not self.qmap.strip():
            raise SpecError(f"qmap: give a generator ({', '.join(GENERATORS)}) or a folder URL, got {self.qmap!r}")
        if self.qmap not in GENERATORS and "/" not in self.qmap:
            raise SpecError(f"qmap: {self.qmap!r} is neither a generator ({', '.join(GENERATORS)}) nor a folder "
                            f"URL (write a folder as ./{self.qmap} or with its scheme)")
        if budgets:
            raise SpecError("qmap: budget jobs do not take quality maps yet (their probes price uniform maps); "
                            "give a per-item target instead")

    def codec_kwargs(self) -> dict[str, Any]:
        """The options the codec is built with: ``codec_options`` plus ``--weights``.

        Weights on remote storage are read with the job's storage options unless the codec
        options carry their own.
        """
        return weights_options(self.codec_options, self.weights, self.storage_options)

    @property
    def is_listing(self) -> bool:
        return self.input.lower().endswith(LISTING_SUFFIXES)

    @property
    def is_budget(self) -> bool:
        return self.budget_bytes is not None or self.budget_bpp is not None

    def default_target(self) -> Target | None:
        for kind in ("bpp", "bytes", "psnr"):
            v = getattr(self, f"target_{kind}")
            if v is not None:
                return Target(kind, float(v))
        return None

    # --------------------------------------------------------------- serialisation
    def to_dict(self, redacted: bool = True) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["extensions"] = list(self.extensions)
        if redacted:
            d["storage_options"] = redact_options(self.storage_options)
            d["codec_options"] = redact_options(self.codec_options)
            d["input"], d["output"] = redact(self.input), redact(self.output)
            d["address"] = redact(self.address)
        return d

    HASH_VERSION = 2   # 1: every field that shaped the job, codec and target included (refused any change)

    def hashed_fields(self) -> list[str]:
        """The fields this job's hash covers: a re-run into the same OUTPUT must agree on them."""
        fields = list(_HASH_OUTPUT)
        if self.kind == "decompress" or self.is_budget:
            fields += list(_HASH_SHARDS)
        if self.is_budget:
            fields += list(_HASH_BUDGET)
        return fields

    def spec_hash(self) -> str:
        # Unredacted: two specs differing only in a secret-looking codec option are different
        # jobs. The hash is one-way, so nothing secret can be read back from it.
        return _hash_of(self.to_dict(redacted=False), self.hashed_fields())

    def same_job(self, record: dict[str, Any]) -> bool:
        """Whether an OUTPUT's job record (``runner.JOB_RECORD``) is this job, so it may go on.

        Records from before hash version 2 are compared on their stored (redacted) spec with
        today's rule, so an OUTPUT written by an older ratefit keeps running.
        """
        if record.get("spec_hash_version") == self.HASH_VERSION:
            return record.get("spec_hash") == self.spec_hash()
        old = record.get("spec")
        if not isinstance(old, dict) or old.get("kind", "compress") != self.kind:
            return False
        fields = self.hashed_fields()
        return _hash_of(old, fields) == _hash_of(self.to_dict(redacted=True), fields)

    def hash_fields_note(self) -> str:
        changeable = "; codec and target may change between runs" if self.kind == "compress" and not self.is_budget else ""
        return f"it covers {', '.join(f for f in self.hashed_fields() if f != 'kind')}{changeable}"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "JobSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise SpecError(f"unknown spec field(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        data = dict(data)
        if isinstance(data.get("extensions"), list):
            data["extensions"] = tuple(data["extensions"])
        return cls(**data)


def _hash_of(d: dict[str, Any], fields: list[str]) -> str:
    """SHA-256 of ``fields`` of a spec dict; a field at its default is left out, so adding a
    field with a default never changes the hashes of specs that do not set it."""
    defaults = {**_HASH_OUTPUT, **_HASH_SHARDS, **_HASH_BUDGET}
    picked = {k: d.get(k, defaults[k]) for k in fields}
    picked = {k: list(v) if isinstance(v, tuple) else v for k, v in picked.items()
              if k == "kind" or v != defaults[k]}
    payload = json.dumps(picked, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def load_spec_file(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read a YAML or JSON spec file (YAML is a superset of JSON) from any fsspec URL."""
    try:
        with fsspec.open(url, "rt", **(storage_options or {})) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise SpecError(f"spec file not found: {redact(url)}") from None
    except yaml.YAMLError as e:
        raise SpecError(f"spec file {redact(url)} is not valid YAML/JSON: {e}") from None
    if not isinstance(data, dict):
        raise SpecError(f"spec file {redact(url)} must hold a mapping of fields")
    return data
