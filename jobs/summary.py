"""What a finished job prints: its ``_SUCCESS`` summary in a few lines (the CLI and the demo)."""

from __future__ import annotations

from typing import Any


def print_summary(summary: dict[str, Any], output: str) -> None:
    s = summary
    parts = [f"{s['items']} items: " + ", ".join(f"{n} {k}" for k, n in sorted(s["statuses"].items()))]
    if s.get("mean_bpp") is not None:
        parts.append(f"mean {s['mean_bpp']:.3f} bpp, {s['mean_psnr']:.2f} dB PSNR" if s.get("mean_psnr") is not None
                     else f"mean {s['mean_bpp']:.3f} bpp")
    if s["input_bytes"]:
        parts.append(f"{s['input_bytes'] / 1e6:.2f} MB in, {s['output_bytes'] / 1e6:.2f} MB out")
    parts.append(f"{s['wall_s']:.1f} s")
    if s.get("budget"):
        b = s["budget"]
        print(f"budget {b['budget_bytes']:.0f} bytes ({b['budget_bpp']:.4f} bpp): used {b['achieved_bytes']:.0f} "
              f"({b['achieved_fraction']:.2%}); predicted mean PSNR {b['predicted_mean_psnr']:.2f} dB "
              f"(uniform rate: {b['uniform_predicted_mean_psnr']:.2f} dB); {b['corrected_items']} item(s) corrected")
    if s.get("skipped_items"):
        parts.append(f"{s['skipped_items']} kept as they are (results {s['skipped_candidate_bytes'] / 1e6:.2f} MB, "
                     "not smaller)")
    if "verify_failures" in s:
        parts.append(f"{s['verified_items']} verified, {s['verify_failures']} verify failure(s)")
    if s["resumed_shards"]:
        parts.append(f"{s['resumed_shards']} shard(s) resumed from an earlier run")
    print("; ".join(parts))
    if "run_id" in s:
        st = s["state"]
        print(f"run {s['run_id']}: {s['new_items']} new, {s['changed_items']} changed, {s['retried_items']} retried, "
              f"{s['unchanged_items']} unchanged (left out)"
              + (f", {s['kept_items']} kept (original retired)" if s.get("kept_items") else "")
              + f"; {s['saved_bytes'] / 1e6:.2f} MB saved"
              + (f", {s['retired_items']} original(s) retired" if s.get("retired_items") else "")
              + f"; now {st['inputs']} inputs ({', '.join(f'{n} {k}' for k, n in sorted(st['statuses'].items()))})")
    print(f"manifest: {output.rstrip('/')}/_manifest/   summary: {output.rstrip('/')}/_SUCCESS")
