"""Storage on any fsspec URL (``file://``, plain paths, ``s3://``): whole-object writes, storage options.

Two rules every writer in the system follows:

- **An object is visible only when whole.** Local files are written under a temporary name in the
  same directory and renamed (atomic on POSIX); object stores get one whole-object ``put`` (an S3
  PUT is atomic: readers see the old object, the new one, or nothing). Streaming writes through a
  custom opener once uploaded nothing at all in a trial, so we never stream to object stores.
- **Credentials never leave the process.** Storage options come from ``--storage-options`` JSON
  or the environment (boto's ``AWS_*`` variables, ``AWS_ENDPOINT_URL``); :func:`redact` is applied to
  anything that is logged or written into a manifest or saved config.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import fsspec
from fsspec.core import url_to_fs

SECRET_MARKERS = ("key", "secret", "token", "password", "credential", "session")


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URL and what to check."""


def parse_storage_options(text: str | None) -> dict[str, Any]:
    """``--storage-options`` JSON → dict (empty when not given: fsspec/boto read the environment)."""
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--storage-options is not valid JSON: {error}") from None
    if not isinstance(options, dict):
        raise ValueError("--storage-options must be a JSON object, e.g. '{\"endpoint_url\": \"http://...\"}'")
    return options


def redact(options: dict[str, Any]) -> dict[str, Any]:
    """A copy safe to log or save: values of secret-looking keys replaced, nested dicts walked."""
    safe: dict[str, Any] = {}
    for name, value in options.items():
        if isinstance(value, dict):
            safe[name] = redact(value)
        elif any(marker in name.lower() for marker in SECRET_MARKERS):
            safe[name] = "<redacted>"
        else:
            safe[name] = value
    return safe


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(filesystem, path within it)`` for a URL or local path."""
    return url_to_fs(url, **(storage_options or {}))


def join(base: str, *names: str) -> str:
    """Join URL components with ``/`` (fsspec URLs always use forward slashes)."""
    return "/".join([base.rstrip("/"), *[n.strip("/") for n in names]])


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def write_whole(url: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write ``data`` so that ``url`` is either absent/old or complete, never partial."""
    fs, path = filesystem(url, storage_options)
    try:
        write_whole_to(fs, path, data)
    except Exception as error:  # noqa: BLE001 - re-raised with the URL named
        raise StorageError(f"could not write {url}: {type(error).__name__}: {error}") from error


def write_whole_to(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """:func:`write_whole` on an open filesystem: temp file + fsync + rename locally (the temp name
    starts with a dot, so listings skip it), one whole-object put elsewhere."""
    if not is_local(fs):
        fs.pipe_file(path, data)
        return
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    temporary = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def read_bytes(url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    fs, path = filesystem(url, storage_options)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise
    except Exception as error:  # noqa: BLE001
        raise StorageError(f"could not read {url}: {type(error).__name__}: {error}") from error


def exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = filesystem(url, storage_options)
    return fs.exists(path)
