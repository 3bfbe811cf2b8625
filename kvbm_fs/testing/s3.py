"""A real S3 protocol server for tests and benchmarks: moto's server on 127.0.0.1, on a free port.

Never an in-process mock of s3fs: clients talk HTTP to it exactly as to AWS.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Any

ACCESS_KEY = "kvbm-test-access-key"
SECRET_KEY = "kvbm-test-secret-do-not-log"
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class MotoS3:
    server: Any
    port: int

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def storage_options(self, endpoint: str | None = None) -> dict[str, Any]:
        return {"key": ACCESS_KEY, "secret": SECRET_KEY, "endpoint_url": endpoint or self.endpoint,
                "client_kwargs": {"region_name": REGION}}  # fmt: skip

    def client(self, endpoint: str | None = None) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=endpoint or self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name=REGION)  # fmt: skip

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)  # s3fs's mkdir fails on moto (location constraint)
        return name

    def stop(self) -> None:
        self.server.stop()


def start_moto() -> MotoS3:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return MotoS3(server, port)
        except OSError:
            time.sleep(0.05)
    server.stop()
    raise RuntimeError("moto server did not start")
