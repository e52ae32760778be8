"""The trainer's fast path and its continuation across leases (CPU, tiny models).

The fast path must compute the reference loss (so that speed does not change what is
trained), its device-side crops must be real flipped sub-windows, the EMA must be the
average it claims, and a chunk continued from exported weights must pick the schedule up
at the recorded step with totals that add up. The smoke test of the whole loop (checkpoint,
resume, export, --init) is ``test_trainer_smoke_checkpoints_resumes_and_exports`` in
``tests/test_gain_hyperprior.py``.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import time
from pathlib import Path

import pytest
import torch

from ratefit.codecs.gain_hyperprior import export_weights
from ratefit.codecs.gained import GDN, GainedHyperprior, ModelConfig
from ratefit.jobs.tools import train as train_job
from ratefit.jobs.tools.train_fast import EMA, DeviceCrops, forward_mixed, rd_loss, rd_terms
from ratefit.workers.codec_loader import read_weights

TINY = ModelConfig(N=8, M=12, lambdas=(0.002, 0.02, 0.2))
COMMON = ["--N", "8", "--M", "12", "--levels", "3", "--batch-size", "2", "--crop", "64", "--device", "cpu",
          "--log-every", "1"]


def _model(seed: int = 0) -> GainedHyperprior:
    torch.manual_seed(seed)
    model = GainedHyperprior(TINY)
    with torch.no_grad():   # an untrained analysis gives tiny latents: raise the gains so levels differ
        model.log_gain += 3.0
        model.log_inv_gain -= 3.0
    return model


@pytest.fixture(scope="module")
def images(samples_dir) -> list[torch.Tensor]:
    return train_job.load_images(train_job.list_images([str(samples_dir)]), 64)


@pytest.fixture(scope="module")
def batch(images) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.stack([im[:, 10:74, 20:84] for im in images]).float() / 255
    return x, torch.tensor([0.0, 1.0, 2.0, 1.0])[: x.shape[0]]


def _pack(tmp_path: Path, samples_dir: Path, name: str) -> Path:
    d = tmp_path / name
    d.mkdir()
    for f in ("astronaut.png", "coffee.png", "rocket.jpg"):
        (d / f).write_bytes((samples_dir / f).read_bytes())
    return d


def _log(out: Path) -> list[dict]:
    with open(out / "train_log.csv") as f:
        return list(csv.DictReader(f))


def _grads(model: GainedHyperprior, loss: torch.Tensor) -> torch.Tensor:
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for n, p in model.named_parameters()
                      if p.grad is not None and not n.endswith("quantiles")])


# ------------------------------------------------------------------ fast path = reference loss

def test_fast_path_loss_equals_reference_in_float32(batch):
    x, levels = batch
    lambdas = torch.tensor(TINY.lambdas)
    ref, fast = _model(), _model()
    # Training mode (additive noise): same seed, same layout, so the same noise is drawn.
    torch.manual_seed(5)
    a = rd_loss(ref, x, levels, lambdas)
    torch.manual_seed(5)
    b = rd_terms(forward_mixed(fast, x, levels, bf16=False), x, levels, lambdas)
    for k in ("loss", "bpp", "mse"):
        assert b[k].item() == pytest.approx(a[k].item(), rel=1e-5), k
    ga, gb = _grads(ref, a["loss"]), _grads(fast, b["loss"])
    assert torch.allclose(ga, gb, rtol=1e-4, atol=1e-6 * float(ga.abs().max()))
    # Eval mode (rounding) in channels_last, as the fast path trains.
    ref.eval()
    cl = copy.deepcopy(ref).to(memory_format=torch.channels_last)
    xc = x.contiguous(memory_format=torch.channels_last)
    a = rd_loss(ref, x, levels, lambdas)
    b = rd_terms(forward_mixed(cl, xc, levels, bf16=False), xc, levels, lambdas)
    assert b["loss"].item() == pytest.approx(a["loss"].item(), rel=1e-5)
    # The reference depends on the level: a fast path ignoring it would not match.
    other = rd_loss(ref, x, torch.zeros_like(levels), lambdas)
    assert abs(other["loss"].item() - a["loss"].item()) > 1e-3 * a["loss"].item()


def test_bf16_autocast_keeps_gdn_and_likelihoods_in_float32_and_the_loss_close(batch):
    """bf16 keeps 8 significant bits (relative rounding <= 2^-9, 0.2%); the loss is dominated
    by λ·MSE, a mean over all pixels in which those roundings mostly cancel (measured: <0.1%
    on this model), and bpp moves by the few rounded latents that cross a bin edge (<1%).
    Bounds of 2% (loss) and 5% (bpp) leave headroom yet catch a path that drops a stage or
    a level's gain, which moves them by tens of percent (see the float32 test)."""
    x, levels = batch
    lambdas = torch.tensor(TINY.lambdas)
    model = _model().eval().to(memory_format=torch.channels_last)
    xc = x.contiguous(memory_format=torch.channels_last)
    seen: dict[str, set] = {"gdn_in": set(), "gdn_out": set(), "conv_out": set()}
    hooks = []

    def gdn(mod, inp, out) -> None:
        seen["gdn_in"].add(inp[0].dtype)
        seen["gdn_out"].add(out.dtype)

    def conv(mod, inp, out) -> None:
        seen["conv_out"].add(out.dtype)

    for m in model.modules():
        if isinstance(m, GDN):
            hooks.append(m.register_forward_hook(gdn))
        elif isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            hooks.append(m.register_forward_hook(conv))
    with torch.no_grad():
        out = forward_mixed(model, xc, levels, bf16=True)
    for h in hooks:
        h.remove()
    assert seen == {"gdn_in": {torch.float32}, "gdn_out": {torch.float32}, "conv_out": {torch.bfloat16}}
    assert all(lik.dtype == torch.float32 for lik in out["likelihoods"].values())
    assert out["x_hat"].dtype == torch.float32
    with torch.no_grad():
        b = rd_terms(out, xc, levels, lambdas)
        a = rd_loss(model, xc, levels, lambdas)
    assert float(b["loss"]) == pytest.approx(float(a["loss"]), rel=0.02)
    assert float(b["bpp"]) == pytest.approx(float(a["bpp"]), rel=0.05)
    assert float(b["loss"]) != float(a["loss"])   # it really ran in bf16


