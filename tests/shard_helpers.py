"""Test data for the shard pipeline: tiny distinct images, broken files, a loopback image server,
and a gated scorer hook that makes "stop mid-run" deterministic."""

from __future__ import annotations

import io
import os
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image


def jpeg(seed: int, size: tuple[int, int] = (16, 16)) -> bytes:
    """A distinct small JPEG per seed (random noise, so no two collide after resizing)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def huge_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG that only *declares* width x height (signature, IHDR, IEND): a decompression-bomb header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def corrupt_jpeg() -> bytes:
    """A JPEG's first bytes followed by garbage: Pillow cannot identify it."""
    return jpeg(999)[:30] + bytes(np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8))


def truncated_jpeg() -> bytes:
    data = jpeg(998)
    return data[: len(data) // 2]


def write_folder(root: Path, count: int, start: int = 0) -> Path:
    """``count`` images ``img-NNN.jpg`` with ``img-NNN.txt`` captions."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + count):
        (root / f"img-{i:03d}.jpg").write_bytes(jpeg(i))
        (root / f"img-{i:03d}.txt").write_text(f"a picture of noise number {i}")
    return root


class ImageServer:
    """``ThreadingHTTPServer`` on 127.0.0.1 serving ``files`` (path → bytes); ``/slow/...`` paths
    sleep ``slow_s`` before answering; anything else is 404."""

    def __init__(self, files: dict[str, bytes], slow_s: float = 3.0) -> None:
        self.files = files
        self.slow_s = slow_s
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                if self.path.startswith("/slow/"):
                    time.sleep(server.slow_s)
                data = server.files.get(self.path.replace("/slow/", "/", 1))
                try:
                    if data is None:
                        self.send_error(404)
                        return
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout): expected for /slow/

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> "ImageServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def gated_score(image, sample, gate: str, from_unit: int = 1, timeout_s: float = 120.0) -> float:
    """Scorer hook: samples of units >= ``from_unit`` wait until the file ``gate`` exists.

    Lets a test stop storage or kill the job after shard 0 is written and before shard 1 is,
    without depending on timing."""
    if int(sample["key"][:5]) >= from_unit:
        deadline = time.monotonic() + timeout_s
        while not os.path.exists(gate):
            if time.monotonic() > deadline:
                raise TimeoutError(f"gate {gate} never opened")
            time.sleep(0.05)
    return 1.0


def brightness_score(image, sample) -> float:
    """Scorer hook: mean pixel value in [0, 1]."""
    return float(np.asarray(image, dtype=np.float64).mean() / 255.0)


def read_tree(fs, root: str) -> dict[str, bytes]:
    """``{relative name: bytes}`` of every object under ``root`` (temp files would show up here too)."""
    fs.invalidate_cache()
    return {path[len(root.rstrip("/")) + 1:]: fs.cat_file(path) for path in sorted(fs.find(root))}
