"""``ratefit bench``: the real job and a naive one-process loop on the same input, side by side.

    ratefit bench INPUT [--codec NAME] --target-bpp X [--json FILE]
    ratefit bench --driver 1000,10000,100000 [--json FILE]

The first runs the job as users run it (embedded Ray, actors, manifests, ``_SUCCESS``) and
then, in a fresh Python process, a naive loop that reads, searches the same target with the
same codec and rate control, writes and measures each image in turn: the very per-shard code
the actors run, on the in-process pool (``jobs/pool.py``), without Ray. Both are timed from their start (imports, Ray, loading the
codec): that is what a user waits for. Per-stage times come from the manifest rows (``read_ms`` … ``metrics_ms``).

The second measures the driver: a job over N tiny generated images, each N in a fresh
process, reporting the driver's own CPU time per item and its peak memory, which must stay
flat as N grows (the driver holds shards in flight, not the item list).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from ratefit.workers.manifest import STAGE_COLUMNS


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", nargs="?", help="folder URL of images (e.g. ../shared/data/kodak)")
    p.add_argument("--codec", default="gain-hyperprior", help="codec name (default gain-hyperprior)")
    p.add_argument("--codec-options", type=json.loads, default=None, help="codec options as JSON")
    p.add_argument("--weights", help="the codec's weights (compressai:* codecs)")
    p.add_argument("--target-bpp", type=float, default=0.5, help="per-image ceiling (default 0.5)")
    p.add_argument("--workers", type=int, help="actors for the job (default: one per CPU or GPU)")
    p.add_argument("--shard-size", type=int, default=4, help="items per shard (default 4)")
    p.add_argument("--json", help="write the results here as JSON")
    p.add_argument("--driver", help="instead: measure the driver at these item counts (comma-separated)")


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cpus": os.cpu_count(), "platform": platform.platform(), "gpu": None}
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("ratefit", "torch", "compressai", "ray", "pyarrow", "pillow", "fsspec"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


class GpuSampler:
    """GPU utilisation (%) sampled every 200 ms by ``nvidia-smi`` while a run goes on: the mean
    says whether the GPU waited on the CPU (entropy coding, reading). None without a GPU."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "GpuSampler":
        exe = shutil.which("nvidia-smi")
        if exe:
            self.proc = subprocess.Popen([exe, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                          "-lms", "200"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None:
            self.proc.terminate()
            out, _ = self.proc.communicate(timeout=10)
            self.samples = [float(x) for x in out.split() if x.replace(".", "", 1).isdigit()]

    def mean(self) -> float | None:
        samples = getattr(self, "samples", None)
        return round(sum(samples) / len(samples), 1) if samples else None


def _stage_totals(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean ms per item of each stage over the ok/unreachable rows."""
    done = [r for r in rows if r["status"] in ("ok", "unreachable")]
    return {c: round(sum(r[c] or 0.0 for r in done) / max(len(done), 1), 2) for c in STAGE_COLUMNS}


def _naive_loop(spec_json: str, output: str) -> list[dict[str, Any]]:
    """The naive loop itself: one process, one shard after another, the actors' per-shard code."""
    from ratefit.jobs.build import build_pass, plan_shards
    from ratefit.jobs.pool import LocalPool
    from ratefit.jobs.spec import JobSpec
    from ratefit.workers.manifest import read_parts
    from ratefit.workers.storage import open_fs

    spec = JobSpec.from_dict({**json.loads(spec_json), "output": output})
    job_pass = build_pass(spec, "encode")
    for _ in LocalPool(job_pass.config, spec.storage_retry_s).run(plan_shards(spec)):
        pass
    fs, root = open_fs(output)
    return read_parts(fs, f"{root}/{job_pass.manifest_dir}").to_pylist()


def _naive(spec: Any, output: str) -> tuple[float, list[dict[str, Any]]]:
    """The naive loop in a fresh Python process, timed from its start (imports and loading the
    codec included), as the job is timed from its start."""
    rows_file = Path(output + ".rows.json")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ratefit.jobs.tools.bench", "--naive-one",
                           json.dumps(spec.to_dict(redacted=False)), output, str(rows_file)],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"naive loop failed: {proc.stderr[-2000:]}")
    return wall, json.loads(rows_file.read_text())


def run_pipeline_vs_naive(args: argparse.Namespace) -> dict[str, Any]:
    import pyarrow.dataset as ds

    from ratefit.jobs import compress
    from ratefit.jobs.spec import JobSpec

    work = Path(tempfile.mkdtemp(prefix="ratefit-bench-"))
    try:
        spec = JobSpec(input=args.input, output=str(work / "pipeline"), codec=args.codec,
                       codec_options=args.codec_options or {}, weights=args.weights, target_bpp=args.target_bpp,
                       workers=args.workers, shard_size=args.shard_size, progress=False)
        t0 = time.perf_counter()
        with GpuSampler() as gpu_pipeline:
            summary = compress.run(spec)
        pipeline_s = time.perf_counter() - t0
        pipeline_rows = ds.dataset(str(work / "pipeline" / "_manifest")).to_table().to_pylist()
        with GpuSampler() as gpu_naive:
            naive_s, naive_rows = _naive(spec, str(work / "naive"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n = summary["items"]
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "input": args.input, "codec": args.codec, "target_bpp": args.target_bpp, "items": n,
        "workers": args.workers or "default", "shard_size": args.shard_size,
        "pipeline_images_per_s": round(n / pipeline_s, 4), "naive_images_per_s": round(n / naive_s, 4),
        "pipeline_vs_naive": round(naive_s / pipeline_s, 3),
        "pipeline_wall_s": round(pipeline_s, 2), "naive_wall_s": round(naive_s, 2),
        "pipeline_statuses": summary["statuses"],
        "naive_statuses": {s: sum(r["status"] == s for r in naive_rows) for s in {r["status"] for r in naive_rows}},
        "stage_ms_per_image": {"pipeline": _stage_totals(pipeline_rows), "naive": _stage_totals(naive_rows)},
        "gpu_utilisation_pct": {"pipeline": gpu_pipeline.mean(), "naive": gpu_naive.mean()},
        "pipeline_workers": summary.get("workers"),
        "machine": machine(), "versions": versions(),
        "command": "ratefit bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else None,
    }
    return result


def print_table(r: dict[str, Any]) -> None:
    stages = [c.removesuffix("_ms") for c in STAGE_COLUMNS]
    print(f"{r['items']} images from {r['input']}, {r['codec']} at {r['target_bpp']} bpp, "
          f"{r['machine']['cpus']} CPUs, GPU: {r['machine']['gpu'] or 'none'}")
    print(f"{'':<10} {'images/s':>9} {'wall s':>8}   " + " ".join(f"{s:>9}" for s in stages) + "   (ms per image)")
    for name in ("pipeline", "naive"):
        st = r["stage_ms_per_image"][name]
        print(f"{name:<10} {r[f'{name}_images_per_s']:>9.3f} {r[f'{name}_wall_s']:>8.1f}   "
              + " ".join(f"{st[c]:>9.1f}" for c in STAGE_COLUMNS))
    print(f"pipeline / naive: {r['pipeline_vs_naive']:.2f}x")
    gpu = r.get("gpu_utilisation_pct") or {}
    if gpu.get("pipeline") is not None:
        print(f"GPU utilisation: pipeline {gpu['pipeline']:.0f}%, naive {gpu['naive'] or 0:.0f}%")


# ------------------------------------------------------------------------------------- driver

def _driver_one(items: int) -> dict[str, Any]:
    """One job over ``items`` tiny images in this process; the driver's own CPU time and memory."""
    import io

    from PIL import Image

    from ratefit.jobs import compress
    from ratefit.jobs.spec import JobSpec

    work = Path(tempfile.mkdtemp(prefix="ratefit-driver-"))
    try:
        import numpy as np

        buf = io.BytesIO()   # 16x16 noise: its JPEGs take 290 (q0) to 660 (q100) bytes
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, "PNG")
        png = buf.getvalue()
        folder = work / "in"
        for i in range(items):
            sub = folder / f"{i // 1000:04d}"
            if i % 1000 == 0:
                sub.mkdir(parents=True)
            (sub / f"{i:07d}.png").write_bytes(png)
        cpu0, t0 = time.process_time(), time.perf_counter()
        summary = compress.run(JobSpec(input=str(folder), output=str(work / "out"), codec="jpeg",
                                         target_bytes=500, shard_size=256, ms_ssim=False, progress=False))
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"items": items, "statuses": summary["statuses"], "driver_cpu_s": round(cpu, 3),
            "driver_ms_per_item": round(1000 * cpu / items, 4), "wall_s": round(wall, 2),
            **_memory_now()}


