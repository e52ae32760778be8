"""The one place that turns a JobSpec into what a pass needs: its inputs, its shards, the
worker config, where its parts go under OUTPUT, where its codec wants to run, and how it resumes.

Every job is one or more passes over shards (``runner.run_pass``):

====================  =======================  ====================  ================
pass                  parts under OUTPUT        rows                  resumes
====================  =======================  ====================  ================
``compress``          ``_manifest/run=<id>/``   COMPRESS_SCHEMA       by item
``probe`` (budget)    ``_plan/probes/``         PROBE_SCHEMA          by shard
``encode`` (budget)   ``_manifest/``            COMPRESS_SCHEMA       by shard
``correct`` (budget)  ``_plan/correction/``     COMPRESS_SCHEMA       by shard
``decompress``        ``_manifest/``            DECOMPRESS_SCHEMA     by shard
====================  =======================  ====================  ================

Two resume mechanisms, one per kind of job. **By item** (plain compress jobs, every call an
incremental run, ``jobs/incremental.py``): a run commits into a folder of its own and plans only
the inputs the manifest does not hold as done, so a killed run is finished by the next without
looking at shards. **By shard** (budget and decompress jobs): the same spec gives the same
shards, so a shard whose part is committed is skipped (the spec hash and each part's input
fingerprint guard that the shards are the same).

Nothing here builds a codec: the driver asks the registry where a codec wants to run and
what kind of control it has; the workers build it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import pyarrow as pa

from ratefit.codecs.container import SUFFIX
from ratefit.codecs.registry import describe, preferred_device
from ratefit.jobs.plan import iter_folder, iter_listing, iter_stored_outputs, shard
from ratefit.jobs.spec import JobSpec, weights_options
from ratefit.workers.compress import CompressConfig
from ratefit.workers.decompress import DecompressConfig
from ratefit.workers.items import Item, Shard
from ratefit.workers.manifest import (COMPRESS_SCHEMA, DECOMPRESS_SCHEMA, MANIFEST_DIR, PROBE_SCHEMA,
                                      RUN_PREFIX)
from ratefit.workers.probe import PROBES_DIR, ProbeConfig

PLAN_DIR = "_plan"                        # a budget job's probes, allocation and correction pass
CORRECTION_DIR = f"{PLAN_DIR}/correction"
RESUME_BY_ITEM = "by item"
RESUME_BY_SHARD = "by shard"


@dataclass(frozen=True)
class Pass:
    """What ``runner.run_pass`` needs to run one pass of a job."""

    name: str            # compress | probe | encode | correct | decompress (also the progress label)
    config: CompressConfig | ProbeConfig | DecompressConfig
    schema: pa.Schema
    manifest_dir: str    # relative to OUTPUT: one part per shard
    device: str          # where the codec wants to run: sizes the pool
    resume: str          # RESUME_BY_ITEM or RESUME_BY_SHARD


def run_manifest_dir(run_id: str) -> str:
    return f"{MANIFEST_DIR}/{RUN_PREFIX}{run_id}"


def plan_items(spec: JobSpec) -> Iterator[Item]:
    """The job's inputs, streamed in a deterministic order: a folder walk or a listing file
    (compress), or the containers under INPUT (decompress)."""
    if spec.kind == "decompress":   # containers by their suffix, plain files by the manifest beside them
        return itertools.chain(iter_folder(spec.input, (SUFFIX,), spec.storage_options, skip_url=spec.output),
                               iter_stored_outputs(spec.input, spec.storage_options))
    if spec.is_listing:
        return iter_listing(spec.input, spec.storage_options)
    return iter_folder(spec.input, spec.extensions, spec.storage_options, skip_url=spec.output)


def plan_shards(spec: JobSpec, items: Iterable[Item] | None = None) -> Iterator[Shard]:
    """``items`` (default: all of the job's inputs) in shards of ``spec.shard_size``."""
    return shard(plan_items(spec) if items is None else items, spec.shard_size)


def codec_device(spec: JobSpec) -> str:
    """Where the job's codec wants to run, from the registry (no model is loaded); a codec told
    ``device: cpu`` in its options runs there, so its workers ask for no GPU."""
    if spec.codec_options.get("device") == "cpu":
        return "cpu"
    return preferred_device(spec.codec, **spec.codec_kwargs())


def codec_is_continuous(spec: JobSpec) -> bool:
    """Whether the codec's control is continuous (budget plans interpolate between probes)."""
    return describe(spec.codec)["kind"] == "continuous"


def compress_config(spec: JobSpec, manifest_dir: str = MANIFEST_DIR, run_id: str | None = None) -> CompressConfig:
    return CompressConfig(output=spec.output, codec=spec.codec, codec_options=spec.codec_kwargs(),
                          target=spec.default_target(), storage_options=spec.storage_options,
                          max_pixels=spec.max_pixels, ms_ssim=spec.ms_ssim, verify=spec.verify, qmap=spec.qmap,
                          refine_steps=spec.refine_steps, manifest_dir=manifest_dir, run_id=run_id,
                          strip_metadata=spec.strip_metadata, srgb=spec.srgb, min_savings=spec.min_savings,
                          retire=spec.retire_originals, retire_to=spec.retire_to, item_timeout_s=spec.item_timeout_s,
                          layout=spec.layout)


def build_pass(spec: JobSpec, name: str, run_id: str | None = None) -> Pass:
    """The pass ``name`` of ``spec`` (see the table above); ``run_id`` names a compress run."""
    if name == "decompress":
        config: Any = DecompressConfig(output=spec.output, storage_options=spec.storage_options,
                                       codec_options={spec.codec: spec.codec_kwargs()} if spec.codec_options else {},
                                       learned_options=weights_options({}, spec.weights, spec.storage_options),
                                       max_pixels=spec.max_pixels, item_timeout_s=spec.item_timeout_s,
                                       progressive=spec.progressive)
        return Pass(name, config, DECOMPRESS_SCHEMA, MANIFEST_DIR, "cpu", RESUME_BY_SHARD)
    device = codec_device(spec)
    if name == "probe":
        config = ProbeConfig(output=spec.output, codec=spec.codec, codec_options=spec.codec_kwargs(),
                             probes=spec.probes, storage_options=spec.storage_options, max_pixels=spec.max_pixels,
                             item_timeout_s=spec.item_timeout_s)
        return Pass(name, config, PROBE_SCHEMA, PROBES_DIR, device, RESUME_BY_SHARD)
    if name == "compress":
        if run_id is None:
            raise ValueError("a compress pass is one run: give its run_id")
        folder = run_manifest_dir(run_id)
        return Pass(name, compress_config(spec, folder, run_id), COMPRESS_SCHEMA, folder, device, RESUME_BY_ITEM)
    folders = {"encode": MANIFEST_DIR, "correct": CORRECTION_DIR}
    if name not in folders:
        raise ValueError(f"unknown pass {name!r}")
    return Pass(name, compress_config(spec, folders[name]), COMPRESS_SCHEMA, folders[name], device, RESUME_BY_SHARD)
