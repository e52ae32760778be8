"""Storage helpers over fsspec: opening filesystems, atomic writes, safe output paths and
keeping credentials out of anything ratefit prints or stores."""

from __future__ import annotations

import os
import posixpath
import re
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

_SECRET_KEYS = re.compile(r"(secret|password|token|key|credential|session)", re.I)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s]*@")
_QUERY_SECRET = re.compile(r"(?i)([?&](?:x-amz-signature|x-amz-credential|x-amz-security-token|signature|sig|token|access_token|key)=)[^&\s]+")


def open_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for ``url`` and the path inside it (protocol stripped)."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path.rstrip("/") if path not in ("/", "") else path


def full_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A URL that names ``path`` on ``fs`` for manifests (``s3://b/k``, or a local path)."""
    if isinstance(fs, LocalFileSystem):
        return path
    return fs.unstrip_protocol(path)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def atomic_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` so that readers see either nothing or the whole file.

    Object stores commit a single PUT atomically; on local disks write a temporary
    sibling and rename it over the target.
    """
    if is_local(fs):
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def safe_join(root: str, relpath: str) -> str:
    """``root/relpath``, refusing any relative path that would leave ``root``."""
    rel = relpath.replace("\\", "/")
    if not rel or rel.startswith("/") or re.match(r"^[a-zA-Z]:", rel) or "://" in rel:
        raise ValueError(f"output path {relpath!r} is absolute; it must be relative to OUTPUT")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        raise ValueError(f"output path {relpath!r} escapes OUTPUT")
    return posixpath.join(root, *parts) if root else posixpath.join(*parts)


def redact(text: str | None) -> str | None:
    """Remove credentials from URLs in ``text`` (user:secret@host, signed query strings)."""
    if text is None:
        return None
    text = _URL_USERINFO.sub(r"\g<scheme>***@", text)
    return _QUERY_SECRET.sub(r"\1***", text)


def redact_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """Storage options with every secret-looking value replaced, for summaries and logs."""
    out: dict[str, Any] = {}
    for k, v in (options or {}).items():
        if isinstance(v, dict):
            out[k] = redact_options(v)
        elif _SECRET_KEYS.search(k) and k not in ("endpoint_url",):
            out[k] = "***"
        elif isinstance(v, str):
            out[k] = redact(v)
        else:
            out[k] = v
    return out