# ------------------------------------------------------------------ device-side crops

def test_device_crops_are_flipped_subwindows_of_photos_of_any_size():
    gen = torch.Generator().manual_seed(0)
    photos = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen)
              for h, w in ((20, 31), (16, 16), (40, 18))]
    sampler = DeviceCrops(photos, 16, torch.device("cpu"), seed=3)
    crops, drawn = sampler.draw(300)
    assert crops.shape == (300, 3, 16, 16) and crops.dtype == torch.uint8
    assert crops.is_contiguous(memory_format=torch.channels_last)
    for i in range(300):
        k, t, l = int(drawn["index"][i]), int(drawn["top"][i]), int(drawn["left"][i])
        want = photos[k][:, t:t + 16, l:l + 16]
        if drawn["vflip"][i]:
            want = want.flip(1)
        if drawn["hflip"][i]:
            want = want.flip(2)
        assert torch.equal(crops[i], want), i
    assert set(drawn["index"].tolist()) == {0, 1, 2}
    assert set(drawn["vflip"].tolist()) == {True, False} and set(drawn["hflip"].tolist()) == {True, False}
    tops = drawn["top"][drawn["index"] == 0]
    assert int(tops.min()) == 0 and int(tops.max()) == 20 - 16   # every offset reachable, none past the edge
    lefts = drawn["left"][drawn["index"] == 2]
    assert int(lefts.max()) == 18 - 16
    levels = sampler.draw_levels(300, 4)
    assert set(levels.tolist()) == {0.0, 1.0, 2.0, 3.0}
    with pytest.raises(ValueError, match="at least 24px"):
        DeviceCrops(photos, 24, torch.device("cpu"))


def test_ema_is_the_exponential_average_of_the_weights():
    model = _model()
    ema = EMA(model, decay=0.9)
    first = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = dict(first)
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * (step + 1))
        ema.update()
        expected = {n: 0.9 * expected[n] + 0.1 * p.detach() for n, p in model.named_parameters()}
    for n, p in ema.model.named_parameters():
        assert torch.allclose(p, expected[n], atol=1e-6), n
        assert not p.requires_grad
    assert not torch.allclose(ema.model.log_gain, model.log_gain)   # an average, not a copy


# ------------------------------------------------------------------ schedule and continuation

def test_schedule_is_a_cosine_over_the_planned_total_with_warmup():
    plan = train_job.Plan(total_steps=1000, lr_peak=2e-4, lr_min=1e-5)
    assert plan.lr(0) == pytest.approx(2e-4)
    assert plan.lr(500) == pytest.approx((2e-4 + 1e-5) / 2)
    assert plan.lr(1000) == pytest.approx(1e-5) and plan.lr(5000) == pytest.approx(1e-5)
    assert plan.lr(0, batch=16) == pytest.approx(1e-4)   # sqrt(16 / 64)
    assert train_job.chunk_lr(plan, 300, 0, 4, 64) == pytest.approx(plan.lr(300) / 4)
    assert train_job.chunk_lr(plan, 303, 3, 4, 64) == pytest.approx(plan.lr(303))
    assert train_job.chunk_lr(plan, 304, 4, 4, 64) == pytest.approx(plan.lr(304))


