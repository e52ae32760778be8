"""``ratefit demo``: compress the bundled sample photos on an embedded Ray and restore them.

Runs the same job as ``ratefit compress`` (the default codec at 0.5 bpp), then
``ratefit decompress``, and says where to look.
"""

from __future__ import annotations

from pathlib import Path

from ratefit.jobs import compress, decompress
from ratefit.jobs.spec import JobSpec
from ratefit.jobs.summary import print_summary

SAMPLES = Path(__file__).parents[1] / "samples"   # package data of ratefit.jobs


def run_demo(output: str = "demo-output", target_bpp: float = 0.5) -> int:
    out = Path(output).resolve()
    compressed, restored = out / "compressed", out / "restored"
    import ray

    from ratefit.cluster.connect import connect

    started = connect()   # one embedded Ray for both jobs
    try:
        return _both(compressed, restored, target_bpp)
    finally:
        if started:
            ray.shutdown()


def _both(compressed: Path, restored: Path, target_bpp: float) -> int:
    spec = JobSpec(input=str(SAMPLES), output=str(compressed), target_bpp=target_bpp, shard_size=1, overwrite=True)
    print(f"compressing the sample photos in {SAMPLES} with {spec.codec} at {target_bpp} bpp ...")
    summary = compress.run(spec)
    print_summary(summary, str(compressed))
    dspec = JobSpec(input=str(compressed), output=str(restored), kind="decompress", shard_size=1, overwrite=True)
    print("restoring PNGs ...")
    print_summary(decompress.run(dspec), str(restored))
    print(f"\nlook at: {compressed} (bitstreams, _manifest/, _SUCCESS) and {restored} (decoded PNGs)")
    print("read the manifest: python -c \"import pyarrow.dataset as ds; "
          f"print(ds.dataset('{compressed}/_manifest').to_table().select(['input_uri','status','bpp','psnr']))\"")
    return 0
