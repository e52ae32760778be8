"""A budget job: one rate budget for a whole collection, spread where it buys the most quality.

    ratefit compress INPUT OUTPUT --budget-bpp 0.5 [--min-psnr 30] [--objective psnr|mse]

Three passes over the same shards (built by ``jobs/build.py``), each committing its own parts
so each resumes by shard, and one planning step on the driver between the first two:

1. **probe** pass (``OUTPUT/_plan/probes/``): every image's R-D curve at a few control values
   (``codecs/probe.py``: the rate model and a decoder-free reconstruction for learned codecs,
   real encodes for classical ones); no bitstreams.
2. **plan** (the driver, not a pass): equal-slope allocation over the probe tables (``codecs/allocate.py``),
   written to ``_plan/allocation.parquet`` and ``_plan/plan.json``.
3. **encode** pass (``OUTPUT/_manifest/``): the normal job path, each image at its allocated byte
   target (a ceiling, as for ``--target-bytes``).
4. **correct** pass (``_plan/correction/``): when the achieved total is outside [99%, 100%] of the
   budget (the probes' estimates missed), a few of the largest images are re-encoded with
   their targets scaled by the same factor (at most ±5% each), and their manifest rows are
   replaced. Then ``_SUCCESS`` is written with the plan's summary.

The planner runs on the driver, which holds ``(items × probes)`` floats (a million images with
ten probes: 80 MB per array); ``docs/architecture.md`` draws the flow.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ratefit.codecs.allocate import allocate, quality_at
from ratefit.codecs.rate import Target
from ratefit.cluster.connect import connect
from ratefit.jobs.build import CORRECTION_DIR, PLAN_DIR, Pass, build_pass, codec_is_continuous, plan_items, plan_shards
from ratefit.jobs.errors import JobError
from ratefit.jobs.runner import finish, run_pass, write_success
from ratefit.jobs.spec import JobSpec
from ratefit.workers.items import Item
from ratefit.workers.manifest import COMPRESS_SCHEMA, MANIFEST_DIR, parquet_table, part_name, read_parts, write_part
from ratefit.workers.probe import PROBES_DIR
from ratefit.workers.storage import atomic_write, fetch, open_fs, redact

ALLOCATION = f"{PLAN_DIR}/allocation.parquet"
PLAN_JSON = f"{PLAN_DIR}/plan.json"
CORRECTION_LIST = f"{PLAN_DIR}/correction.parquet"
CORRECTION_JSON = f"{PLAN_DIR}/correction.json"
LANDING = (0.99, 1.0)          # the achieved total must land in this fraction of the budget
CORRECTION_AIM = 0.996         # a correction aims here: inside LANDING with room for the search's 0.5%
CURVE = "log"                  # continuous codecs: PSNR runs linearly in log-rate between probes
CORRECTION_STEP = 0.05         # no corrected image's target moves by more than this fraction


@dataclass
class Probes:
    """The probe pass read back: one row per planned item, in planning order."""

    uri: list[str]
    ok: np.ndarray            # bool (n,)
    error: list[str | None]
    pixels: np.ndarray        # (n,)
    rate: np.ndarray          # (n, k) stored bytes, NaN for failed items
    psnr: np.ndarray          # (n, k)
    cap: np.ndarray           # (n,) bytes (inf = none), from a listing's target_bytes/target_bpp
    floor_db: np.ndarray      # (n,) dB (nan = none), from a listing's target_psnr (--min-psnr is added in the plan)


def _padded(column: pa.ChunkedArray, ok: np.ndarray, k: int) -> np.ndarray:
    out = np.full((len(ok), k), np.nan)
    values = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
    if ok.any():
        out[ok] = values.reshape(int(ok.sum()), k)
    return out


def load_probes(fs, root: str) -> Probes:
    t = read_parts(fs, f"{root}/{PROBES_DIR}")
    if t.num_rows == 0:
        raise JobError("the input holds no images: nothing to plan a budget over")
    ok = pc.fill_null(pc.equal(t["status"], "ok"), False).to_numpy(zero_copy_only=False)
    lengths = np.unique(pc.list_value_length(t["probe_bytes"]).to_numpy(zero_copy_only=False)[ok])
    if len(lengths) > 1:
        raise JobError(f"probe parts disagree on the number of probes per image ({lengths.tolist()}); "
                       "re-run with --overwrite")
    k = int(lengths[0]) if len(lengths) else 1
    w = np.nan_to_num(t["width"].to_numpy(zero_copy_only=False).astype(float))
    h = np.nan_to_num(t["height"].to_numpy(zero_copy_only=False).astype(float))
    pixels = w * h
    kinds = pc.fill_null(t["target_kind"], "").to_numpy(zero_copy_only=False).astype(str)
    values = t["target_value"].to_numpy(zero_copy_only=False).astype(float)
    cap = np.full(len(ok), np.inf)
    cap = np.where(kinds == "bytes", np.floor(values), cap)
    cap = np.where(kinds == "bpp", np.floor(values * pixels / 8.0), cap)
    floor_db = np.where(kinds == "psnr", values, np.nan)
    return Probes(uri=t["input_uri"].to_pylist(), ok=ok, error=t["error"].to_pylist(), pixels=pixels,
                  rate=_padded(t["probe_bytes"], ok, k), psnr=_padded(t["probe_psnr"], ok, k),
                  cap=cap, floor_db=floor_db)


def _quality(psnr_db: np.ndarray, pixels: np.ndarray, objective: str) -> np.ndarray:
    """The summed objective per image: PSNR (mean PSNR), or minus its total squared error."""
    if objective == "psnr":
        return psnr_db
    mse = 255.0 ** 2 / np.power(10.0, psnr_db / 10.0)
    return -mse * (pixels[:, None] if np.ndim(psnr_db) == 2 else pixels)


def _to_psnr(quality: np.ndarray, pixels: np.ndarray, objective: str) -> np.ndarray:
    if objective == "psnr":
        return quality
    return 10.0 * np.log10(255.0 ** 2 / np.maximum(-quality / pixels, 1e-10))


def make_plan(spec: JobSpec, probes: Probes, continuous: bool) -> tuple[pa.Table, dict[str, Any]]:
    """Solve the allocation; returns the per-item table and the plan's summary."""
    ok = probes.ok
    n_ok = int(ok.sum())
    if n_ok == 0:
        raise JobError("no image could be probed (see the errors in OUTPUT/_plan/probes/); nothing to plan")
    px = probes.pixels[ok]
    budget = spec.budget_bytes if spec.budget_bytes is not None else spec.budget_bpp * px.sum() / 8.0
    q = _quality(probes.psnr[ok], px, spec.objective)
    floors = probes.floor_db[ok]
    if spec.min_psnr is not None:
        floors = np.fmax(floors, spec.min_psnr)
    min_q = None
    if np.isfinite(floors).any():
        min_q = np.where(np.isfinite(floors), _quality(np.nan_to_num(floors, nan=0.0), px, spec.objective), -np.inf)
    cap = probes.cap[ok]
    result = allocate(probes.rate[ok], q, budget, continuous=continuous, min_quality=min_q,
                      max_rate=cap if np.isfinite(cap).any() else None, curve=CURVE)
    if not result.feasible:
        raise JobError(f"the budget of {budget:.0f} bytes cannot hold even the smallest allowed files "
                       f"({result.total:.0f} bytes{' at --min-psnr' if spec.min_psnr else ''}); raise the "
                       "budget or lower the floor, with --overwrite (the probes are redone)")
    uniform = np.minimum(budget * px / px.sum(), cap)
    uniform_q = quality_at(probes.rate[ok], q, uniform, continuous=continuous, curve=CURVE)
    alloc = np.full(len(ok), np.nan)
    alloc[ok] = result.rate
    predicted = np.full(len(ok), np.nan)
    predicted[ok] = _to_psnr(result.quality, px, spec.objective)
    uniform_bytes = np.full(len(ok), np.nan)
    uniform_bytes[ok] = uniform
    uniform_psnr = np.full(len(ok), np.nan)
    uniform_psnr[ok] = _to_psnr(uniform_q, px, spec.objective)
    table = pa.table({"input_uri": probes.uri, "ok": ok, "pixels": probes.pixels, "alloc_bytes": alloc,
                      "predicted_psnr": predicted, "uniform_bytes": uniform_bytes, "uniform_psnr": uniform_psnr,
                      "cap_bytes": probes.cap})
    summary = {
        "spec_hash": spec.spec_hash(), "objective": spec.objective, "min_psnr": spec.min_psnr,
        "budget_bytes": float(budget), "budget_bpp": float(budget * 8.0 / px.sum()),
        "items_planned": n_ok, "items_failed_probe": int(len(ok) - n_ok),
        "probes_per_item": int(probes.rate.shape[1]), "continuous": continuous,
        "slope": result.slope, "predicted_bytes": float(result.total),
        "predicted_mean_psnr": float(np.mean(predicted[ok])),
        "uniform_predicted_mean_psnr": float(np.mean(uniform_psnr[ok])),
    }
    return table, summary


