"""A real S3-compatible HTTP server on 127.0.0.1 for the tests (moto in server mode).

The server runs as its own process (``python -m moto.server``), so the code under test talks
to it over HTTP exactly as it would to a cloud bucket: through boto3 and mosaicml-streaming's
storage layer, configured by the environment variables streaming already reads
(``S3_ENDPOINT_URL`` and the usual AWS ones). Subprocesses launched by a test (the CLI,
torchrun workers) inherit those variables through :func:`S3Server.env`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

# Dummy credentials: moto accepts any; they keep boto3 from looking for real ones.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    """A running moto server; ``endpoint`` is its URL."""

    process: subprocess.Popen
    endpoint: str
    log_path: str = ""
    _client: object = field(default=None, repr=False)

    def env(self, base: dict | None = None) -> dict:
        """``base`` (default: this process's environment) plus the endpoint and credentials."""
        env = dict(os.environ if base is None else base)
        env.update(CREDENTIALS, S3_ENDPOINT_URL=self.endpoint)
        return env

    @property
    def client(self):
        if self._client is None:
            import boto3

            self._client = boto3.client("s3", endpoint_url=self.endpoint,
                                        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                                        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                                        region_name=CREDENTIALS["AWS_DEFAULT_REGION"])
        return self._client

    def new_bucket(self, prefix: str = "soda") -> str:
        """Create an empty bucket with a unique name and return it."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client.create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        out = []
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            out += [obj["Key"] for obj in page.get("Contents", [])]
        return sorted(out)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.log_path:
            Path(self.log_path).unlink(missing_ok=True)


def start_s3_server(timeout_s: float = 60.0) -> S3Server:
    """Start ``moto.server`` on a free loopback port and wait until it answers."""
    port = _free_port()
    # The server logs every request on stderr: into a file, never an unread pipe (a full pipe
    # blocks the server's next log line, and with it every request).
    log = tempfile.NamedTemporaryFile(prefix="moto-server-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, **CREDENTIALS},
    )
    log.close()
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = Path(log.name).read_text(errors="replace")
            raise RuntimeError(f"moto server exited with code {proc.returncode}: {err[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError(f"moto server did not listen on {endpoint} within {timeout_s} s")
    server = S3Server(proc, endpoint, log.name)
    server.client.list_buckets()  # answers over HTTP
    return server


@contextmanager
def serving():
    """A started server whose endpoint and dummy credentials are in this process's environment
    (which mosaicml-streaming and boto3 read) until the block ends; then the old values return."""
    server = start_s3_server()
    saved = {k: os.environ.get(k) for k in [*CREDENTIALS, "S3_ENDPOINT_URL"]}
    os.environ.update(server.env({}))
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
