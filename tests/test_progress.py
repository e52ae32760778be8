"""Progress in logs: lines every N seconds where the bar is off, a final line, none when disabled."""

from __future__ import annotations

import argparse
import math
import re
import time

import pytest

from ratefit.jobs import cli, compress
from ratefit.jobs import progress as progress_mod
from ratefit.jobs.progress import BAR, LINES, OFF, Progress, duration, mode
from ratefit.jobs.spec import JobSpec, SpecError


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def no_tty(monkeypatch):
    """Output is not a terminal (as under pytest's capture, stated here so it does not depend on it)."""
    monkeypatch.setattr(progress_mod.sys.stderr, "isatty", lambda: False, raising=False)


def lines_of(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("ratefit ")]


def test_the_mode_follows_the_flag_the_terminal_and_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(progress_mod.sys.stderr, "isatty", lambda: True, raising=False)
    assert (mode(None), mode(True), mode(False)) == (BAR, BAR, OFF)
    monkeypatch.setenv("CI", "1")
    assert (mode(None), mode(True), mode(False)) == (LINES, BAR, OFF)
    monkeypatch.delenv("CI")
    monkeypatch.setattr(progress_mod.sys.stderr, "isatty", lambda: False, raising=False)
    assert (mode(None), mode(True), mode(False)) == (LINES, BAR, OFF)


def test_duration_reads_as_a_log_wants_it():
    assert [duration(s) for s in (0, 12.4, 59.6, 61, 2590, 3600, 7530)] == \
        ["0s", "12s", "1m00s", "1m01s", "43m10s", "1h00m", "2h05m"]


def test_lines_every_interval_with_an_eta_when_the_total_is_known(capsys, no_tty):
    clock = Clock()
    p = Progress(None, "compress", every_s=30, total=10_000, clock=clock, start_timer=False)
    assert p.mode == LINES and not p.enabled
    clock.t += 10
    p.advance(100, 1_000_000, errors=1)
    assert lines_of(capsys) == []                     # under 30 s since the start: nothing yet
    clock.t += 20
    p.advance(100, 2_000_000)                         # 200 items, 3 MB in 30 s
    assert lines_of(capsys) == ["ratefit compress: 200/10,000 items, 6.7 img/s, 0.1 MB/s, ETA 24m30s, 1 error"]
    clock.t += 5
    p.advance(1000, 0, errors=1)
    assert lines_of(capsys) == []                     # 5 s after the last line
    clock.t += 25
    p.tick()                                          # what the timer thread calls
    (line,) = lines_of(capsys)
    assert line.startswith("ratefit compress: 1,200/10,000 items, 20.0 img/s, ") and line.endswith(", 2 errors")
    assert "ETA 7m20s" in line
    clock.t += 1
    p.close()
    assert lines_of(capsys) == ["ratefit compress: done, 1,200/10,000 items in 1m01s, 19.7 img/s, 0.0 MB/s, 2 errors"]
    p.close()                                         # once only
    clock.t += 100
    p.tick()
    assert lines_of(capsys) == []


def test_without_a_total_a_line_counts_done_only_and_has_no_eta(capsys, no_tty):
    clock = Clock()
    p = Progress(None, "decompress", every_s=1, clock=clock, start_timer=False)
    clock.t += 2
    p.advance(16, 8_000_000)
    assert lines_of(capsys) == ["ratefit decompress: 16 items, 8.0 img/s, 4.0 MB/s, 0 errors"]
    p.close(completed=False)
    assert lines_of(capsys) == ["ratefit decompress: stopped, 16 items in 2s, 8.0 img/s, 4.0 MB/s, 0 errors"]


def test_resumed_items_count_as_done_but_not_in_the_rates(capsys, no_tty):
    clock = Clock()
    p = Progress(None, "encode", every_s=10, total=100, clock=clock, start_timer=False)
    p.advance(50, 0, resumed=True)
    clock.t += 10
    p.advance(10, 0)
    assert lines_of(capsys) == ["ratefit encode: 60/100 items, 1.0 img/s, 0.0 MB/s, ETA 40s, 0 errors"]
    p.close()


def test_the_timer_writes_lines_while_nothing_advances(capsys, no_tty):
    p = Progress(None, "compress", every_s=0.02)
    time.sleep(0.3)                                   # a long shard: no advance at all
    p.close()
    lines = lines_of(capsys)
    assert len(lines) >= 3 and all(line.startswith("ratefit compress: 0 items, 0.0 img/s") for line in lines[:-1])
    assert lines[-1].startswith("ratefit compress: done, 0 items in ")
    time.sleep(0.1)
    assert lines_of(capsys) == []                     # the timer stopped with close


def test_no_lines_when_disabled_and_the_bar_path_unchanged(capsys, monkeypatch):
    clock = Clock()
    p = Progress(False, "compress", every_s=0.01, clock=clock)
    assert p.mode == OFF and p._timer is None and p.bar.disable
    clock.t += 60
    p.advance(5, 100)
    p.tick()
    p.close()
    assert capsys.readouterr().err == ""

    p = Progress(True, "compress", every_s=0.01, clock=clock)   # forced bar: tqdm as before, no lines
    assert p.mode == BAR and p.enabled and p._timer is None and not p.bar.disable
    clock.t += 60
    p.advance(5, 3_000_000)
    assert p.bar.n == 5 and "MB/s" in p.bar.postfix
    p.close()
    assert lines_of(capsys) == []


def test_the_interval_is_validated_parsed_and_not_hashed(tmp_path):
    base = dict(input=str(tmp_path), output=str(tmp_path / "out"), codec="jpeg", target_bpp=1.0)
    assert JobSpec(**base).progress_every_s == 30.0
    for bad in (0, -1, math.inf, math.nan, True, "10", None):
        with pytest.raises(SpecError, match="progress_every_s"):
            JobSpec(**base, progress_every_s=bad)
    assert JobSpec(**base, progress_every_s=5).progress_every_s == 5.0
    assert JobSpec(**base, progress_every_s=5).spec_hash() == JobSpec(**base).spec_hash()
    budget = dict(base, target_bpp=None, budget_bpp=1.0)
    assert JobSpec(**budget, progress_every_s=5).spec_hash() == JobSpec(**budget).spec_hash()
    p = argparse.ArgumentParser()
    cli.add_compress_arguments(p)
    spec = cli.spec_from_args(p.parse_args([str(tmp_path), str(tmp_path / "o"), "--codec", "jpeg",
                                            "--target-bpp", "1", "--progress-every", "2.5"]))
    assert spec.progress_every_s == 2.5 and spec.progress is None


def test_an_in_process_job_writes_progress_lines(photo_dir, tmp_path, capsys, no_tty):
    summary = compress.run(JobSpec(input=str(photo_dir), output=str(tmp_path / "out"), codec="jpeg",
                                   target_bpp=0.6, shard_size=1, in_process=True, progress_every_s=0.01))
    assert summary["statuses"] == {"ok": 3}
    lines = lines_of(capsys)
    assert len(lines) >= 2, lines   # at least one while running, and the final one
    pattern = r"ratefit compress: [\d,]+ items, [\d.]+ img/s, [\d.]+ MB/s, \d+ errors?"
    assert all(re.fullmatch(pattern, line) for line in lines[:-1]), lines
    assert re.fullmatch(r"ratefit compress: done, 3 items in \d+\S*, [\d.]+ img/s, [\d.]+ MB/s, 0 errors",
                        lines[-1]), lines
