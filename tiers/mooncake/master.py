"""Running a ``mooncake_master`` (the binary ships in the Mooncake wheel) and asking its admin server.

:class:`MooncakeMaster` starts one on 127.0.0.1 with free ports, its HTTP metadata server built in:
what the tests, the benchmark and a single-machine user need.  A cluster runs the master as a
service of its own (docs/tiers.md#mooncake).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from kvbm_fs.errors import ConfigError


def master_binary() -> str:
    """The ``mooncake_master`` inside the installed wheel (the ``mooncake`` extra)."""
    import importlib.util

    spec = importlib.util.find_spec("mooncake")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("mooncake_master needs the mooncake extra: pip install 'kvbm-fs[mooncake]'")
    for d in spec.submodule_search_locations:
        p = Path(d) / "mooncake_master"
        if p.is_file():
            return str(p)
    raise ConfigError("the installed mooncake package has no mooncake_master binary")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def list_keys(admin: str, prefix: str, timeout: float = 5.0) -> list[str]:
    """Every key the master holds under ``prefix/`` (its ``/get_all_keys``, one key per line)."""
    with urllib.request.urlopen(f"http://{admin}/get_all_keys", timeout=timeout) as r:
        text = r.read().decode()
    head = prefix + "/"
    return [k for k in text.split() if k.startswith(head)]


class MooncakeMaster:
    """A ``mooncake_master`` child process on 127.0.0.1: RPC, HTTP metadata and admin on free ports.

    ``kill()`` (SIGKILL, as a crash) and ``start()`` again on the same ports model a master that dies
    and returns; it keeps no state, so a restarted master holds no keys."""

    def __init__(self, *, lease_ms: int = 10_000, extra: list[str] | None = None, log: Path | None = None) -> None:
        self.rpc_port, self.metadata_port, self.admin_port = free_ports(3)
        self.lease_ms, self.extra, self.log = lease_ms, list(extra or []), log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The tier URL for this master (add options with ``&``)."""
        return f"mooncake://127.0.0.1:{self.rpc_port}?metadata={self.metadata}&admin=127.0.0.1:{self.admin_port}"

    @property
    def metadata(self) -> str:
        return f"http://127.0.0.1:{self.metadata_port}/metadata"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.rpc_port}"

    def start(self, timeout: float = 20.0) -> MooncakeMaster:
        cmd = [master_binary(), "--rpc_address=127.0.0.1", f"--rpc_port={self.rpc_port}",
               "--enable_http_metadata_server=true", "--http_metadata_server_host=127.0.0.1",
               f"--http_metadata_server_port={self.metadata_port}", "--metrics_host=127.0.0.1",
               f"--metrics_port={self.admin_port}", f"--default_kv_lease_ttl={self.lease_ms}",
               "--rpc_thread_num=2", *self.extra]  # fmt: skip
        out: Any = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=_die_with_parent)  # fmt: skip
        if out is not subprocess.DEVNULL:
            out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mooncake_master exited with {self.proc.returncode} ({' '.join(cmd)})")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/health", timeout=1) as r:
                    if r.status == 200 and _port_open(self.rpc_port) and _port_open(self.metadata_port):
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"mooncake_master did not come up in {timeout} s")

    def kill(self) -> None:
        """SIGKILL, as a crash (no goodbye to the clients)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def __enter__(self) -> MooncakeMaster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _die_with_parent() -> None:
    """In the child: SIGKILL when the parent dies (Linux PR_SET_PDEATHSIG), so that a test run killed
    by a timeout leaves no master behind."""
    import ctypes

    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False
