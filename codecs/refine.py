"""Encoder-side latent refinement: better latents for the same decoder.

After Yang, Bamler & Mandt (NeurIPS 2020, "Improving Inference for Neural Image
Compression"): the analysis transform ``g_a`` is an amortised guess at the latents that
minimise rate + λ·distortion for *this* image; a few gradient steps on the latents
themselves, with the decoder (``h_s``, ``g_s``, the entropy models) fixed, close part of the
gap. Rounding has no gradient, so the steps see stochastic Gumbel annealing (SGA): each
latent is rounded down or up with a relaxed (Gumbel-softmax) choice whose temperature
anneals towards hard rounding, which, unlike straight-through rounding, lets a latent
be pushed across a bin edge when that pays.

y and z are optimised as free variables. What comes out is the latent ``y`` (before its
gain) and the refined z as an offset ``dz`` on h_a of the refined y: the encoder codes
z = h_a(y·gain(v)) + dz (before z's gain), which is the refined z at the value refined for
and follows y when the rate search then moves v. (The refined z itself, kept as it is,
describes y's scales at that one value: a level lower it prices the smaller y with the old,
too wide scales, and rate stops growing with v.) The unchanged coding path
quantises and entropy codes both; the bitstream format and the decoder do not change.

Memory: the optimisation runs over windows of the latent (``tile`` pixels plus a halo the
transforms need), so a large image costs one window's activations, not the whole image's.
Each window optimises its inner part against the inner part's rate and distortion, with
its halo taken from the current latents.
"""

from __future__ import annotations

import torch

from ratefit.codecs.gained import LATENT_STRIDE, GainedHyperprior

Z_STRIDE = 4 * LATENT_STRIDE   # pixels per hyper-latent position
Z_HALO = 2                     # hyper-latent positions of context (h_s sees < 2, g_s < 2 latents)
LEARNING_RATE = 0.01           # Adam step, in quantisation bins (latents are optimised after their gains)
TAU_START, TAU_END = 0.5, 0.1  # SGA temperature, annealed geometrically over the steps
_EPS = 1e-5
CHECKS = 4                     # times per window the hard-rounded objective is measured (best kept)


def lambda_at(model: GainedHyperprior, v: float) -> float:
    """The training λ at real level ``v``, interpolated as the gains are (log-linear, ends extended)."""
    logs = torch.tensor(model.config.lambdas, dtype=torch.float64).log()[:, None]
    return float(model._interpolate(logs, torch.tensor([float(v)], dtype=torch.float64)))


