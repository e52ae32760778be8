"""``ratefit fuzz``: a long fuzzing run of the container parser and the decoders.

The test suite runs a few hundred hypothesis cases; this runs as many as time allows, or
exactly ``--cases N`` per target (the same cases on any machine, however loaded). The
cases run in a child process the parent watches: a child that dies (a crash in native
code) or stops advancing (a hang) is reported with the case that did it, saved to a file
so it can be replayed, and a fresh child carries on after it. Every case must end as a
decoded picture of the claimed size or as the decoders' own error (ItemError); any other
exception counts as a failure too.

    ratefit fuzz --seconds 600 --out fuzz-findings
    ratefit fuzz --cases 5000 --targets jpeg,webp        # a fixed amount of work, not of time
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TARGETS = ("container", "gain-hyperprior", "gain-hyperprior-roi", "jpeg", "webp", "avif", "jxl", "jxl-lossless", "qarv")
_LEARNED = ("gain-hyperprior", "gain-hyperprior-roi")
_SIZES = ((96, 64), (200, 150), (64, 257))
DEFAULT_SECONDS = 300.0
_EXIF = b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x01\x00\x12\x01\x03\x00\x01\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00"


# ---------------------------------------------------------------------------- cases

def _codec(name: str):
    """A target's codec, on the CPU (the fuzzer checks decoders, not devices)."""
    from ratefit.codecs.registry import get_codec

    if name == "qarv":   # no weights ship with ratefit: a small untrained network's, the same each run
        from ratefit.codecs.qarv import QarvCodec, untrained_checkpoint

        return QarvCodec(untrained_checkpoint(), device="cpu")
    return get_codec(name, device="cpu") if name in _LEARNED else get_codec(name)


def _codecs_of(target: str) -> tuple[str, ...]:
    """The codecs ``target``'s cases reach: all for the container target, else its own."""
    return TARGETS[1:] if target == "container" else (target,)


def _seeds(names: tuple[str, ...] = TARGETS[1:]) -> dict[str, list[bytes]]:
    """Valid containers per codec in ``names``: the starting points the mutations damage (a
    target's cases use only its own codecs' seeds, so building fewer leaves them unchanged)."""
    from PIL import Image

    import io

    from ratefit.codecs import container
    from ratefit.codecs.base import Extras, capabilities_of
    from ratefit.codecs.qmap import center_map
    from ratefit.jobs.tools.demo import SAMPLES

    photo = Image.open(SAMPLES / "chelsea.png").convert("RGB")
    seeds: dict[str, list[bytes]] = {}
    for name in names:
        codec = _codec(name)
        values = (0.0, 4.0, 7.5) if name in _LEARNED else (5, 50, 95)
        if name == "qarv":
            values = (codec.control.low, (codec.control.low + codec.control.high) / 2, codec.control.high)
        seeds[name] = []
        for (w, h), v in zip(_SIZES, values):
            img = np.asarray(photo.resize((w, h)))
            caps = capabilities_of(codec)
            if caps.restores_original and v == values[1]:   # a JPEG to transcode (its metadata inside)
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, "JPEG", quality=85)
                prepared = codec.prepare(img, extras=Extras(source=buf.getvalue(), source_format="JPEG"))
            elif caps.embeds:   # alpha and metadata in the file, for extras_of to parse
                alpha = np.linspace(0, 255, w * h).astype(np.uint8).reshape(h, w)
                prepared = codec.prepare(img, extras=Extras(alpha=alpha, exif=_EXIF, xmp=b"<x:xmpmeta/>"))
            else:
                prepared = codec.prepare(img, center_map(h, w)) if caps.spatial else codec.prepare(img)
            payload = codec.encode(prepared, v)
            seeds[name].append(container.pack(name, payload, value=v, width=w, height=h,
                                              weights_sha256=codec.weights_sha256))
    return seeds


