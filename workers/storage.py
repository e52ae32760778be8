"""Storage helpers over fsspec: opening filesystems, atomic writes, safe output paths and
keeping credentials out of anything ratefit prints or stores."""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import random
import re
import time
import uuid
from typing import Any, Callable, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger("ratefit")
T = TypeVar("T")
# How long one storage operation keeps retrying a store that does not answer before the
# item's shard gives up with StorageUnavailable (the job then stops and a re-run resumes).
# Per process: the driver and each worker set it from the job's spec (set_retry_window).
STORAGE_RETRY_S = 120.0
_TRANSIENT_ERRNOS = {errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
                     errno.ECONNABORTED, errno.EPIPE, errno.ENETUNREACH, errno.EHOSTUNREACH}
# botocore / aiohttp raise their own classes for a refused or dropped connection; named here
# so local-only installs need neither package.
_TRANSIENT_NAMES = {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
                    "HTTPClientError", "ClientConnectorError", "ServerDisconnectedError", "ClientOSError",
                    "FSTimeoutError", "IncompleteRead", "ResponseStreamingError", "ServiceUnavailable", "SlowDown"}
# An S3 answer that says "try again": any 5xx, and the codes AWS documents as retryable. s3fs
# turns them into OSErrors (500 → EREMOTEIO, 503 → EBUSY, 502/504 → a bare EIO) with the
# botocore ClientError as the cause. A restarting SeaweedFS answers 500 InternalError until its
# volume server has registered: seconds, longer than botocore's own retries on a busy machine.
_RETRYABLE_S3_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "RequestTimeTooSkewed",
                       "BadGateway", "GatewayTimeout", "500", "502", "503", "504"}

_SECRET_KEYS = re.compile(r"(secret|password|token|key|credential|session)", re.I)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s]*@")
_QUERY_SECRET = re.compile(r"(?i)([?&](?:x-amz-signature|x-amz-credential|x-amz-security-token|signature|sig|token|access_token|key)=)[^&\s]+")


class StorageUnavailable(RuntimeError):
    """The store did not answer for ``STORAGE_RETRY_S``; the job stops instead of recording
    a storage outage as bad items, and a re-run resumes from the committed shards."""


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` says the store was unreachable (worth retrying), not that the request was wrong."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
            return False
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        if any(cls.__name__ in _TRANSIENT_NAMES for cls in type(e).__mro__):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
        if _server_says_retry(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _server_says_retry(error: BaseException) -> bool:
    """Whether ``error`` is an S3 response (a botocore ClientError) asking to try again."""
    response = getattr(error, "response", None)
    if not isinstance(response, dict):
        return False
    code = str((response.get("Error") or {}).get("Code") or "")
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return code in _RETRYABLE_S3_CODES or (isinstance(status, int) and status >= 500)


def set_retry_window(seconds: float) -> None:
    """How long this process's storage operations ride out an outage (the job's --storage-retry-s)."""
    global STORAGE_RETRY_S
    STORAGE_RETRY_S = float(seconds)


def with_retries(op: Callable[[], T], what: str, window_s: float | None = None) -> T:
    """Run ``op``, retrying transient storage errors with jittered exponential backoff.

    A short outage (a restarted S3 server, a dropped connection) is carried through; one
    longer than ``window_s`` raises StorageUnavailable naming the operation. Only for
    idempotent operations (reads, whole-object writes, listings).
    """
    window = STORAGE_RETRY_S if window_s is None else window_s
    start = time.monotonic()
    delay = 0.25
    while True:
        try:
            return op()
        except Exception as e:
            if not is_transient(e):
                raise
            waited = time.monotonic() - start
            if waited + delay > window:
                raise StorageUnavailable(f"{redact(what)}: storage unreachable for {waited:.0f} s "
                                         f"({type(e).__name__}: {redact(str(e))})") from e
            log.warning("%s: %s; retrying in %.1f s", redact(what), redact(f"{type(e).__name__}: {e}"), delay)
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 8.0)


def fetch(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    """A whole object's bytes, through short outages."""
    return with_retries(lambda: fs.cat_file(path), f"read {path}")


def fetch_range(fs: fsspec.AbstractFileSystem, path: str, offset: int, length: int) -> bytes:
    """``length`` bytes of an object from ``offset`` (one ranged GET on S3), through short outages."""
    data = with_retries(lambda: fs.cat_file(path, start=offset, end=offset + length), f"read {path}")
    if len(data) != length:
        raise OSError(f"{path}: {len(data)} B at offset {offset}, expected {length} (object shorter than its manifest says)")
    return data


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


def version_from(info: dict[str, Any]) -> str | None:
    """An object's version as incremental runs compare it: its ETag, else its modification time."""
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return "etag:" + str(etag).strip('"')
    for key in ("mtime_ns", "LastModified", "last_modified", "mtime", "modified"):
        if info.get(key) is not None:
            return f"mtime:{info[key]}"
    return None


def source_stat(fs: fsspec.AbstractFileSystem, path: str) -> tuple[int | None, str | None]:
    """(size, version) of one input, the way the folder walk reports them (one HEAD on S3)."""
    if is_local(fs):
        st = os.stat(path)
        return st.st_size, version_from({"mtime_ns": st.st_mtime_ns})
    info = with_retries(lambda: fs.info(path), f"stat {path}")
    return info.get("size"), version_from(info)


def stat_input(url: str, storage_options: dict[str, Any] | None) -> tuple[int | None, str | None]:
    """``source_stat`` of a URL, or (None, None) when it is missing or unreadable (the read that
    follows says so in the item's row); an outage is raised, as everywhere."""
    try:
        return source_stat(*open_fs(url, storage_options))
    except StorageUnavailable:
        raise
    except Exception:
        return None, None


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
        with_retries(lambda: fs.pipe_file(path, data), f"write {path}")


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
