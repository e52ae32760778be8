"""Cross-device decode check and GPU speed figures for the gain-hyperprior codec.

Why: a learned codec's bitstream is only portable if the encoder's and the decoder's entropy
parameters agree to the last index, and the float paths of a GPU and a CPU differ. This script
encodes photos on one device and decodes them on the other, on the device machine, and saves
every payload with the GPU's decoded pixels so that ``--verify`` can decode the same bytes again
on a different machine (the development CPU) and compare.

On the device machine (after training, with the exported weights):
    python3 cluster/gpu/check_devices.py --weights W --images .train --out $OUT
Back here:
    .venv/bin/python cluster/gpu/check_devices.py --weights W --verify OUT/crossdevice.npz
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ratefit.workers.codec_loader import load_codec

VALUES = (-1.0, 0.5, 2.5, 4.5, 6.5, 8.0)


def _photos(folder: str, count: int) -> list[np.ndarray]:
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    step = max(1, len(files) // count)
    photos = [np.asarray(Image.open(f).convert("RGB")) for f in files[::step][:count]]
    photos[0] = photos[0][:173, :251].copy()   # an odd size: neither side a multiple of 64
    return photos


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def cross_check(weights: str, images: str, count: int, out: Path) -> dict:
    cuda = "cuda" if torch.cuda.is_available() else "cpu"   # cpu/cpu is only a smoke test of this script
    gpu = load_codec("gain-hyperprior", weights=weights, device=cuda)
    cpu = load_codec("gain-hyperprior", weights=weights, device="cpu")
    saved, worst_gpu_cpu, worst_cpu_gpu, equal_payloads, cases = {}, 0, 0, 0, 0
    for i, photo in enumerate(_photos(images, count)):
        h, w = photo.shape[:2]
        for j, v in enumerate(VALUES):
            from_gpu = gpu.encode(gpu.prepare(photo), v)
            from_cpu = cpu.encode(cpu.prepare(photo), v)
            on_gpu = gpu.decode(from_gpu, w, h, v)
            worst_gpu_cpu = max(worst_gpu_cpu, _max_diff(on_gpu, cpu.decode(from_gpu, w, h, v)))
            worst_cpu_gpu = max(worst_cpu_gpu, _max_diff(cpu.decode(from_cpu, w, h, v), gpu.decode(from_cpu, w, h, v)))
            equal_payloads += from_gpu == from_cpu
            cases += 1
            saved[f"p{i}_{j}"] = np.frombuffer(from_gpu, dtype=np.uint8)
            saved[f"x{i}_{j}"] = on_gpu
            saved[f"m{i}_{j}"] = np.array([w, h, v])
    np.savez_compressed(out / "crossdevice.npz", **saved)
    return {"device": cuda, "cases": cases, "max_diff_gpu_stream_gpu_vs_cpu_decode": worst_gpu_cpu,
            "max_diff_cpu_stream_cpu_vs_gpu_decode": worst_cpu_gpu, "identical_payloads_gpu_vs_cpu_encode": equal_payloads}


def _timed(fn, reps: int) -> float:
    """Median wall time in ms, synchronising the GPU around each call."""
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def speed(weights: str, images: str, reps: int) -> dict:
    """Per-stage times for one Kodak-sized (768x512) image, and batched analysis throughput."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    codec = load_codec("gain-hyperprior", weights=weights, device=device)
    photo = np.asarray(Image.fromarray(_photos(images, 2)[1]).resize((768, 512), Image.BICUBIC))
    prepared = codec.prepare(photo)
    payload = codec.encode(prepared, 4.0)
    for _ in range(3):   # warm-up: cuDNN algorithm choice, allocator
        codec.decode(payload, 768, 512, 4.0)
    row = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
           "prepare_ms": _timed(lambda: codec.prepare(photo), reps),
           "estimate_ms": _timed(lambda: codec.estimate(prepared, 4.0), reps),
           "encode_ms": _timed(lambda: codec.encode(prepared, 4.0), reps),
           "reconstruct_ms": _timed(lambda: codec.reconstruct(prepared, 4.0), reps),
           "decode_ms": _timed(lambda: codec.decode(payload, 768, 512, 4.0), reps),
           "bpp_at_4": len(payload) * 8 / (768 * 512)}
    model = codec.model
    for batch in (1, 16, 64):
        x = torch.rand(batch, 3, 512, 768, device=device)
        with torch.inference_mode():
            ms = _timed(lambda: model.analyse(x), max(3, reps // 4))
        row[f"analysis_images_per_s_batch{batch}"] = batch / ms * 1e3
    return row


def verify(weights: str, npz: str) -> int:
    """Decode the device machine's GPU-encoded payloads here and compare with its GPU decode."""
    codec = load_codec("gain-hyperprior", weights=weights, device="cpu")
    data = np.load(npz)
    worst, cases = 0, 0
    for key in sorted(k for k in data.files if k.startswith("p")):
        tag = key[1:]
        w, h, v = data[f"m{tag}"]
        here = codec.decode(data[key].tobytes(), int(w), int(h), float(v))
        worst = max(worst, _max_diff(here, data[f"x{tag}"]))
        cases += 1
    print(json.dumps({"cases": cases, "max_diff_device_gpu_vs_this_cpu": worst}))
    return 0 if worst <= 1 else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", required=True)
    p.add_argument("--images", help="folder of photos to encode (not Kodak)")
    p.add_argument("--count", type=int, default=6)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", help="folder for crossdevice.npz and crossdevice.json")
    p.add_argument("--verify", help="crossdevice.npz from the device machine: decode it here")
    args = p.parse_args(argv)
    if args.verify:
        return verify(args.weights, args.verify)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"cross": cross_check(args.weights, args.images, args.count, out),
              "speed": speed(args.weights, args.images, args.reps)}
    (out / "crossdevice.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0 if max(result["cross"]["max_diff_gpu_stream_gpu_vs_cpu_decode"],
                    result["cross"]["max_diff_cpu_stream_cpu_vs_gpu_decode"]) <= 1 else 1


if __name__ == "__main__":
    sys.exit(main())