def _load_or_make_plan(spec: JobSpec, fs, root: str, continuous: bool) -> tuple[pa.Table, dict[str, Any]]:
    plan_path, alloc_path = f"{root}/{PLAN_JSON}", f"{root}/{ALLOCATION}"
    fs.invalidate_cache(f"{root}/{PLAN_DIR}")
    if fs.exists(plan_path) and fs.exists(alloc_path):
        summary = json.loads(fetch(fs, plan_path))
        if summary.get("spec_hash") == spec.spec_hash():
            return parquet_table(fetch(fs, alloc_path)), summary
    t0 = time.perf_counter()
    table, summary = make_plan(spec, load_probes(fs, root), continuous)
    summary["plan_s"] = round(time.perf_counter() - t0, 3)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    atomic_write(fs, alloc_path, buf.getvalue())        # the table first: plan.json marks the plan complete
    atomic_write(fs, plan_path, json.dumps(summary, indent=2).encode())
    return table, summary


def _with_targets(items: Iterator[Item], plan: pa.Table, targets: dict[int, float] | None = None,
                  only: list[int] | None = None) -> Iterator[Item]:
    """The planned items again (same listing, same order), each with its byte target.

    ``targets``/``only`` select a subset (the correction pass). The listing is re-read rather
    than stored, so no unredacted URL is ever written under OUTPUT; each item is checked
    against the probe pass's row so a changed input cannot be mixed in.
    """
    uris = plan["input_uri"].to_pylist()
    ok = plan["ok"].to_pylist()
    alloc = plan["alloc_bytes"].to_numpy(zero_copy_only=False)
    wanted = set(only) if only is not None else None
    n = -1
    for n, item in enumerate(items):
        if n >= len(uris) or redact(item.uri) != uris[n]:
            raise JobError(f"the input changed since the probe pass (item {n}: {redact(item.uri)}); "
                           "re-run with --overwrite")
        if wanted is not None and n not in wanted:
            continue
        if item.error:
            yield item
        elif not ok[n]:
            yield dataclasses.replace(item, error="probe pass failed on this item (see OUTPUT/_plan/probes/)")
        else:
            value = targets[n] if targets is not None else alloc[n]
            yield dataclasses.replace(item, target=Target("bytes", float(max(1, math.floor(value)))))
    if n + 1 != len(uris):
        raise JobError(f"the input changed since the probe pass ({n + 1} items now, {len(uris)} probed); "
                       "re-run with --overwrite")