def test_continuation_resumes_the_schedule_at_the_recorded_step(tmp_path, samples_dir):
    plan = train_job.Plan(total_steps=40, lr_peak=1e-3, lr_min=1e-5)
    first, second = tmp_path / "w1.safetensors", tmp_path / "w2.safetensors"
    assert train_job.main(COMMON + ["--data", str(_pack(tmp_path, samples_dir, "train")), "--out",
                                    str(tmp_path / "run1"), "--steps", "4", "--warmup-steps", "2",
                                    "--schedule-total", "40", "--lr", "1e-3", "--lr-min", "1e-5",
                                    "--export", str(first)]) == 0
    meta1 = read_weights(str(first))[3]
    assert (meta1["schedule_step"], meta1["trained_steps"], meta1["train_crops"]) == ("4", "4", "8")
    assert train_job.next_pack(meta1) == "train-b"
    # The second chunk names no schedule: it comes from the weights' metadata.
    out2 = tmp_path / "run2"
    assert train_job.main(COMMON + ["--data", str(_pack(tmp_path, samples_dir, "train-b")), "--out", str(out2),
                                    "--init", str(first), "--steps", "4", "--warmup-steps", "2",
                                    "--export", str(second)]) == 0
    rows = _log(out2)
    assert [int(r["global_step"]) for r in rows] == [5, 6, 7, 8]
    # Warm-up: the first two updates ramp to the schedule's value at their global step ...
    assert float(rows[0]["lr"]) == pytest.approx(plan.lr(4, batch=2) / 2)
    assert float(rows[1]["lr"]) == pytest.approx(plan.lr(5, batch=2))
    # ... and the first update after it (taking global step 6 to 7) is on the schedule.
    assert float(rows[2]["lr"]) == pytest.approx(plan.lr(6, batch=2))
    assert float(rows[3]["lr"]) == pytest.approx(plan.lr(7, batch=2))
    assert float(rows[3]["lr"]) < float(rows[2]["lr"])   # decaying
    meta2 = read_weights(str(second))[3]
    assert meta2["schedule_total_steps"] == "40" and float(meta2["schedule_lr_peak"]) == 1e-3
    assert (meta2["schedule_step"], meta2["trained_steps"], meta2["train_crops"]) == ("8", "8", "16")
    assert json.loads(meta2["train_packs"]) == ["train", "train-b"] and meta2["train_data"] == "train,train-b"
    assert json.loads(meta2["train_devices"]) == ["cpu"] and meta2["train_gpu_minutes"] == "0.00"
    chunks = json.loads(meta2["train_chunks"])
    assert [(c["schedule_from"], c["schedule_to"], c["packs"]) for c in chunks] == [
        (0, 4, ["train"]), (4, 8, ["train-b"])]
    assert float(meta2["train_hours"]) == pytest.approx(sum(c["minutes"] for c in chunks) / 60, abs=1e-3)
    assert train_job.next_pack(meta2) == "train"   # both seen: alternate


def test_continuation_from_weights_without_a_schedule_starts_at_their_steps(tmp_path, samples_dir):
    """The first shipped file only has trained_steps etc.: its chunks count as schedule steps."""
    legacy = tmp_path / "legacy.safetensors"
    legacy.write_bytes(export_weights(_model(), {"trained_steps": "19461", "train_hours": "0.170",
                                                 "train_device": "NVIDIA H200", "train_data": "train"}))
    assert train_job.next_pack(read_weights(str(legacy))[3]) == "train-b"
    out, w = tmp_path / "run", tmp_path / "w.safetensors"
    assert train_job.main(COMMON + ["--data", str(_pack(tmp_path, samples_dir, "train-b")), "--out", str(out),
                                    "--init", str(legacy), "--steps", "2", "--warmup-steps", "1",
                                    "--export", str(w)]) == 0
    rows = _log(out)
    assert float(rows[0]["lr"]) == pytest.approx(train_job.Plan().lr(19461, batch=2))
    assert float(rows[1]["lr"]) == pytest.approx(train_job.Plan().lr(19462, batch=2))
    meta = read_weights(str(w))[3]
    assert meta["schedule_step"] == "19463" and meta["trained_steps"] == "19463"
    assert meta["train_crops"] == str(19461 * train_job.LEGACY_BATCH + 4)
    assert float(meta["train_gpu_minutes"]) == pytest.approx(10.2)
    assert json.loads(meta["train_devices"]) == ["NVIDIA H200", "cpu"] and meta["train_device"] == "cpu"
    assert meta["train_data"] == "train,train-b" and meta["schedule_total_steps"] == "500000"