def _memory_now() -> dict[str, float]:
    """The driver's peak resident memory (VmHWM) and what is resident now, by kind.

    Not ``ru_maxrss``: Linux carries it across fork and exec, so a process started by a big
    parent reports the parent's peak.
    """
    names = {"VmHWM": "driver_peak_rss_mb", "RssAnon": "driver_rss_anon_mb", "RssFile": "driver_rss_file_mb"}
    out: dict[str, float] = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in names:
                out[names[key]] = round(int(value.split()[0]) / 1024, 1)
    except OSError:
        out["driver_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def run_driver(counts: list[int]) -> dict[str, Any]:
    runs = []
    for n in counts:
        proc = subprocess.run([sys.executable, "-m", "ratefit.jobs.tools.bench", "--driver-one", str(n)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"driver bench at {n} items failed: {proc.stderr[-2000:]}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{n:>9} items: driver {runs[-1]['driver_ms_per_item']:.3f} ms/item CPU, "
              f"peak RSS {runs[-1]['driver_peak_rss_mb']:.0f} MB, wall {runs[-1]['wall_s']:.0f} s", flush=True)
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "driver": runs,
            "machine": machine(), "versions": versions()}


def run(args: argparse.Namespace) -> int:
    if args.driver:
        result = run_driver([int(x) for x in args.driver.split(",")])
    else:
        if not args.input:
            print("ratefit bench: give INPUT (or --driver N,...)", file=sys.stderr)
            return 2
        result = run_pipeline_vs_naive(args)
        print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--driver-one"]:
        print(json.dumps(_driver_one(int(sys.argv[2]))))
        sys.exit(0)
    if sys.argv[1:2] == ["--naive-one"]:
        Path(sys.argv[4]).write_text(json.dumps(_naive_loop(sys.argv[2], sys.argv[3]), default=str))
        sys.exit(0)
    parser = argparse.ArgumentParser(prog="python -m ratefit.jobs.tools.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_arguments(parser)
    sys.exit(run(parser.parse_args()))
