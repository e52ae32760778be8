"""``ratefit runs OUTPUT`` and ``ratefit manifest OUTPUT``: what the runs did, and what stands now."""

from __future__ import annotations

import argparse
import io
import json
from typing import Any

from ratefit.jobs.incremental import list_runs
from ratefit.workers.manifest import current_state
from ratefit.workers.storage import atomic_write, open_fs, redact

SHOWN = ("input_uri", "status", "bpp", "psnr", "output_bytes", "run_id", "retired")


def add_runs_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", help="the OUTPUT folder of a compress job (local or s3://…)")
    p.add_argument("--json", action="store_true", help="print the run records as JSON lines")
    p.add_argument("--storage-options", type=json.loads, help="fsspec storage options as JSON")


def add_manifest_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", help="the OUTPUT folder of a compress job (local or s3://…)")
    p.add_argument("--out", help="write every column of the current state to this file or URL "
                                 "(.parquet, .csv or .jsonl) instead of printing")
    p.add_argument("--limit", type=int, default=50, help="rows to print (default 50; 0 = all)")
    p.add_argument("--storage-options", type=json.loads, help="fsspec storage options as JSON")


def _mb(n: Any) -> str:
    return f"{n / 1e6:.2f}" if isinstance(n, (int, float)) else "-"


def runs(args: argparse.Namespace) -> int:
    records = list_runs(args.output, args.storage_options)
    if args.json:
        for r in records:
            print(json.dumps(r))
        return 0
    if not records:
        print(f"{redact(args.output)}: no runs")
        return 0
    print(f"{'run':26} {'status':10} {'planned':>7} {'new':>5} {'changed':>7} {'unchanged':>9} {'ok':>5} "
          f"{'error':>5} {'saved MB':>9} {'retired':>7} {'wall s':>7}")
    for r in records:
        if r.get("status") == "unfinished":
            print(f"{r['run_id']:26} unfinished (killed, or still running): its committed parts count as rows")
            continue
        st = r.get("statuses", {})
        print(f"{r['run_id']:26} {'finished':10} {r['items']:>7} {r.get('new_items', 0):>5} "
              f"{r.get('changed_items', 0) + r.get('retried_items', 0):>7} {r.get('unchanged_items', 0):>9} "
              f"{st.get('ok', 0):>5} {st.get('error', 0):>5} {_mb(r.get('saved_bytes')):>9} "
              f"{r.get('retired_items', 0):>7} {r.get('wall_s', 0):>7.1f}")
    last = next((r for r in reversed(records) if r.get("state")), None)
    if last:
        s = last["state"]
        print(f"state after {last['run_id']}: {s['inputs']} inputs ({', '.join(f'{n} {k}' for k, n in sorted(s['statuses'].items()))}), "
              f"{_mb(s['input_bytes'])} MB in, {_mb(s['output_bytes'])} MB out, {s['retired']} original(s) retired")
    return 0


def manifest(args: argparse.Namespace) -> int:
    fs, root = open_fs(args.output, args.storage_options)
    table = current_state(fs, root)
    if args.out:
        buf = io.BytesIO()
        lower = args.out.lower()
        if lower.endswith(".parquet"):
            import pyarrow.parquet as pq
            pq.write_table(table, buf, compression="zstd")
        elif lower.endswith(".csv"):
            import pyarrow.csv as pacsv
            pacsv.write_csv(table, buf)
        elif lower.endswith(".jsonl"):
            for row in table.to_pylist():
                buf.write((json.dumps(row) + "\n").encode())
        else:
            raise SystemExit(f"--out {args.out}: give a .parquet, .csv or .jsonl file")
        out_fs, out_path = open_fs(args.out, args.storage_options)
        atomic_write(out_fs, out_path, buf.getvalue())
        print(f"wrote {len(table)} rows (one per input) to {redact(args.out)}")
        return 0
    rows = table.select(list(SHOWN)).to_pylist()
    shown = rows if args.limit == 0 else rows[:args.limit]
    for r in shown:
        print("  ".join("-" if r[c] is None else f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c])
                        for c in SHOWN))
    more = f" (first {len(shown)} shown; --limit 0 for all, --out FILE to export)" if len(shown) < len(rows) else ""
    print(f"{len(rows)} inputs, one row each (the latest attempt){more}")
    return 0