def sga_round(u: torch.Tensor, tau: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Stochastic Gumbel annealing: a relaxed random choice between floor(u) and ceil(u).

    The logits favour the nearer integer more strongly as ``tau`` falls (Yang et al., eq. 8);
    at ``tau`` → 0 this is rounding to nearest. The Gumbel noise comes from ``generator``,
    so a seeded call repeats exactly without touching torch's global random state.
    """
    if tau <= 0:   # straight-through: hard rounding forward, identity backward
        return u + (torch.round(u) - u).detach()
    down = u.detach().floor()
    frac = (u - down).clamp(_EPS, 1 - _EPS)
    logits = torch.stack([-torch.atanh(frac) / tau, -torch.atanh(1 - frac) / tau], dim=-1)
    uniform = torch.rand(logits.shape, generator=generator, device=u.device, dtype=u.dtype).clamp_(_EPS, 1 - _EPS)
    weights = torch.softmax((logits - torch.log(-torch.log(uniform))) / tau, dim=-1)
    return down + weights[..., 1]


def _windows(rows: int, cols: int, tile: int) -> list[tuple[slice, slice, slice, slice]]:
    """(window rows, window cols, inner rows, inner cols) over the z grid; inner relative to the window."""
    if tile <= 0 or (rows <= tile and cols <= tile):
        return [(slice(0, rows), slice(0, cols), slice(0, rows), slice(0, cols))]
    out = []
    for r0 in range(0, rows, tile):
        for c0 in range(0, cols, tile):
            r1, c1 = min(r0 + tile, rows), min(c0 + tile, cols)
            a, b = max(r0 - Z_HALO, 0), max(c0 - Z_HALO, 0)
            out.append((slice(a, min(r1 + Z_HALO, rows)), slice(b, min(c1 + Z_HALO, cols)),
                        slice(r0 - a, r1 - a), slice(c0 - b, c1 - b)))
    return out


def _scaled(s: slice, k: int) -> slice:
    return slice(s.start * k, s.stop * k)


def refine_latents(model: GainedHyperprior, x: torch.Tensor, y: torch.Tensor, v: float, steps: int,
                   height: int, width: int, tile: int = 1024, lr: float | None = None,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``steps`` of SGA on the latents of ``x`` (1x3xHxW in [0, 1], padded) at level ``v``.

    ``y`` is the analysis output for ``x``; ``height`` x ``width`` the image inside the
    padding (only it counts as distortion). Returns (y, dz): the refined latent before its
    gain and the hyper-latent's offset (before its gain), on ``y``'s device, for
    ``estimate_bits`` / ``compress_latent`` / ``reconstruct``. ``seed`` fixes the Gumbel
    noise, so the same call gives the same latents.
    """
    device = y.device
    lr = lr or LEARNING_RATE
    vv = torch.tensor([float(v)], device=device)
    with torch.no_grad():
        g = {k: t.float() for k, t in model.gains(vv).items()}
        y_g = y.float() * g["gain"]   # a new tensor: the caller's y is never written
        z_g = model.h_a(y_g) * g["hgain"]
    if steps <= 0:
        return y, torch.zeros_like(z_g).to(y.dtype)
    lam = lambda_at(model, v) * 255.0 ** 2
    pixels = float(height * width)
    medians = model.entropy_bottleneck._get_medians().detach().reshape(1, -1, 1, 1)
    generator = torch.Generator(device=device).manual_seed(seed)
    tile_z = max(tile // Z_STRIDE, 1) if tile > 0 else 0
    with torch.enable_grad():
        for wr, wc, ir, ic in _windows(z_g.shape[-2], z_g.shape[-1], tile_z):
            yr, yc = _scaled(wr, 4), _scaled(wc, 4)
            pr, pc = _scaled(wr, Z_STRIDE), _scaled(wc, Z_STRIDE)
            target = x[..., pr, pc].float()
            # Pixels inside the image and inside this window's inner part count as distortion.
            mask = torch.zeros(target.shape[-2:], device=device)
            r0, c0 = pr.start, pc.start
            inner_pr, inner_pc = _scaled(ir, Z_STRIDE), _scaled(ic, Z_STRIDE)
            mask[inner_pr.start:max(min(inner_pr.stop, height - r0), 0),
                 inner_pc.start:max(min(inner_pc.stop, width - c0), 0)] = 1.0
            yw = y_g[..., yr, yc].clone().requires_grad_(True)
            zw = z_g[..., wr, wc].clone().requires_grad_(True)
            opt = torch.optim.Adam([yw, zw], lr=lr)
            iyr, iyc = _scaled(ir, 4), _scaled(ic, 4)

            def objective(tau: float) -> torch.Tensor:
                return _objective(model, target, mask, yw, zw, g, medians, tau, lam, pixels, (iyr, iyc), (ir, ic),
                                  generator)

            # The annealed objective is only a proxy for the coded one: measure the hard-rounded
            # objective a few times and keep the best latents, the analysis' own included, so
            # refinement never leaves a window worse than it found it.
            with torch.no_grad():
                best, best_y, best_z = float(objective(0.0)), yw.detach().clone(), zw.detach().clone()
            check_every = max(steps // CHECKS, 1)
            for step in range(steps):
                tau = TAU_START * (TAU_END / TAU_START) ** (step / max(steps - 1, 1)) if TAU_START > 0 else 0.0
                loss = objective(tau)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if (step + 1) % check_every == 0 or step + 1 == steps:
                    with torch.no_grad():
                        hard = float(objective(0.0))
                    if hard < best:
                        best, best_y, best_z = hard, yw.detach().clone(), zw.detach().clone()
            with torch.no_grad():
                y_g[..., yr, yc][..., iyr, iyc] = best_y[..., iyr, iyc]
                z_g[..., wr, wc][..., ir, ic] = best_z[..., ir, ic]
    with torch.no_grad():   # z as an offset on h_a of the refined y, so it follows y to other levels
        dz = z_g / g["hgain"] - model.h_a(y_g)
    return (y_g / g["gain"]).to(y.dtype), dz.to(y.dtype)


def _objective(model: GainedHyperprior, target: torch.Tensor, mask: torch.Tensor, yw: torch.Tensor,
               zw: torch.Tensor, g: dict[str, torch.Tensor], medians: torch.Tensor, tau: float, lam: float,
               pixels: float, inner_y: tuple[slice, slice], inner_z: tuple[slice, slice],
               generator: torch.Generator) -> torch.Tensor:
    """This window's share of bpp + λ·255²·MSE with SGA-rounded latents (the training loss).

    ``yw`` and ``zw`` are the window's y and z after their gains, both free variables.
    """
    z_t = sga_round(zw - medians, tau, generator) + medians
    params = model.h_s(z_t * g["inv_hgain"])
    scales, means = params.chunk(2, 1)
    y_t = sga_round(yw - means, tau, generator) + means
    gc, eb = model.gaussian_conditional, model.entropy_bottleneck
    # The private ``_likelihood``s: the public ``forward`` quantises its input again (noise
    # or hard rounding), which would undo the SGA-rounded latents and their gradients.
    y_lik = gc.likelihood_lower_bound(gc._likelihood(y_t, scales, means))
    c = z_t.shape[1]
    z_lik, _, _ = eb._likelihood(z_t.permute(1, 0, 2, 3).reshape(c, 1, -1))
    z_lik = eb.likelihood_lower_bound(z_lik).reshape(c, *z_t.shape[-2:])
    bits = -torch.log2(y_lik[..., inner_y[0], inner_y[1]]).sum() - torch.log2(z_lik[:, inner_z[0], inner_z[1]]).sum()
    x_hat = model.g_s(y_t * g["inv_gain"])
    sse = ((x_hat - target).pow(2) * mask).sum()
    return bits / pixels + lam * sse / (3.0 * pixels)
