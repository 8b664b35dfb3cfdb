"""A moto S3 server on loopback that tests can stop and restart on the same port."""

from __future__ import annotations

import fsspec
import requests
import s3fs

BUCKET = "diffdis-test"


class S3Endpoint:
    def __init__(self, server_class) -> None:
        self.server_class = server_class
        self.port = 0
        self.server = None
        self.bucket = BUCKET

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.server = self.server_class(ip_address="127.0.0.1", port=self.port)
        self.server.start()
        self.port = self.server._server.server_port  # port=0 picks a free one; keep it for restarts

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def environment(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": "testing-key-id",
            "AWS_SECRET_ACCESS_KEY": "testing-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def create_bucket(self) -> None:
        """Start from an empty store (another module's server may have left buckets in moto's
        process-wide state), then make the test bucket."""
        self.reset()
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir(self.bucket)

    def reset(self) -> None:
        """Forget every bucket and object: moto keeps them in this process, not in the server, so
        without a reset the next test would find this one's data (and its bucket) still there."""
        if self.server is None:
            self.start()
        requests.post(f"{self.url}/moto-api/reset", timeout=10)
        s3fs.S3FileSystem.clear_instance_cache()
