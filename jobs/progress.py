"""Progress of a pass: a live tqdm bar on a terminal, plain lines in logs.

``ray job submit``, a Kubernetes CronJob or CI capture the driver's output into a log, where a
bar shows nothing useful (tqdm is off there) and, before this, nothing at all appeared until the
job ended. So where the bar is off because the output is not a terminal (or ``CI`` is set),
a line is written every ``every_s`` seconds instead, and one at the end::

    ratefit compress: 1,200/10,000 items, 3.4 img/s, 5.1 MB/s, ETA 43m10s, 2 errors
    ratefit compress: done, 10,000/10,000 items in 49m02s, 3.4 img/s, 5.1 MB/s, 2 errors

The spec's ``progress`` picks: ``None`` (default) the bar on a terminal and lines otherwise,
``True`` the bar always, ``False`` neither.

Lines go to stderr with ``print(flush=True)``, not through the ``ratefit`` logger: the CLI sets
logging to WARNING (``jobs/cli.py``), so INFO records would be dropped, while the entrypoint's
stderr is exactly what Ray captures into the job log (and what ``kubectl logs`` shows).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Callable

from tqdm import tqdm

BAR, LINES, OFF = "bar", "lines", "off"


def wanted(flag: bool | None) -> bool:
    """Whether the bar shows: as forced, else only on a terminal outside CI."""
    if flag is not None:
        return flag
    return not os.environ.get("CI") and sys.stderr.isatty()


def mode(flag: bool | None) -> str:
    """BAR, LINES or OFF for the spec's ``progress``: ``False`` silences lines too (the user
    asked for quiet), ``None`` falls back to lines wherever the bar would be off."""
    if flag is False:
        return OFF
    return BAR if wanted(flag) else LINES


def duration(seconds: float) -> str:
    """``12s``, ``43m10s``, ``2h05m``: short enough for a log line, exact enough for an ETA."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """Counts a pass's items, input bytes and error rows, and shows them as a bar or as lines.

    Lines come from a small daemon thread that wakes every ``every_s`` seconds, not only from
    ``advance``: the runner advances once per finished shard, and a shard of a learned codec
    can take minutes, so a log would otherwise stay silent exactly when one wants to know the
    job is alive. The thread only formats counters under a lock; it never touches the pool.
    ``clock`` is injectable for tests; ``start_timer=False`` leaves the thread out (lines then
    come from ``advance`` and ``tick`` alone).
    """

    def __init__(self, enabled: bool | None, desc: str, every_s: float = 30.0, total: int | None = None,
                 clock: Callable[[], float] = time.monotonic, start_timer: bool = True):
        self.mode = mode(enabled)
        self.enabled = self.mode == BAR   # the bar's switch, as before
        self.desc = desc
        self.every_s = every_s
        self.total = total
        self.clock = clock
        self.start = clock()
        self.last_line = self.start
        self.items = 0         # done, resumed ones included
        self.fresh_items = 0   # processed in this run: what the rates and the ETA are made of
        self.bytes = 0
        self.errors = 0
        self.closed = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.bar = tqdm(desc=desc, unit="img", disable=not self.enabled, dynamic_ncols=True, smoothing=0.1,
                        total=total)
        self._timer: threading.Thread | None = None
        if self.mode == LINES and start_timer:
            self._timer = threading.Thread(target=self._run_timer, name="ratefit-progress", daemon=True)
            self._timer.start()

    def advance(self, items: int, input_bytes: int, errors: int = 0, resumed: bool = False) -> None:
        """Count ``items`` done (``resumed``: committed by an earlier run, so not in the rates)."""
        with self._lock:
            self.items += items
            self.bytes += input_bytes
            self.errors += errors
            if not resumed:
                self.fresh_items += items
        if self.enabled:
            elapsed = max(self.clock() - self.start, 1e-9)
            self.bar.set_postfix_str(f"{self.bytes / 1e6 / elapsed:.1f} MB/s", refresh=False)
            self.bar.update(items)
        self.tick()

    def tick(self) -> None:
        """Write a line if the mode is LINES and ``every_s`` has passed since the last one."""
        if self.mode != LINES:
            return
        with self._lock:
            now = self.clock()
            if self.closed or now - self.last_line < self.every_s:
                return
            self.last_line = now
            self._write(self._line(now))   # under the lock: no timer line after the final one

    def close(self, completed: bool = True) -> None:
        """End the bar, or write the final line (``completed=False``: the pass stopped early)."""
        self._stop.set()
        self.bar.close()
        with self._lock:
            if self.closed:
                return
            self.closed = True
            if self.mode == LINES:
                self._write(self._line(self.clock(), final="done" if completed else "stopped"))

    # ------------------------------------------------------------------ internals
    def _run_timer(self) -> None:
        while not self._stop.wait(self.every_s):
            self.tick()

    def _line(self, now: float, final: str | None = None) -> str:
        elapsed = max(now - self.start, 1e-9)
        done = f"{self.items:,}/{self.total:,}" if self.total is not None else f"{self.items:,}"
        parts = [f"{done} items" + (f" in {duration(elapsed)}" if final else ""),
                 f"{self.fresh_items / elapsed:.1f} img/s", f"{self.bytes / 1e6 / elapsed:.1f} MB/s"]
        if final is None and self.total is not None and self.fresh_items:
            left = max(self.total - self.items, 0)
            parts.append(f"ETA {duration(left * elapsed / self.fresh_items)}")
        parts.append(f"{self.errors:,} error{'' if self.errors == 1 else 's'}")
        return f"ratefit {self.desc}: " + (f"{final}, " if final else "") + ", ".join(parts)

    @staticmethod
    def _write(text: str) -> None:
        print(text, file=sys.stderr, flush=True)
