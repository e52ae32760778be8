"""``ratefit train``: train the gain-hyperprior model from a folder of photos.

Random crops with flips, one λ per rate level, a level drawn per batch item, Adam on the
network and a separate Adam on the entropy bottleneck's quantiles (its auxiliary loss), and an
exponential moving average (EMA) of the weights, which is what ``--export`` writes.

Two paths compute the same loss. ``fast`` (the default) keeps the photos on the device as
uint8 and draws crops there, runs the transforms in bf16 (CUDA) with GDN and the entropy
models in float32, in ``channels_last``, with fused Adam (``train_fast.py``). ``reference``
is the original loop: crops cut on the CPU, float32 throughout. ``--throughput-probe``
measures both on whatever device it runs, in under a minute.

One run spans many short GPU leases: the learning rate follows a cosine over a planned total
of steps (``--schedule-total``), and the position in it, with running totals (steps, crops,
GPU minutes, devices, data packs seen), is written into the exported weights' metadata. A
chunk started with ``--init WEIGHTS`` reads them back and continues the schedule from the
EMA weights with a fresh optimiser and a short warm-up (``docs/training.md``). Within a
chunk, ``OUT/checkpoint.pt`` (model, EMA, both optimisers, step, RNG states) is written
atomically, so a killed run resumes exactly where it stopped. Logs go to
``OUT/train_log.csv`` and ``OUT/eval_log.jsonl`` (per-level bpp, PSNR and loss on the
evaluation folder).

Runs on a CPU for a smoke test (``--N 8 --M 12 --steps 3``) and on a GPU for the real run.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ratefit.codecs.gain_hyperprior import export_weights, load_model, resolve_device
from ratefit.codecs.gained import GainedHyperprior, ModelConfig, geometric_lambdas, pad_to_multiple
from ratefit.jobs.tools.train_fast import EMA, make_batches, make_loss, make_optimizers, make_step, prepare_model
from ratefit.workers.codec_loader import read_weights_file

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"   # ../shared/data beside the repo
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
LOG_FIELDS = ["step", "loss", "bpp", "mse", "psnr", "aux", "lr", "images_per_s", "elapsed_s", "global_step"]
PACKS = ("train", "train-b")   # training packs that alternate between leases
REF_BATCH = 64                 # the batch the schedule's learning rates are given for
LEGACY_BATCH = 32              # batch of the steps in weights from before the totals were recorded
DEFAULT_LAMBDAS = (0.0012, 0.16)


def list_images(folders: list[str], training: bool = True) -> list[Path]:
    """Image files under ``folders``; training sets must not contain Kodak (the evaluation set)."""
    files = sorted(p for d in folders for p in Path(d).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    for f in files if training else ():
        if "kodim" in f.name.lower():
            raise SystemExit(f"ratefit train: {f} looks like a Kodak image; Kodak is the evaluation set")
    return files


def load_images(files: list[Path], min_side: int, threads: int = 8) -> list[torch.Tensor]:
    """Decode every training photo once into memory (uint8 CHW); skip ones smaller than a crop."""
    def load(f: Path) -> torch.Tensor | None:
        try:
            with Image.open(f) as im:
                a = np.asarray(im.convert("RGB"))
        except Exception as e:
            print(f"ratefit train: skipping {f}: {e}", file=sys.stderr)
            return None
        if min(a.shape[:2]) < min_side:
            return None
        return torch.from_numpy(a.copy()).permute(2, 0, 1)

    with ThreadPoolExecutor(threads) as pool:
        images = [t for t in pool.map(load, files) if t is not None]
    if not images:
        raise SystemExit(f"ratefit train: no usable training images (need at least {min_side}px on the short side)")
    return images


@torch.no_grad()
def evaluate(model: GainedHyperprior, images: list[torch.Tensor], device: torch.device) -> list[dict]:
    """Per integer level: mean estimated bpp, PSNR and loss (λ·MSE₂₅₅ + bpp) over the images."""
    model.eval()
    rows = []
    for level in range(model.config.levels):
        bpps, mses = [], []
        for im in images:
            x = im[None].to(device).float() / 255
            h, w = x.shape[2:]
            out = model(pad_to_multiple(x), torch.tensor([float(level)], device=device))
            bits = sum(-torch.log2(lik).sum() for lik in out["likelihoods"].values())
            bpps.append(float(bits) / (h * w))
            x_hat = out["x_hat"][:, :, :h, :w].clamp(0, 1)
            mses.append(float((torch.round(x_hat * 255) - torch.round(x * 255)).pow(2).mean()))
        lam = model.config.lambdas[level]
        rows.append({"level": level, "lambda": lam, "bpp": float(np.mean(bpps)),
                     "psnr": float(np.mean([10 * math.log10(255 ** 2 / max(m, 1e-10)) for m in mses])),
                     "loss": float(np.mean([lam * m + b for m, b in zip(mses, bpps)]))})
    model.train()
    return rows


# ------------------------------------------------------------------ the schedule across leases

@dataclass(frozen=True)
class Plan:
    """The learning-rate schedule of one run over many chunks: a cosine from ``lr_peak`` at
    step 0 to ``lr_min`` at ``total_steps`` (then flat), for batch ``REF_BATCH``; other
    batches scale the whole curve by sqrt(batch / REF_BATCH) (Adam's square-root rule)."""

    total_steps: int = 500_000
    lr_peak: float = 2e-4
    lr_min: float = 1e-5

    def lr(self, step: int, batch: int = REF_BATCH) -> float:
        t = min(max(step / self.total_steps, 0.0), 1.0)
        base = self.lr_min + 0.5 * (self.lr_peak - self.lr_min) * (1 + math.cos(math.pi * t))
        return base * math.sqrt(batch / REF_BATCH)

    def to_meta(self) -> dict[str, str]:
        return {"schedule_shape": "cosine", "schedule_total_steps": str(self.total_steps),
                "schedule_lr_peak": repr(self.lr_peak), "schedule_lr_min": repr(self.lr_min),
                "schedule_ref_batch": str(REF_BATCH), "schedule_batch_scaling": "sqrt"}


def chunk_lr(plan: Plan, global_step: int, local_step: int, warmup: int, batch: int) -> float:
    """Learning rate of the update taking the run from ``global_step`` to ``global_step`` + 1.

    The first ``warmup`` updates of a chunk ramp linearly up to the schedule: each chunk
    starts with a fresh Adam, whose first moment estimates are noisy.
    """
    lr = plan.lr(global_step, batch)
    return lr * (local_step + 1) / warmup if local_step < warmup else lr


def resolve_plan(args: argparse.Namespace, recorded: dict) -> Plan:
    """The plan from the command line, else the one recorded (weights or checkpoint), else defaults."""
    d = Plan()
    got = lambda key, arg, kind, default: (kind(arg) if arg is not None else   # noqa: E731
                                           kind(recorded[key]) if key in recorded else default)
    plan = Plan(total_steps=got("schedule_total_steps", args.schedule_total, int, d.total_steps),
                lr_peak=got("schedule_lr_peak", args.lr, float, d.lr_peak),
                lr_min=got("schedule_lr_min", args.lr_min, float, d.lr_min))
    if plan.total_steps <= 0 or not 0 < plan.lr_min <= plan.lr_peak:
        raise SystemExit(f"ratefit train: need --schedule-total > 0 and 0 < --lr-min <= --lr, got {plan}")
    return plan


@dataclass
class Totals:
    """Running totals of a run across chunks, as the weights' metadata records them."""

    steps: int = 0
    hours: float = 0.0
    schedule_step: int = 0
    crops: int = 0
    gpu_minutes: float = 0.0
    devices: list[str] = field(default_factory=list)
    packs: list[str] = field(default_factory=list)
    chunks: list[dict] = field(default_factory=list)

    @classmethod
    def from_meta(cls, meta: dict[str, str]) -> "Totals":
        """Read them back; weights from before these keys (the first shipped file) get theirs
        from ``trained_steps`` etc.: the schedule position is their step count, crops assume
        batch ``LEGACY_BATCH``, and GPU minutes are their hours unless trained on a CPU."""
        steps = int(meta.get("trained_steps", 0))
        hours = float(meta.get("train_hours", 0.0))
        device = meta.get("train_device")
        return cls(steps=steps, hours=hours,
                   schedule_step=int(meta.get("schedule_step", steps)),
                   crops=int(meta.get("train_crops", steps * LEGACY_BATCH)),
                   gpu_minutes=float(meta.get("train_gpu_minutes", hours * 60 if device not in (None, "cpu") else 0)),
                   devices=json.loads(meta["train_devices"]) if "train_devices" in meta else [device] * bool(device),
                   packs=(json.loads(meta["train_packs"]) if "train_packs" in meta
                          else [p for p in meta.get("train_data", "").split(",") if p]),
                   chunks=json.loads(meta.get("train_chunks", "[]")))

    def plus(self, chunk: dict) -> "Totals":
        """These totals with one more chunk (its steps, crops, minutes, device and packs) added."""
        gpu = chunk["minutes"] if chunk["device"] != "cpu" else 0.0
        return Totals(steps=self.steps + chunk["steps"], hours=self.hours + chunk["minutes"] / 60,
                      schedule_step=chunk["schedule_to"], crops=self.crops + chunk["crops"],
                      gpu_minutes=self.gpu_minutes + gpu,
                      devices=self.devices + [chunk["device"]] * (chunk["device"] not in self.devices),
                      packs=self.packs + [p for p in chunk["packs"] if p not in self.packs],
                      chunks=self.chunks + [chunk])

    def to_meta(self) -> dict[str, str]:
        return {"trained_steps": str(self.steps), "train_hours": f"{self.hours:.3f}",
                "train_data": ",".join(self.packs), "schedule_step": str(self.schedule_step),
                "train_crops": str(self.crops), "train_gpu_minutes": f"{self.gpu_minutes:.2f}",
                "train_devices": json.dumps(self.devices), "train_packs": json.dumps(self.packs),
                "train_chunks": json.dumps(self.chunks)}


def next_pack(meta: dict[str, str], packs: tuple[str, ...] = PACKS) -> str:
    """The training pack the next chunk should use: one never seen, else not the last chunk's."""
    totals = Totals.from_meta(meta)
    unseen = [p for p in packs if p not in totals.packs]
    if unseen:
        return unseen[0]
    last = totals.chunks[-1]["packs"] if totals.chunks else []
    return next((p for p in packs if p not in last), packs[0])


def pack_names(folders: list[str]) -> list[str]:
    """A data folder's pack is its name (``.train/train-b`` → ``train-b``; a leading dot dropped)."""
    return [Path(d).resolve().name.lstrip(".") for d in folders]


def extend_levels(model: GainedHyperprior, lambda_min: float | None, lambda_max: float | None
                  ) -> GainedHyperprior:
    """``model`` with rate levels added below/above its range to reach ``lambda_min``/``lambda_max``.

    New levels continue the geometric λ spacing, and their log-gains continue the end
    levels' line, which is exactly what the model already does for a control value beyond
    its range (``GainedHyperprior._interpolate``): level −1 of the old model becomes the new
    model's level just below the old range, unchanged, and training then refines it.
    """
    lams = model.config.lambdas
    ratio = (lams[-1] / lams[0]) ** (1 / (len(lams) - 1))
    below = max(0, round(math.log(lams[0] / lambda_min) / math.log(ratio))) if lambda_min else 0
    above = max(0, round(math.log(lambda_max / lams[-1]) / math.log(ratio))) if lambda_max else 0
    if not below and not above:
        return model
    new = tuple(round(lams[0] * ratio ** -i, 7) for i in range(below, 0, -1)) + lams + \
        tuple(round(lams[-1] * ratio ** i, 7) for i in range(1, above + 1))
    state = model.state_dict()
    for name in ("log_gain", "log_inv_gain", "log_hgain", "log_inv_hgain"):
        t = state[name]
        lo = [t[0] - i * (t[1] - t[0]) for i in range(below, 0, -1)]
        hi = [t[-1] + i * (t[-1] - t[-2]) for i in range(1, above + 1)]
        state[name] = torch.stack(lo + list(t) + hi)
    out = GainedHyperprior(ModelConfig(N=model.config.N, M=model.config.M, lambdas=new))
    out.load_state_dict(state)
    print(f"rate levels extended: {below} below, {above} above; λ now {new[0]:g}..{new[-1]:g} ({len(new)} levels)")
    return out


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------ the training run

def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    path, bf16 = _path(args, device)
    ckpt_path = out / "checkpoint.pt"
    resumed = ckpt_path.exists() and not args.fresh
    ckpt: dict = {}
    torch.manual_seed(args.seed)
    if resumed:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)   # our own file
        model = GainedHyperprior(ModelConfig.from_dict(ckpt["config"]))
        prior = Totals(**ckpt["prior"]) if "schedule_step" in ckpt.get("prior", {}) else \
            Totals(steps=ckpt.get("prior", {}).get("steps", 0), hours=ckpt.get("prior", {}).get("hours", 0.0))
        plan = resolve_plan(args, ckpt.get("plan", {}))
    elif args.init:
        # Continue a run from its shipped (EMA) weights: fresh optimisers, schedule where it was.
        model, _, meta = load_model(read_weights_file(args.init), torch.device("cpu"))
        model.train()
        for p in model.parameters():
            p.requires_grad_(True)
        model = extend_levels(model, args.lambda_min, args.lambda_max)
        prior, plan = Totals.from_meta(meta), resolve_plan(args, meta)
        print(f"continuing from {args.init}: {prior.steps} steps behind it, schedule at step "
              f"{prior.schedule_step} of {plan.total_steps}, packs seen {prior.packs or 'none'}")
    else:
        lo, hi = args.lambda_min or DEFAULT_LAMBDAS[0], args.lambda_max or DEFAULT_LAMBDAS[1]
        model = GainedHyperprior(ModelConfig(N=args.N, M=args.M, lambdas=geometric_lambdas(lo, hi, args.levels)))
        prior, plan = Totals(), resolve_plan(args, {})
    config = model.config
    model = prepare_model(model, path, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True   # fixed crop size: let cuDNN pick the fastest convolutions
    opt, aux_opt = make_optimizers(model, path, plan.lr_peak, args.aux_lr, device)
    ema = EMA(model, args.ema_decay) if args.ema_decay > 0 else None
    lambdas = torch.tensor(config.lambdas, device=device)

    files = list_images(args.data)
    t0 = time.perf_counter()
    images = load_images(files, args.crop)
    batches, rng, crops = make_batches(path, images, args.batch_size, args.crop, config.levels, device, args.seed)
    print(f"{len(images)} training images from {len(files)} files in {', '.join(args.data)} "
          f"({time.perf_counter() - t0:.1f} s), model N={config.N} M={config.M}, {config.levels} levels, "
          f"λ {config.lambdas[0]:g}..{config.lambdas[-1]:g}, device {device}, path {path}"
          f"{' (bf16)' if bf16 else ''}, batch {args.batch_size}, EMA {args.ema_decay:g}", flush=True)
    eval_images = []
    if args.eval:
        eval_files = list_images([args.eval], training=False)
        eval_images = load_images(eval_files[: args.eval_limit or None], 1)

    step, crops_done, seconds_before, lr_scale = 0, 0, 0.0, 1.0
    def restore(state: dict) -> None:
        """Network, EMA and both optimisers from a checkpoint (one from before the EMA: the network)."""
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        aux_opt.load_state_dict(state["aux_opt"])
        if ema is not None:
            ema.load_state_dict(state.get("ema") or state["model"])

    if resumed:
        restore(ckpt)
        step, crops_done = int(ckpt["step"]), int(ckpt.get("crops", ckpt["step"] * args.batch_size))
        seconds_before = float(ckpt.get("seconds", ckpt.get("hours", 0.0) * 3600))
        lr_scale = float(ckpt.get("lr_scale", 1.0))
        rng.setstate(ckpt["rng"])
        torch.set_rng_state(ckpt["torch_rng"])
        if crops is not None and ckpt.get("sampler") is not None:
            crops.generator.set_state(ckpt["sampler"])
        if device.type == "cuda" and ckpt.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
        print(f"resuming from {ckpt_path} at step {step} (schedule step {prior.schedule_step + step})")
    train_step = make_step(model, opt, aux_opt, ema, batches,
                           make_loss(path, model, lambdas, bf16, args.compile), args.clip)

    log_new = not (out / "train_log.csv").exists()
    log_file = open(out / "train_log.csv", "a", newline="")
    log = csv.DictWriter(log_file, fieldnames=LOG_FIELDS)
    if log_new:
        log.writeheader()

    def seconds() -> float:
        return seconds_before + time.perf_counter() - t_start

    def checkpoint() -> None:
        _atomic_save({"model": model.state_dict(), "ema": ema.state_dict() if ema else None,
                      "opt": opt.state_dict(), "aux_opt": aux_opt.state_dict(), "step": step,
                      "crops": crops_done, "seconds": seconds(), "lr_scale": lr_scale,
                      "rng": rng.getstate(), "torch_rng": torch.get_rng_state(),
                      "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                      "sampler": crops.generator.get_state() if crops is not None else None,
                      "config": config.to_dict(), "prior": asdict(prior), "plan": plan.to_meta()}, ckpt_path)

    model.train()
    zero = {"loss": 0.0, "bpp": 0.0, "mse": 0.0, "aux": 0.0, "n": 0}
    acc = dict(zero)
    t_start = t_log = time.perf_counter()
    crops_since = 0
    deadline = t_start + args.max_minutes * 60 if args.max_minutes else math.inf
    r: dict = {}
    while step < args.steps:
        if time.perf_counter() >= deadline:
            print(f"time budget of {args.max_minutes:g} min reached at step {step}; checkpointing", flush=True)
            checkpoint()
            break
        lr = lr_scale * chunk_lr(plan, prior.schedule_step + step, step, args.warmup_steps, args.batch_size)
        r = train_step(lr)
        step += 1
        crops_done += r["crops"]
        crops_since += r["crops"]
        for k in ("loss", "bpp", "mse", "aux"):   # device tensors: no host sync per step, the GPU stays busy
            acc[k] += r[k]
        acc["n"] += 1
        if step % args.log_every == 0 or step == args.steps:
            now = time.perf_counter()
            n = acc["n"]
            acc.update({k: float(acc[k]) for k in ("loss", "bpp", "mse", "aux")})
            mse = acc["mse"] / n
            row = {"step": step, "loss": acc["loss"] / n, "bpp": acc["bpp"] / n, "mse": mse,
                   "psnr": 10 * math.log10(1 / max(mse, 1e-10)), "aux": acc["aux"] / n, "lr": lr,
                   "images_per_s": crops_since / max(now - t_log, 1e-9), "elapsed_s": now - t_start,
                   "global_step": prior.schedule_step + step}
            if not math.isfinite(row["loss"]) and ckpt_path.exists():
                # Diverged: go back to the last checkpoint (saved only while finite) at half the rate.
                state = torch.load(ckpt_path, map_location=device, weights_only=False)
                restore(state)
                step, crops_done, lr_scale = int(state["step"]), int(state.get("crops", 0)), lr_scale / 2
                print(f"loss is not finite; back to step {step}, learning rate now {lr_scale:g}× the schedule's",
                      flush=True)
                acc, t_log, crops_since = dict(zero), now, 0
                continue
            log.writerow(row)
            log_file.flush()
            eta = min((args.steps - step) * (now - t_log) / max(n, 1), deadline - now)
            print(f"step {step}/{args.steps} (schedule {row['global_step']})  loss {row['loss']:.4f}  "
                  f"bpp {row['bpp']:.3f}  psnr {row['psnr']:.2f}  aux {row['aux']:.1f}  lr {lr:.3g}  "
                  f"{row['images_per_s']:.1f} img/s  eta {eta / 60:.1f} min", flush=True)
            acc, t_log, crops_since = dict(zero), now, 0
        if (step % args.ckpt_every == 0 or step == args.steps) and torch.isfinite(r["loss"]):
            checkpoint()
        if eval_images and (step % args.eval_every == 0 or step == args.steps):
            rows = evaluate(ema.model if ema else model, eval_images, device)
            with open(out / "eval_log.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "global_step": prior.schedule_step + step,
                                    "loss": float(np.mean([row["loss"] for row in rows])), "levels": rows}) + "\n")
            print("eval " + "  ".join(f"L{row['level']}: {row['bpp']:.3f} bpp {row['psnr']:.2f} dB" for row in rows),
                  flush=True)
    _sync(device)
    log_file.close()
    if args.export:
        minutes = seconds() / 60
        chunk = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%MZ"), "device": _device_name(device),
                 "path": path, "bf16": bf16, "batch": args.batch_size, "crop": args.crop, "steps": step,
                 "crops": crops_done, "minutes": round(minutes, 2),
                 "crops_per_s": round(crops_done / max(minutes * 60, 1e-9), 1), "packs": pack_names(args.data),
                 "schedule_from": prior.schedule_step, "schedule_to": prior.schedule_step + step,
                 "warmup": args.warmup_steps, "ema_decay": args.ema_decay, "levels": config.levels}
        totals = prior.plus(chunk)
        data = export_weights(ema.model if ema else model,
                              {**totals.to_meta(), **plan.to_meta(), "train_device": chunk["device"]})
        Path(args.export).parent.mkdir(parents=True, exist_ok=True)
        Path(args.export).write_bytes(data)
        print(f"wrote weights {args.export} ({len(data) / 1e6:.1f} MB, the {'EMA' if ema else 'last'} weights): "
              f"{totals.steps} steps in all, schedule at {totals.schedule_step}/{plan.total_steps} "
              f"(lr {plan.lr(totals.schedule_step):.3g}), packs seen {','.join(totals.packs)}")
    return 0