@pytest.mark.parametrize("path", ["fast", "reference"])
def test_a_killed_chunk_resumes_exactly(tmp_path, samples_dir, path):
    data = _pack(tmp_path, samples_dir, "train")
    args = COMMON + ["--data", str(data), "--path", path, "--warmup-steps", "2", "--ckpt-every", "2"]
    assert train_job.main(args + ["--out", str(tmp_path / "straight"), "--steps", "4"]) == 0
    assert train_job.main(args + ["--out", str(tmp_path / "killed"), "--steps", "2"]) == 0
    assert train_job.main(args + ["--out", str(tmp_path / "killed"), "--steps", "4"]) == 0   # resumes at 2
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 4
    for part in ("model", "ema"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), (part, k)
    assert not torch.equal(a["ema"]["log_gain"], a["model"]["log_gain"])   # the EMA lags the weights


def test_extend_levels_adds_low_levels_on_the_extrapolated_line(tmp_path, samples_dir):
    model = _model()
    ratio = (TINY.lambdas[-1] / TINY.lambdas[0]) ** 0.5
    bigger = train_job.extend_levels(model, TINY.lambdas[0] / ratio ** 2, None)
    assert bigger.config.levels == 5 and bigger.config.lambdas[2:] == TINY.lambdas
    assert bigger.config.lambdas[0] == pytest.approx(TINY.lambdas[0] / ratio ** 2, rel=1e-4)
    for v_new, v_old in ((2.0, 0.0), (3.5, 1.5), (1.0, -1.0), (4.0, 2.0)):
        for name, g in bigger.gains(torch.tensor([v_new])).items():
            assert torch.allclose(g, model.gains(torch.tensor([v_old]))[name], rtol=1e-5), (name, v_new)
    assert torch.equal(bigger.g_a[0].weight, model.g_a[0].weight)
    assert train_job.extend_levels(model, TINY.lambdas[0], None) is model
    # Through the command line: a chunk from 3-level weights with a lower --lambda-min has 4.
    w = tmp_path / "w.safetensors"
    w.write_bytes(export_weights(_model()))
    out = tmp_path / "more.safetensors"
    assert train_job.main(COMMON + ["--data", str(_pack(tmp_path, samples_dir, "train")), "--out",
                                    str(tmp_path / "run"), "--init", str(w), "--steps", "1",
                                    "--lambda-min", str(TINY.lambdas[0] / ratio), "--export", str(out)]) == 0
    config = read_weights(str(out))[1]
    assert len(config["lambdas"]) == 4 and config["lambdas"][1:] == list(TINY.lambdas)


# ------------------------------------------------------------------ probe and time budget

def test_throughput_probe_prints_and_writes_both_paths(tmp_path, capsys):
    assert train_job.main(COMMON + ["--throughput-probe", "--probe-seconds", "0.2", "--probe-steps", "2",
                                    "--probe-warmup", "1", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "throughput.json").read_text())
    rows = {r["variant"]: r for r in report["results"]}
    assert set(rows) == {"reference", "fast"}
    for name, row in rows.items():
        assert row["crops_per_s"] > 0 and row["steps"] == 2 and math.isfinite(row["loss"])
        assert any(line.startswith(name) and f"{row['crops_per_s']:.1f}" in line for line in printed.splitlines())
    assert rows["fast"]["path"] == "fast" and not rows["fast"]["bf16"]   # bf16 is CUDA-only unless asked
    assert f"fast/reference: {report['ratio_fast']:.2f}x" in printed
    assert report["device"] == "cpu" and report["batch"] == 2 and report["crop"] == 64


def test_max_minutes_stops_on_time_and_still_exports(tmp_path, samples_dir, monkeypatch):
    # The trainer's clock advances 0.1 s per reading, so the budget (1.8 s) is counted in
    # clock readings, not in how many steps this machine fits into 1.8 real seconds.
    import types

    fake = {"now": 1000.0}

    def perf_counter() -> float:
        fake["now"] += 0.1
        return fake["now"]

    clock = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    clock.perf_counter = perf_counter
    monkeypatch.setattr(train_job, "time", clock)
    out, w = tmp_path / "run", tmp_path / "w.safetensors"
    assert train_job.main(COMMON + ["--data", str(_pack(tmp_path, samples_dir, "train")), "--out", str(out),
                                    "--steps", "1000000", "--max-minutes", "0.03", "--log-every", "1000",
                                    "--export", str(w)]) == 0
    meta = read_weights(str(w))[3]
    steps = int(meta["trained_steps"])
    assert 0 < steps < 1_000_000
    assert steps <= 18, "stopped on time: every step reads the clock, 18 readings fill the 1.8 s budget"
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == steps
    chunk = json.loads(meta["train_chunks"])[-1]
    assert chunk["minutes"] == pytest.approx(0.03, abs=0.03) and chunk["crops"] == 2 * steps
