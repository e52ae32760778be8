"""Planning: folder walks, listing files (Parquet and CSV) and deterministic shards."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ratefit.codecs.rate import Target
from ratefit.jobs.plan import PlanError, iter_folder, iter_listing, shard
from ratefit.workers.items import Item, Shard

EXTS = (".png", ".jpg", ".jpeg", ".webp")

FILES = [
    "a.png", "B.JPG", "z.webp", "c.txt", "readme.md", "noext", "png", "x.png.bak",
    ".hidden.png", ".hiddendir/inside.png",
    "sub/x.PnG", "sub/deeper/y.jpeg", "sub/deeper/.dot.jpg", "sub/notes.TXT",
    "b dir/ü ñ.png", "b dir/Ärger.JPEG", "zz/last.png",
]
EXPECTED = {"a.png", "B.JPG", "z.webp", "sub/x.PnG", "sub/deeper/y.jpeg", "b dir/ü ñ.png",
            "b dir/Ärger.JPEG", "zz/last.png"}


def _make_tree(root: Path, names, reverse: bool = False) -> Path:
    for name in (reversed(names) if reverse else names):
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    return root


# ---------------------------------------------------------------------- iter_folder

def test_iter_folder_yields_only_matching_visible_files(tmp_path):
    root = _make_tree(tmp_path / "in", FILES)
    items = list(iter_folder(str(root), EXTS))
    assert {i.relpath for i in items} == EXPECTED
    assert len(items) == len(EXPECTED)
    for it in items:
        assert isinstance(it, Item)
        assert it.target is None and it.error is None
        assert it.uri == str(root / it.relpath)
        assert os.path.isfile(it.uri)


def test_iter_folder_order_is_deterministic_and_sorted_per_folder(tmp_path):
    a = [i.relpath for i in iter_folder(str(_make_tree(tmp_path / "one", FILES)), EXTS)]
    b = [i.relpath for i in iter_folder(str(_make_tree(tmp_path / "two", FILES, reverse=True)), EXTS)]
    assert a == b                                     # creation order does not matter
    assert a == [i.relpath for i in iter_folder(str(tmp_path / "one"), EXTS)]   # nor the run
    # files of one folder come in sorted order
    by_dir: dict[str, list[str]] = {}
    for rel in a:
        d, _, name = rel.rpartition("/")
        by_dir.setdefault(d, []).append(name)
    for names in by_dir.values():
        assert names == sorted(names)


def test_iter_folder_trailing_slash_and_extension_case(tmp_path):
    root = _make_tree(tmp_path / "in", FILES)
    plain = [i.relpath for i in iter_folder(str(root), EXTS)]
    assert [i.relpath for i in iter_folder(str(root) + "/", EXTS)] == plain
    upper = [i.relpath for i in iter_folder(str(root), [e.upper() for e in EXTS])]
    assert upper == plain
    only_png = {i.relpath for i in iter_folder(str(root), [".png"])}
    assert only_png == {"a.png", "sub/x.PnG", "b dir/ü ñ.png", "zz/last.png"}


def test_iter_folder_skips_the_output_folder_inside_the_input(tmp_path):
    root = _make_tree(tmp_path / "in", ["a.png", "out/a.png.rfic", "out/b.png", "outside/c.png"])
    rels = [i.relpath for i in iter_folder(str(root), EXTS, skip_url=str(root / "out"))]
    assert rels == ["a.png", "outside/c.png"]


def test_iter_folder_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    assert list(iter_folder(str(tmp_path / "empty"), EXTS)) == []


def test_iter_folder_missing_folder_raises_plan_error(tmp_path):
    with pytest.raises(PlanError, match="input folder not found"):
        list(iter_folder(str(tmp_path / "does-not-exist"), EXTS))


def test_iter_folder_on_a_file_raises_plan_error(tmp_path):
    f = tmp_path / "file.png"
    f.write_bytes(b"x")
    with pytest.raises(PlanError):
        list(iter_folder(str(f), EXTS))


def test_iter_folder_over_fsspec_memory(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    try:
        for name in ("b.png", "a/c.PNG", "a/d.txt"):
            fs.pipe_file(f"/ratefit-plan-test/{name}", b"x")
        items = list(iter_folder("memory://ratefit-plan-test", [".png"]))
        assert [i.relpath for i in items] == ["a/c.PNG", "b.png"]
        assert all(i.uri.startswith("memory://") for i in items)
    finally:
        fs.rm("/ratefit-plan-test", recursive=True)


# -------------------------------------------------------------------------- shard

def _items(n: int) -> list[Item]:
    return [Item(uri=f"/in/{i:03d}.png", relpath=f"{i:03d}.png") for i in range(n)]


@pytest.mark.parametrize("n,size,lens", [
    (10, 3, [3, 3, 3, 1]),
    (9, 3, [3, 3, 3]),
    (1, 16, [1]),
    (0, 4, []),
    (5, 1, [1, 1, 1, 1, 1]),
])
def test_shard_sizes(n, size, lens):
    shards = list(shard(iter(_items(n)), size))
    assert [len(s.items) for s in shards] == lens
    assert [s.index for s in shards] == list(range(len(lens)))
    assert all(isinstance(s, Shard) and isinstance(s.items, tuple) for s in shards)
    assert [it for s in shards for it in s.items] == _items(n)


def test_shard_is_deterministic():
    assert list(shard(_items(23), 5)) == list(shard(_items(23), 5))
    assert list(shard(_items(23), 5))[-1] == Shard(4, tuple(_items(23)[20:]))


def test_shard_streams():
    """shard() must not drain its input before yielding the first shard."""
    def gen():
        yield from _items(4)
        raise AssertionError("read past the first shard")
    first = next(shard(gen(), 2))
    assert first.index == 0 and len(first.items) == 2


# ---------------------------------------------------------------------- listings

def _check_listing_items(items: list[Item], folder: Path) -> None:
    by_rel = {i.relpath: i for i in items if i.error is None}
    a = by_rel["a.png"]
    assert a.uri == str(folder / "a.png")
    assert a.target == Target("bpp", 0.5)
    b = by_rel["sub/b c.png"]
    assert b.uri == str(folder / "sub" / "b c.png")
    assert b.target == Target("psnr", 40.0)
    u = by_rel["ü.png"]
    assert u.target is None
    assert u.uri == str(folder / "ü.png")


def test_iter_listing_parquet(tmp_path):
    table = pa.table({
        "uri": ["a.png", "sub/b c.png", "ü.png", "two.png", "../x.png", "", None, "sub/../../y.png"],
        "target_bpp": [0.5, None, None, 1.0, None, None, None, None],
        "target_psnr": [None, 40.0, float("nan"), 30.0, None, None, None, None],
        "ignored": list(range(8)),
    })
    pq.write_table(table, tmp_path / "list.parquet")
    items = list(iter_listing(str(tmp_path / "list.parquet")))
    assert len(items) == 8
    _check_listing_items(items, tmp_path)
    assert [i.error is None for i in items] == [True, True, True, False, False, False, False, False]
    assert "several targets" in items[3].error and "bpp" in items[3].error and "psnr" in items[3].error
    assert items[3].target is None
    assert "escapes" in items[4].error and "../x.png" in items[4].error
    assert "empty uri" in items[5].error and "empty uri" in items[6].error
    assert "escapes" in items[7].error
    assert "row 4" in items[3].error and "row 6" in items[5].error


def test_iter_listing_csv(tmp_path):
    (tmp_path / "list.csv").write_text(
        "uri,target_bpp,target_psnr,extra\n"
        "a.png,0.5,,x\n"
        "sub/b c.png,,40,y\n"
        "ü.png,,,z\n"
        "two.png,1,30,\n"
        "../x.png,,,\n"
        ",,,\n"
        "zero.png,0,,\n"
        "\"comma, name.png\",2,,\n",
        encoding="utf-8")
    items = list(iter_listing(str(tmp_path / "list.csv")))
    assert len(items) == 8
    _check_listing_items(items, tmp_path)
    assert "several targets" in items[3].error
    assert "escapes" in items[4].error
    assert "empty uri" in items[5].error
    assert "positive" in items[6].error and items[6].target is None
    assert items[7].error is None and items[7].relpath == "comma, name.png"
    assert items[7].target == Target("bpp", 2.0)


def test_iter_listing_csv_uri_only_and_numeric_looking_names(tmp_path):
    (tmp_path / "list.csv").write_text("uri\n0001.png\n123\n", encoding="utf-8")
    items = list(iter_listing(str(tmp_path / "list.csv")))
    assert [i.relpath for i in items] == ["0001.png", "123"]
    assert all(i.target is None and i.error is None for i in items)


def test_iter_listing_resolves_against_the_listing_folder_not_the_cwd(tmp_path, monkeypatch):
    listing_dir = tmp_path / "lists" / "deep"
    listing_dir.mkdir(parents=True)
    (listing_dir / "l.csv").write_text("uri\nimg/a.png\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    (item,) = list(iter_listing("lists/deep/l.csv"))
    assert item.uri == str(listing_dir / "img" / "a.png")
    assert item.relpath == "img/a.png"


def test_iter_listing_absolute_uris(tmp_path):
    (tmp_path / "list.csv").write_text(
        f"uri\n{tmp_path}/inside/a.png\n/elsewhere/b.png\ns3://bucket/k/c.png\n", encoding="utf-8")
    items = list(iter_listing(str(tmp_path / "list.csv")))
    assert [i.error for i in items] == [None, None, None]
    assert items[0].uri == f"{tmp_path}/inside/a.png" and items[0].relpath == "inside/a.png"
    assert items[1].uri == "/elsewhere/b.png" and items[1].relpath == "elsewhere/b.png"
    assert items[2].uri == "s3://bucket/k/c.png" and items[2].relpath == "bucket/k/c.png"


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_iter_listing_without_uri_column(tmp_path, suffix):
    path = tmp_path / f"l{suffix}"
    if suffix == ".csv":
        path.write_text("path,target_bpp\na.png,1\n", encoding="utf-8")
    else:
        pq.write_table(pa.table({"path": ["a.png"], "target_bpp": [1.0]}), path)
    with pytest.raises(PlanError, match="no 'uri' column") as info:
        list(iter_listing(str(path)))
    assert "path" in str(info.value)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_iter_listing_missing_file(tmp_path, suffix):
    with pytest.raises(PlanError, match="listing file not found"):
        list(iter_listing(str(tmp_path / f"nope{suffix}")))


def test_iter_listing_empty_csv_is_a_plan_error(tmp_path):
    (tmp_path / "l.csv").write_text("", encoding="utf-8")
    with pytest.raises(PlanError):
        list(iter_listing(str(tmp_path / "l.csv")))


def test_iter_listing_corrupt_parquet_is_a_plan_error(tmp_path):
    (tmp_path / "l.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(PlanError):
        list(iter_listing(str(tmp_path / "l.parquet")))


def _big_csv(path: Path, rows: int, first: str, late: str) -> None:
    """A CSV listing larger than the reader's 1 MiB block, whose last rows differ in type."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("uri,target_bpp\n")
        for i in range(rows):
            f.write(f"images/{i:07d}.png,{first if i < rows - 5 else late}\n")
    assert path.stat().st_size > (1 << 20) + 4096


@pytest.mark.parametrize("first,late", [("", "0.5"), ("1", "0.5")], ids=["null-then-float", "int-then-float"])
def test_iter_listing_large_csv_with_late_target_values(tmp_path, first, late):
    path = tmp_path / "big.csv"
    _big_csv(path, 75_000, first, late)
    n = 0
    last = None
    for last in iter_listing(str(path)):
        n += 1
    assert n == 75_000
    assert last.error is None and last.target == Target("bpp", 0.5)
