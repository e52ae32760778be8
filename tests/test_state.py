"""The manifest's current state: latest row per input across runs, tombstones, snapshots.

Parts are written here by hand (as workers commit them), so the merge rules are checked
without running jobs; tests/test_incremental.py runs the real thing.
"""

from __future__ import annotations

from ratefit.workers import manifest as m
from ratefit.workers.storage import open_fs


def _row(uri: str, version: str, run: str, status: str = "ok", out: int = 100) -> dict:
    row = m.empty_row(m.COMPRESS_SCHEMA)
    row.update(input_uri=uri, source_version=version, run_id=run, status=status, output_bytes=out,
               input_bytes=1000, output_uri=f"{uri}.rfic", verified=True)
    return row


def _tomb(uri: str, version: str, run: str, action: str) -> dict:
    tomb = m.empty_row(m.RETIRED_SCHEMA)
    tomb.update(input_uri=uri, source_version=version, run_id=run, action=action)
    return tomb


def _commit(fs, root: str, run: str, rows: list[dict], tombs: list[dict] = ()) -> None:
    m.write_part(fs, f"{root}/{m.MANIFEST_DIR}/{m.RUN_PREFIX}{run}", 0, rows, m.COMPRESS_SCHEMA)
    if tombs:
        m.write_part(fs, f"{root}/{m.RETIRED_DIR}/{m.RUN_PREFIX}{run}", 0, list(tombs), m.RETIRED_SCHEMA)


def _view(table) -> dict:
    return {r["input_uri"]: (r["source_version"], r["run_id"], r["status"], r["retired"]) for r in table.to_pylist()}


def test_state_takes_the_latest_row_and_the_matching_tombstone_with_and_without_snapshots(tmp_path, monkeypatch):
    fs, root = open_fs(str(tmp_path / "out"))
    a, b, c = "20261101T000000Z-aaaaaa", "20261102T000000Z-bbbbbb", "20261103T000000Z-cccccc"
    _commit(fs, root, a, [_row("u1", "v1", a), _row("u2", "v1", a), _row("u4", "v1", a, status="error")],
            [_tomb("u1", "v1", a, "deleted")])
    snap_a = _view(m.write_snapshot(fs, root, a))
    assert snap_a == {"u1": ("v1", a, "ok", "deleted"), "u2": ("v1", a, "ok", None), "u4": ("v1", a, "error", None)}

    # Run b: u2 changed (new version supersedes), u3 new and moved, u4 retried ok; u2's old
    # version had no tombstone and the new one has none either.
    _commit(fs, root, b, [_row("u2", "v2", b), _row("u3", "v1", b), _row("u4", "v1", b)],
            [_tomb("u3", "v1", b, "moved")])
    # Run c retires u2's new version late (backlog) and has no rows of its own.
    m.write_part(fs, f"{root}/{m.RETIRED_DIR}/{m.RUN_PREFIX}{c}", 0, [_tomb("u2", "v2", c, "deleted")],
                 m.RETIRED_SCHEMA)
    expected = {"u1": ("v1", a, "ok", "deleted"), "u2": ("v2", b, "ok", "deleted"),
                "u3": ("v1", b, "ok", "moved"), "u4": ("v1", b, "ok", None)}

    reads: list[str] = []
    real = m.fetch
    monkeypatch.setattr(m, "fetch", lambda fs_, path: reads.append(path) or real(fs_, path))
    assert _view(m.current_state(fs, root)) == expected
    assert not [p for p in reads if f"run={a}" in p], "run a's parts are in the snapshot: not read again"
    assert any("state-" in p for p in reads)

    fs.rm(f"{root}/{m.STATE_DIR}", recursive=True)      # without a snapshot: every part, same answer
    assert _view(m.current_state(fs, root)) == expected

    for run in (a, b, c):                                   # only the newest two snapshots stay
        m.write_snapshot(fs, root, run)
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/{m.STATE_DIR}", detail=False)) == \
        [f"state-{b}.parquet", f"state-{c}.parquet"]
    assert _view(m.current_state(fs, root)) == expected
    narrow = m.current_state(fs, root, ["status"])
    assert narrow.column_names == ["input_uri", "source_version", "status", "retired"] and len(narrow) == 4


def test_run_ids_increase_even_when_the_clock_is_behind():
    from ratefit.jobs.incremental import new_run_id

    later = "20991231T235959Z-ffffff"
    rid = new_run_id(after=later)
    assert rid > later and rid.startswith("21000101T000000Z-")
    assert new_run_id(after="20000101T000000Z-000000") > "20000101T000000Z-000000"