def make_case(seeds: dict[str, list[bytes]], target: str, seed: int, index: int) -> bytes:
    """The ``index``-th case of ``target`` for run ``seed``: deterministic, so a finding replays."""
    from ratefit.codecs import container

    rng = np.random.default_rng([seed, TARGETS.index(target), index])
    pool = seeds[str(rng.choice(TARGETS[1:]))] if target == "container" else seeds[target]
    blob = pool[int(rng.integers(len(pool)))]
    header, payload = container.unpack(blob)
    kind = int(rng.integers(6))
    if kind == 0:                                     # random bytes as the payload
        payload = rng.bytes(int(rng.integers(0, 4 * len(payload) + 16)))
    else:
        data = bytearray(payload)
        for _ in range(int(rng.integers(1, 24))):     # bit flips and byte overwrites
            if not data:
                break
            pos = int(rng.integers(len(data)))
            data[pos] = (data[pos] ^ (1 << int(rng.integers(8)))) if rng.random() < 0.7 else int(rng.integers(256))
        if kind == 2:                                 # truncation
            data = data[:int(rng.integers(len(data) + 1))]
        elif kind == 3:                               # extension with noise or 0xff runs
            data += rng.bytes(int(rng.integers(1, 512))) if rng.random() < 0.5 else b"\xff" * int(rng.integers(1, 4096))
        elif kind == 4:                               # a block copied over another place
            if len(data) > 8:
                a, b = sorted(int(x) for x in rng.integers(0, len(data), 2))
                at = int(rng.integers(len(data)))
                data[at:at + (b - a)] = data[a:b]
        payload = bytes(data)
    fields = dict(value=header.value, width=header.width, height=header.height, mode=header.mode,
                  weights_sha256=header.weights_sha256)
    if kind == 5 or rng.random() < 0.15:              # header fields that disagree with the payload
        fields.update(width=int(rng.integers(1, 400)), height=int(rng.integers(1, 400)))
        if rng.random() < 0.5:
            fields["value"] = float(rng.choice([header.value + rng.normal(), -50.0, 1e300, float("nan")]))
    out = container.pack(header.codec, payload, **fields)
    if target == "container":                         # also damage the header and the CRC
        data = bytearray(out)
        for _ in range(int(rng.integers(0, 4))):
            data[int(rng.integers(len(data)))] = int(rng.integers(256))
        out = bytes(data[:int(rng.integers(len(data) // 2, len(data) + 1))]) if rng.random() < 0.2 else bytes(data)
    return out


# ----------------------------------------------------------------------------- child

def _child(target: str, seed: int, start: int, seconds: float | None, progress_path: str,
           stop: int | None = None) -> int:
    """Run cases from ``start`` for ``seconds`` after setting up (no limit: None), and only up
    to case ``stop`` (excluded) when given; write the index before each case."""
    from ratefit.codecs import container
    from ratefit.codecs.base import CodecError, capabilities_of
    from ratefit.workers.decompress import decode_container, stored_extras
    from ratefit.workers.read import ItemError

    seeds = _seeds(_codecs_of(target))
    codecs = {name: _codec(name) for name in _codecs_of(target)}   # a jpeg run need not load the learned models

    def codec_for(header):
        if header.codec not in codecs:
            raise ItemError("decode", f"unknown codec {header.codec!r}")
        return codecs[header.codec]

    counts = {"decoded": 0, "rejected": 0, "unexpected": 0}
    stop_at = time.time() + seconds if seconds is not None else float("inf")
    slowest = 0.0
    fd = os.open(progress_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    index = start
    crash_at = int(os.environ.get("RATEFIT_FUZZ_CRASH_AT", "-1"))   # the harness's own test: die like a segfault
    while time.time() < stop_at and (stop is None or index < stop):
        os.pwrite(fd, f"{index:>12}".encode(), 0)
        if index == crash_at:
            os.abort()
        data = make_case(seeds, target, seed, index)
        t0 = time.perf_counter()
        try:
            decode_container(data, codec_for, max_pixels=4_000_000)
            # what a decompress job reads beside the picture: the sections or the file's own
            # metadata and alpha, and a restored original
            header, payload = container.unpack(data)
            codec = codec_for(header)
            stored_extras(codec, payload, None if capabilities_of(codec).plain_file else header)
            if capabilities_of(codec).restores_original:
                try:
                    codec.original_of(payload)
                except CodecError as e:
                    raise ItemError("decode", str(e)) from None
            counts["decoded"] += 1
        except ItemError:
            counts["rejected"] += 1
        except Exception as e:   # noqa: BLE001 - the point is to find these
            counts["unexpected"] += 1
            print(json.dumps({"unexpected": index, "error": f"{type(e).__name__}: {e}"}), flush=True)
        slowest = max(slowest, time.perf_counter() - t0)
        index += 1
    print(json.dumps({"done": index, **counts, "slowest_s": slowest}), flush=True)
    return 0


# ---------------------------------------------------------------------------- parent

@dataclass
class TargetReport:
    target: str
    cases: int = 0
    decoded: int = 0
    rejected: int = 0
    unexpected: list[dict] = field(default_factory=list)
    crashes: list[dict] = field(default_factory=list)
    hangs: list[dict] = field(default_factory=list)
    slowest_s: float = 0.0


def _run_target(target: str, seed: int, seconds: float | None, case_timeout: float, out: Path,
                cases: int | None = None) -> TargetReport:
    """Cases 0, 1, ... of ``target`` for ``seconds`` (None: no time limit), or exactly the first
    ``cases`` of them (crashing and hanging ones included) when given; at least one of the two."""
    if seconds is None and cases is None:
        raise ValueError("a fuzz run needs --seconds or --cases")
    report = TargetReport(target)
    progress = out / f".progress-{target}"
    index = 0
    deadline = time.time() + seconds if seconds is not None else float("inf")
    while time.time() < deadline and (cases is None or index < cases):
        cmd = [sys.executable, "-m", "ratefit.jobs.tools.fuzz", "--child", target, "--seed", str(seed),
               "--start", str(index), "--progress-file", str(progress)]
        if seconds is not None:
            cmd += ["--seconds", str(max(deadline - time.time(), 1.0))]
        if cases is not None:
            cmd += ["--stop", str(cases)]
        progress.unlink(missing_ok=True)
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        last, last_change = None, time.monotonic()
        while child.poll() is None:
            time.sleep(0.5)
            now = progress.read_text().strip() if progress.exists() else None
            if now != last:
                last, last_change = now, time.monotonic()
            elif last is not None and time.monotonic() - last_change > case_timeout:
                child.kill()
                child.wait()
                break
        lines = [json.loads(x) for x in (child.stdout.read() if child.stdout else "").splitlines() if x.startswith("{")]
        done = next((x for x in lines if "done" in x), None)
        report.unexpected += [x for x in lines if "done" not in x and "unexpected" in x]
        if done is not None:
            report.decoded += done["decoded"]
            report.rejected += done["rejected"]
            report.slowest_s = max(report.slowest_s, done["slowest_s"])
            report.cases += done["done"] - index
            break
        # The child died or hung on case `last`: save it, count it, go on after it.
        failed = int(last) if last else index
        case_file = out / f"{target}-seed{seed}-case{failed}.rfic"
        case_file.write_bytes(make_case(_seeds(_codecs_of(target)), target, seed, failed))
        entry = {"case": failed, "file": str(case_file), "returncode": child.returncode}
        (report.hangs if child.returncode == -9 else report.crashes).append(entry)
        report.cases += failed + 1 - index
        index = failed + 1
    return report


def run(args: argparse.Namespace) -> int:
    targets = TARGETS if args.targets == "all" else tuple(t.strip() for t in args.targets.split(","))
    unknown = set(targets) - set(TARGETS)
    if unknown:
        print(f"unknown fuzz target(s): {', '.join(sorted(unknown))}; choose from {', '.join(TARGETS)}")
        return 2
    if args.cases is not None and args.cases < 1:
        print("--cases must be at least 1")
        return 2
    seconds = args.seconds if args.seconds is not None else (None if args.cases is not None else DEFAULT_SECONDS)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    per_target = seconds / len(targets) if seconds is not None else None
    reports = []
    for target in targets:
        r = _run_target(target, args.seed, per_target, args.case_timeout, out, cases=args.cases)
        reports.append(r)
        print(f"{target:>16}: {r.cases} cases ({r.decoded} decoded, {r.rejected} rejected), "
              f"{len(r.unexpected)} unexpected errors, {len(r.crashes)} crashes, {len(r.hangs)} hangs, "
              f"slowest case {r.slowest_s:.2f} s", flush=True)
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    summary = {"seed": args.seed, "seconds": seconds, "cases_per_target": args.cases, "peak_child_rss_mb": round(peak_mb, 1),
               "targets": [r.__dict__ for r in reports]}
    (out / "fuzz-report.json").write_text(json.dumps(summary, indent=2))
    bad = sum(len(r.unexpected) + len(r.crashes) + len(r.hangs) for r in reports)
    print(f"peak child memory {peak_mb:.0f} MB; report: {out / 'fuzz-report.json'}")
    return 1 if bad else 0


def add_fuzz_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seconds", type=float, default=None,
                   help=f"total time, split evenly over the targets (default {DEFAULT_SECONDS:g} without --cases; "
                        "with --cases, a limit on top of the count)")
    p.add_argument("--cases", type=int, default=None,
                   help="run exactly this many cases per target (cases 0..N-1 of the seed), however long they take")
    p.add_argument("--targets", default="all", help=f"comma-separated, from {', '.join(TARGETS)} (default all)")
    p.add_argument("--seed", type=int, default=0, help="run seed: the same seed gives the same cases")
    p.add_argument("--case-timeout", type=float, default=30, help="seconds one case may take before it is a hang")
    p.add_argument("--out", default="fuzz-findings", help="folder for the report and any failing cases")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ratefit.jobs.tools.fuzz", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_fuzz_arguments(p)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--stop", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--progress-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return _child(args.child, args.seed, args.start, args.seconds, args.progress_file, args.stop)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
