"""The README's quality-map figures: Kodak inside/outside PSNR and an example picture.

Reads two finished jobs over ../shared/data/kodak at the same target, one with
``--qmap center`` and one with ``--qmap uniform`` (codec gain-hyperprior-roi), measures the
PSNR inside and outside the center map's region for both (the uniform job's files decoded
again with the center mask), prints the table and writes ``docs/roi-kodak.png``. Then codes
the astronaut sample photo (public domain, shipped in jobs/samples) at the same target with
both maps and writes ``docs/roi-example.jpg``.

    ratefit compress ../shared/data/kodak /tmp/rk_center --codec gain-hyperprior-roi --qmap center --target-bpp 0.3
    ratefit compress ../shared/data/kodak /tmp/rk_uniform --codec gain-hyperprior-roi --qmap uniform --target-bpp 0.3
    .venv/bin/python tests/measure_roi.py /tmp/rk_center /tmp/rk_uniform
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
from PIL import Image

import ratefit.jobs
from ratefit.codecs import container
from ratefit.codecs import qmap as qmaps
from ratefit.codecs.rate import Target, search
from ratefit.codecs.registry import get_codec

DOCS = Path(__file__).resolve().parents[1] / "docs"


def region_table(center_out: str, uniform_out: str, codec) -> list[tuple]:
    """Per image: name, bytes and inside/outside PSNR of both jobs (center mask)."""
    def rows(out: str) -> dict[str, dict]:
        return {Path(r["input_uri"]).name: r for r in ds.dataset(f"{out}/_manifest").to_table().to_pylist()}

    c, u = rows(center_out), rows(uniform_out)
    table = []
    for name in sorted(c):
        img = np.asarray(Image.open(c[name]["input_uri"]).convert("RGB"))
        h, w = img.shape[:2]
        mask = qmaps.roi_mask(qmaps.center_map(h, w))
        out = []
        for r in (u[name], c[name]):
            header, payload = container.unpack(Path(r["output_uri"]).read_bytes())
            restored = codec.decode(payload, w, h, header.value)
            out.append((r["output_bytes"],) + qmaps.region_psnr(img, restored, mask))
        table.append((name,) + out[0] + out[1])
    return table


def kodak_figure(table: list[tuple], target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = np.array([t[1:] for t in table], float)
    gain_in, loss_out = a[:, 4] - a[:, 1], a[:, 5] - a[:, 2]
    x = np.arange(len(table))
    fig, ax = plt.subplots(figsize=(10, 3.4))
    ax.bar(x - 0.2, gain_in, 0.4, color="#228833", label=f"inside the region (mean {gain_in.mean():+.2f} dB)")
    ax.bar(x + 0.2, loss_out, 0.4, color="#ee6677", label=f"outside (mean {loss_out.mean():+.2f} dB)")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(x, [t[0].removeprefix("kodim").removesuffix(".png") for t in table], fontsize=8)
    ax.set(xlabel="Kodak image", ylabel="PSNR, center map minus uniform (dB)",
           title=f"gain-hyperprior-roi on Kodak at {target:g} bpp: same file size, quality moved to the centre")
    ax.legend(loc="lower right", fontsize=8)
    fig.savefig(DOCS / "roi-kodak.png", dpi=90, bbox_inches="tight")
    plt.close(fig)


def example_picture(codec, target: float) -> None:
    img = np.asarray(Image.open(Path(ratefit.jobs.__file__).parent / "samples" / "astronaut.png").convert("RGB"))
    h, w = img.shape[:2]
    q = qmaps.center_map(h, w)
    panels, captions = [], []
    for name in ("uniform", "center"):
        prepared = codec.prepare(img, qmaps.generate(name, img))
        outcome = search(codec, prepared, img, Target("bpp", target), overhead=80)
        restored = codec.decode(outcome.payload, w, h, outcome.value)
        inside, outside = qmaps.region_psnr(img, restored, qmaps.roi_mask(q))
        panels.append(restored)
        captions.append(f"{name}: {len(outcome.payload) + 80} B, {inside:.2f} dB in / {outside:.2f} dB out")
    grid = qmaps.to_grid(q, 64)
    cells = np.kron(grid / 15.0, np.ones((32, 32)))[:h, :w]
    panels.append(np.repeat((cells * 255).astype(np.uint8)[:, :, None], 3, axis=2))
    sheet = Image.fromarray(np.concatenate([np.pad(p, ((0, 0), (0, 8), (0, 0)), constant_values=255)
                                            for p in panels], axis=1))
    sheet.save(DOCS / "roi-example.jpg", quality=88)
    print("roi-example.jpg: " + " | ".join(captions) + " | the center map as coded")


def main() -> None:
    center_out, uniform_out = sys.argv[1], sys.argv[2]
    codec = get_codec("gain-hyperprior-roi", device="cpu")
    table = region_table(center_out, uniform_out, codec)
    print("image        uniform: bytes  in     out  | center: bytes  in     out  | inside gain")
    for t in table:
        print(f"{t[0]:12} {t[1]:14d} {t[2]:6.2f} {t[3]:6.2f} | {t[4]:13d} {t[5]:6.2f} {t[6]:6.2f} | {t[5] - t[2]:+.2f}")
    a = np.array([t[1:] for t in table], float)
    print(f"mean inside: uniform {a[:, 1].mean():.2f}, center {a[:, 4].mean():.2f} dB ({(a[:, 4] - a[:, 1]).mean():+.2f}); "
          f"outside {a[:, 2].mean():.2f} -> {a[:, 5].mean():.2f} dB; bytes center/uniform {a[:, 3].sum() / a[:, 0].sum():.4f}")
    target = float(ds.dataset(f"{center_out}/_manifest").to_table(columns=["target_value"])["target_value"][0].as_py())
    kodak_figure(table, target)
    example_picture(codec, target)


if __name__ == "__main__":
    main()