def _bf16(args: argparse.Namespace, device: torch.device) -> bool:
    """``--bf16``, where auto means on CUDA only (CPUs without bf16 matrix units run it slower)."""
    return {"on": True, "off": False}.get(args.bf16, device.type == "cuda")


def _path(args: argparse.Namespace, device: torch.device) -> tuple[str, bool]:
    """(path, bf16): ``fast`` unless asked otherwise; bf16 on the fast path only."""
    path = "fast" if args.path == "auto" else args.path
    return path, _bf16(args, device) and path == "fast"


# ------------------------------------------------------------------ the throughput probe

PROBE_VARIANTS = {"reference": ("reference", False, False), "fast": ("fast", None, False),
                  "fast-fp32": ("fast", False, False), "fast-compile": ("fast", None, True)}


def _probe_one(name: str, args: argparse.Namespace, images: list[torch.Tensor], config: ModelConfig,
               device: torch.device) -> dict:
    """Warm up, then time one variant's steps (clock read after a device sync about once a second)."""
    path, bf16, compile_ = PROBE_VARIANTS[name]
    if bf16 is None:   # the variant follows --bf16
        bf16 = _bf16(args, device)
    torch.manual_seed(args.seed)
    model = prepare_model(GainedHyperprior(config), path, device).train()
    opt, aux_opt = make_optimizers(model, path, 1e-4, args.aux_lr, device)
    ema = EMA(model, args.ema_decay) if path == "fast" and args.ema_decay > 0 else None
    batches, _, _ = make_batches(path, images, args.batch_size, args.crop, config.levels, device, args.seed)
    lambdas = torch.tensor(config.lambdas, device=device)
    step = make_step(model, opt, aux_opt, ema, batches, make_loss(path, model, lambdas, bf16, compile_), args.clip)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.probe_warmup):   # cuDNN's algorithm search, compilation, allocator growth
        step(1e-4)
    _sync(device)
    t1 = time.perf_counter()
    for _ in range(2):
        step(1e-4)
    _sync(device)
    per_step = (time.perf_counter() - t1) / 2
    block = max(1, int(1.0 / max(per_step, 1e-6)))   # steps between clock reads (one sync a second)
    n, elapsed, t2 = 0, 0.0, time.perf_counter()
    while n < 2 or (n < args.probe_steps and elapsed < args.probe_seconds):
        for _ in range(max(1, min(block, args.probe_steps - n))):
            last = step(1e-4)
            n += 1
        _sync(device)
        elapsed = time.perf_counter() - t2
    return {"variant": name, "path": path, "bf16": bf16, "compile": compile_, "steps": n,
            "seconds": round(elapsed, 3), "crops_per_s": round(n * args.batch_size / elapsed, 1),
            "ms_per_step": round(1000 * elapsed / n, 2), "warmup_s": round(t1 - t0, 2), "loss": float(last["loss"]),
            "peak_mem_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None}


def throughput_probe(args: argparse.Namespace) -> int:
    """Crops/s of training steps of each variant in ``--probe-paths`` on this device, printed
    (and written to OUT/throughput.json with ``--out``): what a lent GPU measures first."""
    device = resolve_device(args.device)
    names = [v.strip() for v in args.probe_paths.split(",") if v.strip()]
    unknown = [v for v in names if v not in PROBE_VARIANTS]
    if unknown:
        raise SystemExit(f"ratefit train: unknown --probe-paths {unknown}; known: {', '.join(PROBE_VARIANTS)}")
    if args.data:
        images = load_images(list_images(args.data)[: args.probe_images], args.crop)
    else:   # synthetic photos of a few sizes: the speed does not depend on the content
        gen = torch.Generator().manual_seed(args.seed)
        images = [torch.randint(0, 256, (3, args.crop + 16 * (i % 4), args.crop + 64 + 32 * (i % 3)),
                                dtype=torch.uint8, generator=gen) for i in range(16)]
    config = ModelConfig(N=args.N, M=args.M, lambdas=geometric_lambdas(
        args.lambda_min or DEFAULT_LAMBDAS[0], args.lambda_max or DEFAULT_LAMBDAS[1], args.levels))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    results = []
    for name in names:
        try:
            results.append(_probe_one(name, args, images, config, device))
        except Exception as e:   # one failing variant must not hide the others' figures
            print(f"probe variant {name} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            results.append({"variant": name, "error": f"{type(e).__name__}: {e}"[:500]})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report = {"device": _device_name(device), "N": config.N, "M": config.M, "batch": args.batch_size,
              "crop": args.crop, "torch": torch.__version__, "results": results,
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%MZ")}
    print(f"throughput probe on {report['device']}: N={config.N} M={config.M}, batch {args.batch_size}, "
          f"{args.crop}x{args.crop} crops")
    print(f"{'variant':<14}{'crops/s':>10}{'ms/step':>10}{'steps':>7}{'warm-up s':>11}{'peak GB':>9}")
    for row in results:
        if "error" in row:
            print(f"{row['variant']:<14}failed: {row['error']}")
            continue
        mem = f"{row['peak_mem_gb']:.1f}" if row["peak_mem_gb"] is not None else "-"
        print(f"{row['variant']:<14}{row['crops_per_s']:>10.1f}{row['ms_per_step']:>10.1f}{row['steps']:>7}"
              f"{row['warmup_s']:>11.1f}{mem:>9}")
    by = {row["variant"]: row["crops_per_s"] for row in results if "error" not in row}
    if "reference" in by and len(by) > 1:
        for name, v in by.items():
            if name != "reference":
                report[f"ratio_{name}"] = round(v / by["reference"], 3)   # printed as stored: one number
                print(f"{name}/reference: {report[f'ratio_{name}']:.2f}x")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "throughput.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0


# ------------------------------------------------------------------ command line

def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", action="append", help=f"folder of training photos (repeatable; default "
                   f"{SHARED_DATA}/train and train-b); its name is the pack name the weights record")
    p.add_argument("--out", help="folder for checkpoint.pt, train_log.csv, eval_log.jsonl (required to "
                   "train; with --throughput-probe, where throughput.json goes)")
    p.add_argument("--export", help="write the weights file (the EMA's) here when training ends")
    p.add_argument("--init", help="continue from this weights file (e.g. the shipped one): its schedule "
                   "position and totals, a fresh optimiser with --warmup-steps")
    p.add_argument("--eval", help="folder of evaluation photos (e.g. Kodak), evaluated every --eval-every steps")
    p.add_argument("--eval-every", type=int, default=5000)
    p.add_argument("--eval-limit", type=int, default=0, help="evaluate on the first N photos only (0 = all)")
    p.add_argument("--steps", type=int, default=200_000, help="most steps of this chunk (see also --max-minutes)")
    p.add_argument("--batch-size", type=int, default=REF_BATCH)
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--path", choices=("auto", "fast", "reference"), default="auto",
                   help="fast: crops on the device, bf16 transforms, channels_last, fused Adam (auto); "
                   "reference: the original float32 loop with CPU crops")
    p.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                   help="bf16 autocast of the transforms on the fast path (auto: on CUDA only)")
    p.add_argument("--compile", action="store_true", help="torch.compile the fast path's loss (off: it has "
                   "to earn back its compile time within a lease; measure with --probe-paths fast,fast-compile)")
    p.add_argument("--lr", type=float, help=f"peak learning rate of the schedule at batch {REF_BATCH} (default: "
                   f"the --init weights' plan, else 2e-4); other batches scale it by sqrt(batch/{REF_BATCH})")
    p.add_argument("--lr-min", type=float, help="learning rate at the schedule's end (default: recorded, else 1e-5)")
    p.add_argument("--schedule-total", type=int, help="planned total steps of the whole run over all chunks "
                   "(default: recorded, else 500000); the lr follows a cosine from --lr to --lr-min over it")
    p.add_argument("--warmup-steps", type=int, default=500, help="linear lr warm-up at the start of each chunk "
                   "(a fresh optimiser); not repeated when resuming from OUT/checkpoint.pt past it")
    p.add_argument("--ema-decay", type=float, default=0.999, help="EMA of the weights (exported); 0 = off")
    p.add_argument("--aux-lr", type=float, default=1e-3)
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clip (0 = off)")
    p.add_argument("--N", type=int, default=ModelConfig.N)
    p.add_argument("--M", type=int, default=ModelConfig.M)
    p.add_argument("--levels", type=int, default=8)
    p.add_argument("--lambda-min", type=float, help=f"lowest λ (default {DEFAULT_LAMBDAS[0]}); with --init, a "
                   "lower value than the file's adds rate levels below, extrapolated from its end levels")
    p.add_argument("--lambda-max", type=float, help=f"highest λ (default {DEFAULT_LAMBDAS[1]}); with --init, "
                   "likewise above")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--ckpt-every", type=int, default=1000)
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in --out")
    p.add_argument("--max-minutes", type=float, default=0,
                   help="stop (checkpoint, export) after this much training time: a chunk that fits a lease")
    p.add_argument("--throughput-probe", action="store_true", help="measure crops/s of --probe-paths, print, exit")
    p.add_argument("--probe-paths", default="reference,fast", help=f"probe variants ({', '.join(PROBE_VARIANTS)})")
    p.add_argument("--probe-seconds", type=float, default=10.0, help="timed seconds per probe variant")
    p.add_argument("--probe-steps", type=int, default=300, help="most timed steps per probe variant")
    p.add_argument("--probe-warmup", type=int, default=5, help="untimed steps before timing each variant")
    p.add_argument("--probe-images", type=int, default=256, help="photos of --data the probe loads")
    p.add_argument("--next-pack", metavar="WEIGHTS", help=f"print the pack ({', '.join(PACKS)}) the next chunk "
                   "from WEIGHTS should train on, and exit")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ratefit train", description=__doc__.split("\n")[0])
    add_train_arguments(p)
    args = p.parse_args(argv)
    return run(args)


def run(args: argparse.Namespace) -> int:
    if args.next_pack:
        from ratefit.workers.codec_loader import read_weights
        print(next_pack(read_weights(args.next_pack)[3]))
        return 0
    missing = [d for d in args.data or () if not Path(d).is_dir()]
    if missing:
        raise SystemExit(f"ratefit train: training folder(s) not found: {', '.join(missing)}")
    if args.levels < 2 or not (0 < (args.lambda_min or DEFAULT_LAMBDAS[0]) < (args.lambda_max or DEFAULT_LAMBDAS[1])):
        raise SystemExit("ratefit train: need --levels >= 2 and 0 < --lambda-min < --lambda-max")
    if args.throughput_probe:
        return throughput_probe(args)
    if not args.out:
        raise SystemExit("ratefit train: --out is required (the folder for the checkpoint and logs)")
    if not args.data:
        args.data = [str(SHARED_DATA / "train"), str(SHARED_DATA / "train-b")]
        missing = [d for d in args.data if not Path(d).is_dir()]
        if missing:
            raise SystemExit(f"ratefit train: training folder(s) not found: {', '.join(missing)}")
    return train(args)


if __name__ == "__main__":
    sys.exit(main())
