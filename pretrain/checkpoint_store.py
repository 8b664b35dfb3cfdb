"""A checkpoint root on a local path or any fsspec URL (``s3://bucket/prefix``): listing, whole-file
writes, moves/uploads, downloads, removal. The checkpointer (``pretrain.checkpoint``) decides *what*
is written and in which order; this module only knows *how* on each kind of storage.

Every file becomes visible whole: local files are renamed into place (``os.replace``), objects are
uploaded with one PUT (multipart uploads become visible only when completed). Object-store listings
are cached by s3fs, so every query that must see other processes' writes invalidates the cache first.

Object stores go away for a while (an endpoint restarted, a network blip): botocore already retries a
refused connection for a few seconds; on top of that every upload and write here is retried for up to
``retry_s`` seconds (exponential backoff) when the error is a connection error, then raised. Errors
that are not transient (permissions, a missing bucket) are raised at once.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from data_pipeline.storage import filesystem, is_local, write_whole_to

TAG_PATTERN = re.compile(r"^step-(\d{9})$")
COMPLETE = "COMPLETE"
RETRY_S = 120.0  # how long an object-store write keeps retrying connection errors

log = logging.getLogger("diffdis.checkpoint")


def is_transient(error: BaseException) -> bool:
    """A connection-level failure (refused, reset, timed out) anywhere in the exception's chain:
    worth retrying, unlike permission or missing-bucket errors."""
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError  # noqa: PLC0415
    except ImportError:  # no S3 support installed
        BotoConnectionError = ConnectionError  # noqa: N806
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (BotoConnectionError, ConnectionError, TimeoutError)):
            return True
        error = error.__cause__ or error.__context__
    return False


class CheckpointStore:
    def __init__(self, url: str | Path, storage_options: dict[str, Any] | None = None, retry_s: float = RETRY_S):
        self.url = str(url).rstrip("/")
        self.fs, self.root = filesystem(self.url, storage_options)
        self.local = is_local(self.fs)
        self.retry_s = retry_s
        if self.local:
            self.root = os.path.abspath(self.root)

    def __repr__(self) -> str:
        return f"CheckpointStore({self.url!r})"

    def path(self, *parts: str) -> str:
        """Path inside the filesystem (what fsspec calls take)."""
        return posixpath.join(self.root, *parts) if parts else self.root

    def display(self, *parts: str) -> str:
        """The URL to show in logs and errors (no credentials: those live in storage options)."""
        return "/".join([self.url, *parts]) if parts else self.url

    def local_path(self, *parts: str) -> Path:
        if not self.local:
            raise ValueError(f"{self.url} is not on the local filesystem")
        return Path(self.path(*parts))

    def _fresh(self, path: str) -> None:
        if not self.local:
            self.fs.invalidate_cache(path)

    def _retrying(self, what: str, call: Callable[[], Any]) -> Any:
        """``call()``, retried on transient errors for up to :attr:`retry_s` seconds (object stores)."""
        deadline, delay = time.monotonic() + self.retry_s, 0.5
        while True:
            try:
                return call()
            except Exception as error:  # noqa: BLE001 - re-raised unless transient and time is left
                if self.local or not is_transient(error) or time.monotonic() + delay > deadline:
                    raise
                log.warning("%s failed (%s: %s); retrying in %.1f s", what, type(error).__name__, error, delay)
                time.sleep(delay)
                delay = min(2 * delay, 15.0)

    # -- queries -----------------------------------------------------------------------------------
    def tags(self) -> list[str]:
        """Step directories (complete or not), oldest first."""
        self._fresh(self.root)
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        names = {posixpath.basename(str(e).rstrip("/")) for e in entries}
        return sorted((n for n in names if TAG_PATTERN.match(n)), key=lambda n: int(TAG_PATTERN.match(n).group(1)))

    def exists(self, *parts: str) -> bool:
        path = self.path(*parts)
        self._fresh(posixpath.dirname(path))
        return self.fs.exists(path)

    def is_complete(self, tag: str) -> bool:
        return self.exists(tag, COMPLETE)

    def complete_tags(self) -> list[str]:
        return [t for t in self.tags() if self.is_complete(t)]

    def read_text(self, *parts: str) -> str:
        path = self.path(*parts)
        self._fresh(posixpath.dirname(path))
        return self.fs.cat_file(path).decode()

    def files(self, tag: str) -> list[str]:
        """Paths of every file under ``tag``, relative to it."""
        base = self.path(tag)
        self._fresh(base)
        return sorted(posixpath.relpath(str(p), base) for p in self.fs.find(base))

    # -- writes ------------------------------------------------------------------------------------
    def write_text(self, text: str, *parts: str) -> None:
        """Whole-object write: temp + rename locally, one PUT on object stores."""
        self._retrying(f"writing {self.display(*parts)}", lambda: write_whole_to(self.fs, self.path(*parts), text.encode()))

    def put(self, source: Path, *parts: str) -> None:
        """Move (local: a rename when on the same filesystem) or upload ``source`` to ``parts``."""
        path = self.path(*parts)
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                os.replace(source, path)
            except OSError:  # another filesystem: copy beside the target, then rename
                temporary = f"{path}.{uuid.uuid4().hex}.tmp"
                shutil.copyfile(source, temporary)
                os.replace(temporary, path)
                os.remove(source)
        else:
            self._retrying(f"uploading {source} to {self.display(*parts)}", lambda: self.fs.put_file(str(source), path))

    def remove(self, tag: str) -> None:
        path = self.path(tag)
        if self.local:
            shutil.rmtree(path, ignore_errors=True)
        elif self.exists(tag):
            self.fs.rm(path, recursive=True)

    def download(self, tag: str, destination: Path) -> None:
        """Copy every file of ``tag`` into ``destination`` (a local directory)."""
        for relative in self.files(tag):
            target = destination / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(self.path(tag, relative), str(target))
