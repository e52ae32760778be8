"""Storage helpers: safe output paths, credential redaction, atomic writes."""

from __future__ import annotations

import os

import fsspec
import pytest

from ratefit.workers.storage import atomic_write, full_url, is_local, open_fs, redact, redact_options, safe_join

# -------------------------------------------------------------------------- safe_join


@pytest.mark.parametrize("rel", [
    "../x", "a/../../x", "..", "./..", "a/..", "a\\..\\..\\x", "..\\x",
    "/etc/passwd", "\\etc\\passwd", "//server/share/x",
    "C:\\x", "c:/x", "C:x",
    "s3://b/k", "file:///etc/passwd", "https://host/x",
    "", "/", ".", "./",
])
def test_safe_join_refuses_escaping_or_absolute_paths(rel):
    with pytest.raises(ValueError) as info:
        safe_join("out", rel)
    assert repr(rel) in str(info.value)
    assert "OUTPUT" in str(info.value)


@pytest.mark.parametrize("root,rel,expected", [
    ("out", "a/b c/ü.png", "out/a/b c/ü.png"),
    ("s3://bucket/out", "a/b c/ü.png", "s3://bucket/out/a/b c/ü.png"),
    ("/tmp/out", "x.png", "/tmp/out/x.png"),
    ("out", "./a/./b.png", "out/a/b.png"),
    ("out", "a//b.png", "out/a/b.png"),
    ("out", "a\\b.png", "out/a/b.png"),
    ("out", "..a/b..png", "out/..a/b..png"),     # dots inside names are fine
    ("", "a/b.png", "a/b.png"),
])
def test_safe_join_accepts_relative_paths(root, rel, expected):
    assert safe_join(root, rel) == expected


# ----------------------------------------------------------------------------- redact

def test_redact_none():
    assert redact(None) is None


def test_redact_leaves_clean_text_alone():
    s = "s3://bucket/prefix/file.png and /local/path?x=1"
    assert redact(s) == s


@pytest.mark.parametrize("url,secret,kept", [
    ("s3://user:secret@host/b/k", "secret", "host/b/k"),
    ("https://AKIA:s3cr3t@minio.local:9000/bucket/x.png", "s3cr3t", "minio.local:9000/bucket/x.png"),
    ("ftp://onlyuser@host/x", "onlyuser", "ftp://"),
])
def test_redact_removes_userinfo(url, secret, kept):
    out = redact(url)
    assert secret not in out
    assert "user:secret@" not in out
    assert kept in out
    assert "***@" in out


@pytest.mark.parametrize("param", ["X-Amz-Signature", "x-amz-signature", "X-Amz-Credential",
                                   "X-Amz-Security-Token", "Signature", "sig", "token", "access_token", "key"])
def test_redact_removes_signature_query_params(param):
    url = f"https://bucket.s3.amazonaws.com/x.png?foo=1&{param}=SECRETVALUE123&bar=2"
    out = redact(url)
    assert "SECRETVALUE123" not in out
    assert f"{param}=***" in out
    assert "foo=1" in out and "bar=2" in out


def test_redact_first_query_param_and_several_urls_in_text():
    text = "failed https://u:pw1@a.example/x?sig=AAA then https://b.example/y?X-Amz-Signature=BBB&z=1"
    out = redact(text)
    for secret in ("pw1", "AAA", "BBB"):
        assert secret not in out
    assert "a.example/x" in out and "b.example/y" in out and "z=1" in out


def test_redact_password_with_at_sign():
    out = redact("https://user:p@ssw0rd@host/x")
    assert "ssw0rd" not in out
    assert out.endswith("@host/x")


# ---------------------------------------------------------------------- redact_options

def test_redact_options_hides_secrets_keeps_the_rest():
    opts = {
        "key": "AKIAEXAMPLE",
        "secret": "s3cr3t",
        "token": "tok",
        "aws_secret_access_key": "zz",
        "password": "pw",
        "session_token": "st",
        "anon": False,
        "endpoint_url": "http://localhost:8333",
        "client_kwargs": {"endpoint_url": "http://minio:9000", "region_name": "eu-west-1",
                          "aws_access_key_id": "AKIA2"},
        "default_block_size": 1 << 20,
    }
    out = redact_options(opts)
    for k in ("key", "secret", "token", "aws_secret_access_key", "password", "session_token"):
        assert out[k] == "***"
    assert out["anon"] is False
    assert out["endpoint_url"] == "http://localhost:8333"
    assert out["client_kwargs"] == {"endpoint_url": "http://minio:9000", "region_name": "eu-west-1",
                                    "aws_access_key_id": "***"}
    assert out["default_block_size"] == 1 << 20
    flat = repr(out)
    for secret in ("AKIAEXAMPLE", "s3cr3t", "'tok'", "'zz'", "'pw'", "'st'", "AKIA2"):
        assert secret not in flat


def test_redact_options_does_not_mutate_its_input():
    opts = {"secret": "s", "client_kwargs": {"token": "t"}}
    redact_options(opts)
    assert opts == {"secret": "s", "client_kwargs": {"token": "t"}}


@pytest.mark.parametrize("opts", [None, {}])
def test_redact_options_empty(opts):
    assert redact_options(opts) == {}


# ------------------------------------------------------------------------ atomic_write

def _tmp_leftovers(folder) -> list[str]:
    return [n for n in os.listdir(folder) if n.endswith(".tmp") or n.startswith(".")]


def test_atomic_write_local(tmp_path):
    fs = fsspec.filesystem("file")
    path = str(tmp_path / "deep" / "er" / "out.rfic")
    data = bytes(range(256)) * 1000
    atomic_write(fs, path, data)
    with open(path, "rb") as f:
        assert f.read() == data
    assert os.listdir(tmp_path / "deep" / "er") == ["out.rfic"]


def test_atomic_write_replaces_an_existing_file(tmp_path):
    fs = fsspec.filesystem("file")
    path = str(tmp_path / "out.bin")
    atomic_write(fs, path, b"old content that is longer")
    atomic_write(fs, path, b"new")
    with open(path, "rb") as f:
        assert f.read() == b"new"
    assert _tmp_leftovers(tmp_path) == []
    assert sorted(os.listdir(tmp_path)) == ["out.bin"]


def test_atomic_write_empty_payload_and_unicode_name(tmp_path):
    fs = fsspec.filesystem("file")
    path = str(tmp_path / "a b" / "ü.png.rfic")
    atomic_write(fs, path, b"")
    assert os.path.getsize(path) == 0
    assert _tmp_leftovers(tmp_path / "a b") == []


def test_atomic_write_non_local_filesystem():
    fs = fsspec.filesystem("memory")
    path = "/ratefit-test-atomic/sub/out.bin"
    try:
        atomic_write(fs, path, b"payload")
        assert fs.cat_file(path) == b"payload"
        assert not is_local(fs)
    finally:
        fs.rm("/ratefit-test-atomic", recursive=True)


# ---------------------------------------------------------------------------- open_fs

def test_open_fs_local_strips_trailing_slash(tmp_path):
    fs, path = open_fs(str(tmp_path) + "/")
    assert is_local(fs)
    assert path == str(tmp_path)
    assert full_url(fs, path) == str(tmp_path)


def test_full_url_of_a_remote_filesystem():
    fs, path = open_fs("memory://bucket/key")
    assert full_url(fs, path).startswith("memory://")
    assert full_url(fs, path).endswith("bucket/key")