def _stored_bytes(rows: dict[str, list]) -> np.ndarray:
    wrote = np.isin(np.asarray(rows["status"], dtype=object), ["ok", "unreachable"])
    sizes = np.asarray([v or 0 for v in rows["output_bytes"]], dtype=float)
    return np.where(wrote, sizes, 0.0)


def choose_corrections(rows: dict[str, list], budget: float, cap: np.ndarray) -> dict[int, float]:
    """Items to re-encode, and their new byte targets, so the total lands inside LANDING.

    Outside the landing range only: scale the largest images' sizes by one factor, each by at
    most CORRECTION_STEP, until the scaled total reaches CORRECTION_AIM of the budget; when
    every movable image is needed (a small collection), by whatever factor that takes.
    """
    sizes = _stored_bytes(rows)
    total = float(sizes.sum())
    if LANDING[0] * budget <= total <= LANDING[1] * budget:
        return {}
    delta = CORRECTION_AIM * budget - total            # > 0: spend, < 0: recover
    status = np.asarray(rows["status"], dtype=object)
    movable = status == "ok"
    if delta > 0:
        movable &= sizes < cap
    order = np.flatnonzero(movable)[np.argsort(-sizes[movable], kind="stable")]
    need = abs(delta) / CORRECTION_STEP
    take = order[: int(np.searchsorted(np.cumsum(sizes[order]), need)) + 1]
    if len(take) == 0:
        return {}
    factor = 1.0 + delta / sizes[take].sum()
    if len(take) < len(order):   # enough images to keep each within CORRECTION_STEP of its plan
        factor = min(max(factor, 1.0 - CORRECTION_STEP), 1.0 + CORRECTION_STEP)
    return {int(i): float(min(sizes[i] * factor, cap[i])) for i in take}


