"""A live progress bar (items, images/s, MB/s) on a terminal; silent in CI and in logs."""

from __future__ import annotations

import os
import sys
import time

from tqdm import tqdm


def wanted(flag: bool | None) -> bool:
    if flag is not None:
        return flag
    return not os.environ.get("CI") and sys.stderr.isatty()


class Progress:
    def __init__(self, enabled: bool | None, desc: str):
        self.enabled = wanted(enabled)
        self.start = time.monotonic()
        self.bytes = 0
        self.bar = tqdm(desc=desc, unit="img", disable=not self.enabled, dynamic_ncols=True, smoothing=0.1)

    def advance(self, items: int, input_bytes: int) -> None:
        self.bytes += input_bytes
        if self.enabled:
            elapsed = max(time.monotonic() - self.start, 1e-9)
            self.bar.set_postfix_str(f"{self.bytes / 1e6 / elapsed:.1f} MB/s", refresh=False)
            self.bar.update(items)

    def close(self) -> None:
        self.bar.close()
