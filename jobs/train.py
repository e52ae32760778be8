"""``ratefit train``: train the gain-hyperprior model from a folder of photos.

Random crops with flips, one λ per rate level, a level drawn per batch item, Adam on the
network and a separate Adam on the entropy bottleneck's quantiles (its auxiliary loss).
Everything needed to continue is in ``OUT/checkpoint.pt`` (model, both optimisers, step,
RNG state), written atomically, so a killed run resumes where it stopped. Logs go to
``OUT/train_log.csv`` (one row per log interval) and ``OUT/eval_log.jsonl`` (per-level bpp
and PSNR on the evaluation folder, from the model's likelihoods). ``--export`` writes the
shipped weights file (fp16 transforms, float32 entropy path, tables built on CPU).

Runs on a CPU for a smoke test (``--N 8 --M 12 --steps 3``) and on a GPU for the real run.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ratefit.codecs.gain_hyperprior import export_weights, load_model
from ratefit.codecs.gained import GainedHyperprior, ModelConfig, geometric_lambdas, pad_to_multiple

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"   # ../shared/data beside the repo
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
LOG_FIELDS = ["step", "loss", "bpp", "mse", "psnr", "aux", "lr", "images_per_s", "elapsed_s"]


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


def random_batch(images: list[torch.Tensor], batch: int, crop: int, rng: random.Random) -> torch.Tensor:
    out = torch.empty(batch, 3, crop, crop, dtype=torch.uint8)
    for i in range(batch):
        im = images[rng.randrange(len(images))]
        _, h, w = im.shape
        top, left = rng.randrange(h - crop + 1), rng.randrange(w - crop + 1)
        c = im[:, top:top + crop, left:left + crop]
        if rng.random() < 0.5:
            c = c.flip(2)
        if rng.random() < 0.5:
            c = c.flip(1)
        out[i] = c
    return out


def rd_loss(model: GainedHyperprior, x: torch.Tensor, levels: torch.Tensor, lambdas: torch.Tensor) -> dict:
    """Per-item λ·255²·MSE + bpp, averaged over the batch (CompressAI's convention)."""
    out = model(x, levels)
    n_pixels = x.shape[2] * x.shape[3]
    bits = sum(torch.log2(lik).flatten(1).sum(1) for lik in out["likelihoods"].values())
    bpp = -bits / n_pixels
    mse = (out["x_hat"] - x).pow(2).flatten(1).mean(1)
    loss = (lambdas[levels.long()] * 255 ** 2 * mse + bpp).mean()
    return {"loss": loss, "bpp": bpp.mean(), "mse": mse.mean()}


@torch.no_grad()
def evaluate(model: GainedHyperprior, images: list[torch.Tensor], device: torch.device) -> list[dict]:
    """Per integer level: mean estimated bpp and PSNR over the evaluation images (rounded latents)."""
    model.eval()
    rows = []
    for level in range(model.config.levels):
        bpps, psnrs = [], []
        for im in images:
            x = im[None].to(device).float() / 255
            h, w = x.shape[2:]
            out = model(pad_to_multiple(x), torch.tensor([float(level)], device=device))
            bits = sum(-torch.log2(lik).sum() for lik in out["likelihoods"].values())
            bpps.append(float(bits) / (h * w))
            x_hat = out["x_hat"][:, :, :h, :w].clamp(0, 1)
            mse = float((torch.round(x_hat * 255) - torch.round(x * 255)).pow(2).mean())
            psnrs.append(10 * math.log10(255 ** 2 / max(mse, 1e-10)))
        rows.append({"level": level, "lambda": model.config.lambdas[level],
                     "bpp": float(np.mean(bpps)), "psnr": float(np.mean(psnrs))})
    model.train()
    return rows


def _progress(step: int, args: argparse.Namespace, elapsed_s: float) -> float:
    """How far this run is, 0..1, by steps or, with --max-minutes, by time, whichever is further.

    A GPU lease is a time budget, not a step count, so the learning-rate drop must happen at a
    fraction of the time too; otherwise a chunk with a huge --steps never decays.
    """
    done = step / args.steps
    if args.max_minutes:
        done = max(done, elapsed_s / (args.max_minutes * 60))
    return done


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _make_optimizers(model: GainedHyperprior, lr: float, aux_lr: float):
    aux = [p for n, p in model.named_parameters() if n.endswith(".quantiles")]
    net = [p for n, p in model.named_parameters() if not n.endswith(".quantiles")]
    return torch.optim.Adam(net, lr=lr), torch.optim.Adam(aux, lr=aux_lr)


def train(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    ckpt_path = out / "checkpoint.pt"
    config = ModelConfig(N=args.N, M=args.M, lambdas=geometric_lambdas(args.lambda_min, args.lambda_max, args.levels))
    step = 0
    prior = {"steps": 0, "hours": 0.0}   # training behind --init weights (the model card's running total)
    resumed = ckpt_path.exists() and not args.fresh
    if resumed:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)   # our own file
        config = ModelConfig.from_dict(ckpt["config"])
        prior = ckpt.get("prior", prior)
    torch.manual_seed(args.seed)
    if args.init and not resumed:
        # Continue from shipped weights: same architecture, fresh optimisers.
        model, _, meta = load_model(args.init, torch.device("cpu"))
        model.train()
        for p in model.parameters():
            p.requires_grad_(True)
        config = model.config
        prior = {"steps": int(meta.get("trained_steps", 0)), "hours": float(meta.get("train_hours", 0.0))}
        print(f"starting from {args.init} ({prior['steps']} steps behind it)")
    else:
        model = GainedHyperprior(config)
    model = model.to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True   # fixed crop size: let cuDNN pick the fastest convolutions
    opt, aux_opt = _make_optimizers(model, args.lr, args.aux_lr)
    rng = random.Random(args.seed)
    if resumed:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        aux_opt.load_state_dict(ckpt["aux_opt"])
        step = int(ckpt["step"])
        rng.setstate(ckpt["rng"])
        torch.set_rng_state(ckpt["torch_rng"])
        print(f"resuming from {ckpt_path} at step {step}")
    lambdas = torch.tensor(config.lambdas, device=device)

    files = list_images(args.data)
    t0 = time.perf_counter()
    images = load_images(files, args.crop)
    print(f"{len(images)} training images from {len(files)} files in {', '.join(args.data)} "
          f"({time.perf_counter() - t0:.1f} s), model N={config.N} M={config.M}, {config.levels} levels, "
          f"λ {config.lambdas[0]:g}..{config.lambdas[-1]:g}, device {device}", flush=True)
    eval_images = []
    if args.eval:
        eval_images = load_images(list_images([args.eval], training=False), 1)[: args.eval_limit or None]

    log_new = not (out / "train_log.csv").exists()
    log_file = open(out / "train_log.csv", "a", newline="")
    log = csv.DictWriter(log_file, fieldnames=LOG_FIELDS)
    if log_new:
        log.writeheader()

    def checkpoint() -> None:
        _atomic_save({"model": model.state_dict(), "opt": opt.state_dict(), "aux_opt": aux_opt.state_dict(),
                      "step": step, "rng": rng.getstate(), "torch_rng": torch.get_rng_state(),
                      "config": config.to_dict(), "prior": prior,
                      "hours": hours_before + (time.perf_counter() - t_start) / 3600}, ckpt_path)

    hours_before = float(ckpt.get("hours", 0.0)) if resumed else 0.0
    model.train()
    acc = {"loss": 0.0, "bpp": 0.0, "mse": 0.0, "aux": 0.0, "n": 0}
    t_start = t_log = time.perf_counter()
    images_since = 0
    deadline = t_start + args.max_minutes * 60 if args.max_minutes else math.inf
    while step < args.steps:
        if time.perf_counter() >= deadline:
            print(f"time budget of {args.max_minutes:g} min reached at step {step}; checkpointing", flush=True)
            checkpoint()
            break
        lr = args.lr * (0.1 if _progress(step, args, time.perf_counter() - t_start) >= args.decay_at else 1.0)
        for g in opt.param_groups:
            g["lr"] = lr
        x = random_batch(images, args.batch_size, args.crop, rng).to(device, non_blocking=True).float().div_(255)
        levels = torch.randint(0, config.levels, (x.shape[0],), device=device).float()
        r = rd_loss(model, x, levels, lambdas)
        opt.zero_grad(set_to_none=True)
        r["loss"].backward()
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], args.clip)
        opt.step()
        aux = model.aux_loss()
        aux_opt.zero_grad(set_to_none=True)
        aux.backward()
        aux_opt.step()
        step += 1
        images_since += x.shape[0]
        for k in ("loss", "bpp", "mse"):   # device tensors: no host sync per step, the GPU stays busy
            acc[k] += r[k].detach()
        acc["aux"] += aux.detach()
        acc["n"] += 1
        if step % args.log_every == 0 or step == args.steps:
            now = time.perf_counter()
            n = acc["n"]
            acc.update({k: float(acc[k]) for k in ("loss", "bpp", "mse", "aux")})
            mse = acc["mse"] / n
            row = {"step": step, "loss": acc["loss"] / n, "bpp": acc["bpp"] / n, "mse": mse,
                   "psnr": 10 * math.log10(1 / max(mse, 1e-10)), "aux": acc["aux"] / n, "lr": lr,
                   "images_per_s": images_since / max(now - t_log, 1e-9), "elapsed_s": now - t_start}
            if not math.isfinite(row["loss"]) and ckpt_path.exists():
                # Diverged: go back to the last checkpoint (saved only while finite) at half the rate.
                state = torch.load(ckpt_path, map_location=device, weights_only=False)
                model.load_state_dict(state["model"])
                opt.load_state_dict(state["opt"])
                aux_opt.load_state_dict(state["aux_opt"])
                step, args.lr = int(state["step"]), args.lr / 2
                print(f"loss is not finite; back to step {step}, lr now {args.lr:g}", flush=True)
                acc = {"loss": 0.0, "bpp": 0.0, "mse": 0.0, "aux": 0.0, "n": 0}
                t_log, images_since = now, 0
                continue
            log.writerow(row)
            log_file.flush()
            eta = (args.steps - step) * (now - t_log) / max(n, 1)
            print(f"step {step}/{args.steps}  loss {row['loss']:.4f}  bpp {row['bpp']:.3f}  "
                  f"psnr {row['psnr']:.2f}  aux {row['aux']:.1f}  {row['images_per_s']:.1f} img/s  "
                  f"eta {eta / 60:.1f} min", flush=True)
            acc = {"loss": 0.0, "bpp": 0.0, "mse": 0.0, "aux": 0.0, "n": 0}
            t_log, images_since = now, 0
        if (step % args.ckpt_every == 0 or step == args.steps) and torch.isfinite(r["loss"]):
            checkpoint()
        if eval_images and (step % args.eval_every == 0 or step == args.steps):
            rows = evaluate(model, eval_images, device)
            with open(out / "eval_log.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "levels": rows}) + "\n")
            print("eval " + "  ".join(f"L{r['level']}: {r['bpp']:.3f} bpp {r['psnr']:.2f} dB" for r in rows), flush=True)
    log_file.close()
    if args.export:
        hours = hours_before + (time.perf_counter() - t_start) / 3600
        data = export_weights(model, {
            "trained_steps": str(prior["steps"] + step), "train_hours": f"{prior['hours'] + hours:.3f}",
            "train_device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "train_data": ",".join(Path(d).resolve().name.lstrip(".") for d in args.data)})
        Path(args.export).parent.mkdir(parents=True, exist_ok=True)
        Path(args.export).write_bytes(data)
        print(f"wrote weights {args.export} ({len(data) / 1e6:.1f} MB)")
    return 0


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", action="append", help=f"folder of training photos (repeatable; default "
                   f"{SHARED_DATA}/train and train-b)")
    p.add_argument("--out", required=True, help="folder for checkpoint.pt, train_log.csv, eval_log.jsonl")
    p.add_argument("--export", help="write the weights file here when training ends")
    p.add_argument("--init", help="start from this weights file (e.g. the shipped one) instead of random weights")
    p.add_argument("--eval", help="folder of evaluation photos (e.g. Kodak), evaluated every --eval-every steps")
    p.add_argument("--eval-every", type=int, default=5000)
    p.add_argument("--eval-limit", type=int, default=0, help="evaluate on the first N photos only (0 = all)")
    p.add_argument("--steps", type=int, default=200_000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--aux-lr", type=float, default=1e-3)
    p.add_argument("--decay-at", type=float, default=0.85, help="fraction of --steps (or of --max-minutes, whichever comes first) after which lr drops 10x")
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clip (0 = off)")
    p.add_argument("--N", type=int, default=ModelConfig.N)
    p.add_argument("--M", type=int, default=ModelConfig.M)
    p.add_argument("--levels", type=int, default=8)
    p.add_argument("--lambda-min", type=float, default=0.0012)
    p.add_argument("--lambda-max", type=float, default=0.16)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--ckpt-every", type=int, default=1000)
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in --out")
    p.add_argument("--max-minutes", type=float, default=0,
                   help="stop (checkpoint, export) after this much training time: a chunk that fits a lease")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ratefit train", description=__doc__.split("\n")[0])
    add_train_arguments(p)
    args = p.parse_args(argv)
    return run(args)


def run(args: argparse.Namespace) -> int:
    if not args.data:
        args.data = [str(SHARED_DATA / "train"), str(SHARED_DATA / "train-b")]
    missing = [d for d in args.data if not Path(d).is_dir()]
    if missing:
        raise SystemExit(f"ratefit train: training folder(s) not found: {', '.join(missing)}")
    if args.levels < 2 or not (0 < args.lambda_min < args.lambda_max):
        raise SystemExit("ratefit train: need --levels >= 2 and 0 < --lambda-min < --lambda-max")
    return train(args)


if __name__ == "__main__":
    sys.exit(main())