def _merge_corrections(fs, root: str, corrected: list[int], shard_size: int) -> int:
    """Replace the encode pass's rows of re-encoded items by their correction rows."""
    fixes = read_parts(fs, f"{root}/{CORRECTION_DIR}").to_pylist()
    by_part: dict[int, dict[int, dict]] = {}
    for index, row in zip(corrected, fixes):
        if row["status"] in ("ok", "unreachable"):      # an error keeps the first encode, which is intact
            by_part.setdefault(index // shard_size, {})[index % shard_size] = row
    for part, replace in sorted(by_part.items()):
        path = f"{root}/{MANIFEST_DIR}/{part_name(part)}"
        rows = parquet_table(fetch(fs, path)).to_pylist()
        for pos, row in replace.items():
            rows[pos] = {**row, "shard": part}
        write_part(fs, f"{root}/{MANIFEST_DIR}", part, rows, COMPRESS_SCHEMA)
    return sum(len(v) for v in by_part.values())


def run(spec: JobSpec) -> dict[str, Any]:
    """Run a budget job to completion (resuming any pass already done) and return ``_SUCCESS``."""
    t_start = time.time()
    continuous = codec_is_continuous(spec)   # from the registry: the driver never builds the codec
    fs, root = open_fs(spec.output, spec.storage_options)
    import ray

    started = False if spec.in_process else connect(spec.address)   # one Ray for every pass
    try:
        probe = build_pass(spec, "probe")
        state = run_pass(spec, plan_shards(spec), probe)
        finish(spec, fs, root, state, 0.0, manifest_dir=probe.manifest_dir, write=False)
        spec = dataclasses.replace(spec, overwrite=False)   # later passes keep what earlier ones wrote
        plan, plan_summary = _load_or_make_plan(spec, fs, root, continuous)

        state = run_pass(spec, plan_shards(spec, _with_targets(plan_items(spec), plan)), build_pass(spec, "encode"))
        encoded_bytes = float(finish(spec, fs, root, state, 0.0, write=False)["output_bytes"])
        correction = _correct(spec, fs, root, plan, plan_summary)
    finally:
        if started:
            ray.shutdown()
    state.stats.clear()   # the correction pass rewrote parts of this pass: read them all back
    summary = finish(spec, fs, root, state, time.time() - t_start, write=False)
    achieved = float(summary["output_bytes"])
    summary["budget"] = {**{k: v for k, v in plan_summary.items() if k != "spec_hash"},
                         "encoded_bytes_before_correction": encoded_bytes, "achieved_bytes": achieved,
                         "achieved_fraction": achieved / plan_summary["budget_bytes"], **correction}
    write_success(fs, root, summary)
    return summary


def _correct(spec: JobSpec, fs, root: str, plan: pa.Table, plan_summary: dict[str, Any]) -> dict[str, Any]:
    done_path, list_path = f"{root}/{CORRECTION_JSON}", f"{root}/{CORRECTION_LIST}"
    if fs.exists(done_path):
        return json.loads(fetch(fs, done_path))
    if fs.exists(list_path):
        chosen = parquet_table(fetch(fs, list_path)).to_pydict()
        targets = dict(zip(chosen["index"], chosen["target_bytes"]))
    else:
        rows = read_parts(fs, f"{root}/{MANIFEST_DIR}", ["status", "output_bytes"]).to_pydict()
        targets = choose_corrections(rows, plan_summary["budget_bytes"],
                                     plan["cap_bytes"].to_numpy(zero_copy_only=False))
        buf = io.BytesIO()
        pq.write_table(pa.table({"index": pa.array(sorted(targets), pa.int64()),
                                 "target_bytes": [targets[i] for i in sorted(targets)]}), buf)
        atomic_write(fs, list_path, buf.getvalue())
    merged = 0
    if targets:
        correct: Pass = build_pass(spec, "correct")
        items = _with_targets(plan_items(spec), plan, targets=targets, only=sorted(targets))
        state = run_pass(spec, plan_shards(spec, items), correct)
        finish(spec, fs, root, state, 0.0, manifest_dir=correct.manifest_dir, write=False)
        merged = _merge_corrections(fs, root, sorted(targets), spec.shard_size)
    result = {"corrected_items": merged, "correction_tried": len(targets)}
    atomic_write(fs, done_path, json.dumps(result).encode())
    return result
