"""``ratefit report OUTPUT``: one self-contained HTML page about a finished compress job.

Plots (PNG, embedded as data URIs so the page travels as one file): bpp and PSNR
histograms, achieved against target per image, and for a budget job each image's allocation
against the uniform rate the same budget would give. Reads the manifest and ``_SUCCESS``
through fsspec, so OUTPUT may be a local folder or ``s3://…``.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
from typing import Any

import numpy as np

from ratefit.jobs.budget import ALLOCATION
from ratefit.jobs.runner import SUCCESS, JobError
from ratefit.workers.manifest import current_state, parquet_table
from ratefit.workers.storage import atomic_write, open_fs, redact

REPORT = "report.html"


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _figures(rows: dict[str, list], allocation: dict[str, list] | None) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [i for i, s in enumerate(rows["status"]) if s in ("ok", "unreachable")]
    bpp = np.array([rows["bpp"][i] for i in ok], float)
    psnr = np.array([rows["psnr"][i] for i in ok], float)
    psnr = psnr[np.isfinite(psnr)]
    out = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    axes[0].hist(bpp, bins=min(40, max(5, len(bpp) // 2)), color="#4477aa")
    axes[0].set(xlabel="bits per pixel (stored file)", ylabel="images", title="Rate")
    axes[1].hist(psnr, bins=min(40, max(5, len(psnr) // 2)), color="#228833")
    axes[1].set(xlabel="PSNR (dB, RGB)", ylabel="images", title="Quality")
    out.append(("Rate and quality over the images", _png(fig)))
    plt.close(fig)

    kinds = [rows["target_kind"][i] for i in ok]
    if ok and all(k in ("bpp", "bytes") for k in kinds):
        pixels = np.array([rows["width"][i] * rows["height"][i] for i in ok], float)
        target = np.array([rows["target_value"][i] for i in ok], float)
        target_bpp = np.where(np.array(kinds) == "bytes", target * 8 / pixels, target)
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.scatter(target_bpp, bpp, s=12, color="#4477aa")
        lim = [0, max(target_bpp.max(), bpp.max()) * 1.05]
        ax.plot(lim, lim, color="grey", lw=0.8, label="achieved = target")
        ax.set(xlabel="target (bpp)", ylabel="achieved (bpp)", title="Achieved against target", xlim=lim, ylim=lim)
        ax.legend(loc="upper left")
        out.append(("Achieved against target, per image (a target is a ceiling)", _png(fig)))
        plt.close(fig)

    if allocation:
        good = np.array(allocation["ok"], bool)
        px = np.array(allocation["pixels"], float)[good]
        alloc = np.array(allocation["alloc_bytes"], float)[good] * 8 / px
        uni = np.array(allocation["uniform_bytes"], float)[good] * 8 / px
        pp = np.array(allocation["predicted_psnr"], float)[good]
        up = np.array(allocation["uniform_psnr"], float)[good]
        order = np.argsort(alloc - uni)
        x = np.arange(len(order))
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        axes[0].bar(x, alloc[order], color="#4477aa", label="budget plan")
        axes[0].plot(x, uni[order], color="#ee6677", lw=1.5, label="uniform rate")
        axes[0].set(xlabel="images (sorted by extra rate)", ylabel="bpp", title="Allocation")
        axes[0].legend()
        axes[1].bar(x, (pp - up)[order], color="#228833")
        axes[1].axhline(0, color="grey", lw=0.8)
        axes[1].set(xlabel="images (same order)", ylabel="dB", title="Predicted PSNR, plan minus uniform")
        out.append(("Budget: each image's allocation against the uniform rate", _png(fig)))
        plt.close(fig)
    return out


def _qmap_example(fs, rows: dict[str, list], summary: dict[str, Any],
                  storage_options: dict[str, Any] | None) -> tuple[str, str] | None:
    """The first ok item coded with a quality map: its decoded picture beside the map it carries.

    The map comes out of the bitstream (what the decoder used), so the page needs no access
    to the inputs. Returns (title, image) or None when the job used no map.
    """
    picks = [i for i, s in enumerate(rows["status"]) if s == "ok" and rows.get("qmap", [None] * (i + 1))[i]]
    if not picks:
        return None
    i = min(picks, key=lambda k: rows["input_uri"][k])
    import matplotlib.pyplot as plt

    from ratefit.jobs.spec import weights_options
    from ratefit.workers.codec_loader import load_codec
    from ratefit.workers.decompress import check_container, decode_payload, read_stored
    from ratefit.workers.items import StoredOutput

    row = {k: v[i] for k, v in rows.items()}
    blob = read_stored(fs, fs._strip_protocol(row["output_uri"]), StoredOutput.of_row(row))
    header, payload = check_container(blob, max_pixels=1 << 62)
    codec = load_codec(header.codec, **weights_options({}, summary["spec"].get("weights"), storage_options or {}))
    pixels = decode_payload(codec, header, payload)
    grid, span, _ = codec.coded_map(payload, header.width, header.height)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].imshow(pixels)
    inside, outside = (rows[k][i] for k in ("psnr_roi", "psnr_outside"))
    axes[0].set_title(f"decoded, {rows['bpp'][i]:.3f} bpp: {inside:.2f} dB inside the map's region"
                      + (f", {outside:.2f} dB outside" if outside is not None else ""), fontsize=9)
    cells = np.kron(grid / 15.0, np.ones((32, 32)))[:header.height, :header.width]
    axes[1].imshow(cells, cmap="gray", vmin=0, vmax=1)
    axes[1].set_title(f"quality map as coded ({rows['qmap'][i]}; white = best, span {span:g} levels)", fontsize=9)
    for ax in axes:
        ax.axis("off")
    src = _png(fig)
    plt.close(fig)
    return f"Example with its quality map: {redact(str(rows['input_uri'][i]))}", src


def build_report(output: str, storage_options: dict[str, Any] | None = None) -> str:
    """The report's HTML for the job in ``output``."""
    fs, root = open_fs(output, storage_options)
    if not fs.exists(f"{root}/{SUCCESS}"):
        raise JobError(f"{redact(output)} has no {SUCCESS}: the job has not finished (re-run it to complete)")
    summary = json.loads(fs.cat_file(f"{root}/{SUCCESS}"))
    if summary.get("kind") != "compress":
        raise JobError(f"{redact(output)} holds a {summary.get('kind')} job; reports cover compress jobs")
    rows = current_state(fs, root).to_pydict()   # one row per input, across runs
    allocation = None
    if summary.get("budget") and fs.exists(f"{root}/{ALLOCATION}"):
        allocation = parquet_table(fs.cat_file(f"{root}/{ALLOCATION}")).to_pydict()
    figures = _figures(rows, allocation)
    try:
        example = _qmap_example(fs, rows, summary, storage_options)
    except Exception as e:   # a page without the example beats no page
        example = None
        figures.append((f"Example with its quality map: unavailable ({type(e).__name__}: {e})", ""))
    if example:
        figures.append(example)
    facts = [("items", summary["items"]), ("statuses", summary["statuses"]),
             ("mean bpp", summary.get("mean_bpp")), ("mean PSNR (dB)", summary.get("mean_psnr")),
             ("input bytes", summary["input_bytes"]), ("output bytes", summary["output_bytes"]),
             ("codec", summary["spec"]["codec"]), ("wall time (s)", summary["wall_s"])]
    for key, value in (summary.get("budget") or {}).items():
        facts.append((f"budget: {key}", value))
    rows_html = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in facts)
    figs_html = "".join(f"<h2>{html.escape(title)}</h2>" + (f"<img src='{src}' alt='{html.escape(title)}'>" if src else "")
                        for title, src in figures)
    errors = [(rows["input_uri"][i], rows["error"][i]) for i, s in enumerate(rows["status"]) if s == "error"]
    err_html = ""
    if errors:
        err_html = "<h2>Errors</h2><table>" + "".join(
            f"<tr><td>{html.escape(str(u))}</td><td>{html.escape(str(e))}</td></tr>" for u, e in errors[:200]) + "</table>"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>ratefit report: {html.escape(redact(output))}</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}th{text-align:left;padding-right:1em}"
            "img{max-width:100%}td{padding-right:1em}</style></head><body>"
            f"<h1>ratefit report</h1><p>{html.escape(redact(output))}</p><table>{rows_html}</table>"
            f"{figs_html}{err_html}</body></html>")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return json.dumps(v) if isinstance(v, (dict, list)) else str(v)


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", help="the OUTPUT folder of a finished compress job (local or s3://…)")
    p.add_argument("--out", help=f"write the page here instead of OUTPUT/{REPORT}")
    p.add_argument("--storage-options", type=json.loads, help="fsspec storage options as JSON")


def run(args: argparse.Namespace) -> int:
    page = build_report(args.output, args.storage_options).encode()
    if args.out:
        with open(args.out, "wb") as f:
            f.write(page)
        where = args.out
    else:
        fs, root = open_fs(args.output, args.storage_options)
        atomic_write(fs, f"{root}/{REPORT}", page)
        where = f"{args.output.rstrip('/')}/{REPORT}"
    print(f"wrote {redact(where)} ({len(page) / 1e3:.0f} kB)")
    return 0
