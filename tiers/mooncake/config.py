"""The ``mooncake://`` URL: where the master is, how this client joins the pool, and the tier's own knobs.

``mooncake://MASTER_HOST:PORT?metadata=...&protocol=tcp|rdma&segment=...&replicas=...`` (every option
and its default: docs/tiers.md#mooncake).  Checked whole at open, so a typo fails at mount, not at
the first put.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, fields
from typing import Any

from kvbm_fs.errors import ConfigError, KvbmError
from kvbm_fs.units import parse_size

DEFAULT_MASTER_PORT = 50051
DEFAULT_METADATA_PORT = 8080  # the master's built-in HTTP metadata server (--enable_http_metadata_server)
DEFAULT_ADMIN_PORT = 9003  # the master's admin/metrics HTTP server (--metrics_port): key listing
PROTOCOLS = ("tcp", "rdma")
_PREFIX = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class MooncakeUnavailableError(KvbmError, ConnectionError):
    """The Mooncake master could not be reached when the tier was opened (setup failed)."""


@dataclass(frozen=True)
class MooncakeConfig:
    master: str  # HOST:PORT of mooncake_master's RPC service
    metadata: str  # the transfer engine's metadata: http://.../metadata, etcd://..., or P2PHANDSHAKE
    admin: str  # HOST:PORT of the master's admin HTTP server (key listing for iter_keys and capacity)
    hostname: str  # this client's address as the other clients reach it (its segment is served there)
    protocol: str = "tcp"
    rdma_devices: str = ""  # e.g. "mlx5_0,mlx5_1" (protocol=rdma); "" lets Mooncake pick
    segment: int = 512 << 20  # DRAM this client lends to the pool (global_segment_size); 0: a pure client
    local_buffer: int = 64 << 20  # Mooncake's own transfer buffer (local_buffer_size)
    staging: int = 0  # bytes of registered host rows per direction; 0: 64 blocks
    replicas: int = 1  # copies Mooncake keeps of each block, on different segments
    prefix: str = "kvbm"  # key prefix: tiers with different prefixes share a master without seeing each other
    capacity: int | None = None  # bound on this prefix's blocks (the tier evicts); None: Mooncake evicts
    breaker_threshold: int = 3
    breaker_cooldown: float = 5.0
    policy: str | None = None  # only its admission filter (+tinylfu, +count2) applies; eviction is Mooncake's
    retain_ttl: float = 86400.0  # s a retained block's soft pin lasts after its last use (the master caps it)

    @classmethod
    def parse(cls, location: str, options: dict[str, Any]) -> MooncakeConfig:
        """``location`` is the URL's ``HOST[:PORT]``; ``options`` its query (strings) or a config table."""
        opts = dict(options)
        host, port = _host_port(location, DEFAULT_MASTER_PORT, "mooncake master")
        known = {f.name for f in fields(cls)} - {"master"}
        unknown = sorted(set(opts) - known)
        if unknown:
            raise ConfigError(
                f"mooncake tier: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        protocol = str(opts.pop("protocol", "tcp")).lower()
        if protocol not in PROTOCOLS:
            raise ConfigError(f"mooncake tier: protocol={protocol!r}; use one of {', '.join(PROTOCOLS)}")
        metadata = str(opts.pop("metadata", f"http://{host}:{DEFAULT_METADATA_PORT}/metadata"))
        if not (metadata == "P2PHANDSHAKE" or re.match(r"^(https?|etcd|redis)://[^/?#\s]+", metadata)):
            raise ConfigError(
                f"mooncake tier: metadata={metadata!r}; use http://HOST:PORT/metadata, etcd://HOST:PORT or P2PHANDSHAKE"
            )
        ahost, aport = _host_port(str(opts.pop("admin", f"{host}:{DEFAULT_ADMIN_PORT}")), None, "admin")
        prefix = str(opts.pop("prefix", "kvbm"))
        if not _PREFIX.fullmatch(prefix):
            raise ConfigError(f"mooncake tier: prefix={prefix!r}; use 1-64 of A-Z a-z 0-9 _ . -")
        hostname = str(opts.pop("hostname", "")) or route_address(host, port)
        sizes = {
            k: parse_size(opts.pop(k), f"mooncake {k}") for k in ("segment", "local_buffer", "staging") if k in opts
        }
        cap = opts.pop("capacity", None)
        capacity = None if cap in (None, "") else parse_size(cap, "mooncake capacity")
        nums: dict[str, Any] = {}
        for k, conv in (("replicas", int), ("breaker_threshold", int), ("breaker_cooldown", float),
                        ("retain_ttl", float)):  # fmt: skip
            if k in opts:
                try:
                    nums[k] = conv(opts.pop(k))
                except (TypeError, ValueError):
                    raise ConfigError(f"mooncake tier option {k}={options[k]!r} is not a number") from None
        if nums.get("replicas", 1) < 1 or nums.get("breaker_threshold", 1) < 1 or nums.get("breaker_cooldown", 0) < 0:
            raise ConfigError("mooncake tier: replicas and breaker_threshold must be >= 1, breaker_cooldown >= 0")
        if not 0.001 <= nums.get("retain_ttl", 1.0) < float("inf"):
            raise ConfigError("mooncake tier: retain_ttl is seconds, at least 0.001")
        rdma_devices = str(opts.pop("rdma_devices", ""))
        policy = opts.pop("policy", None)
        assert not opts, opts
        return cls(f"{host}:{port}", metadata, f"{ahost}:{aport}", hostname, protocol, rdma_devices,
                   prefix=prefix, capacity=capacity, policy=None if policy is None else str(policy), **sizes,
                   **nums)  # fmt: skip

    @property
    def url(self) -> str:
        return f"mooncake://{self.master}?prefix={self.prefix}"


def _host_port(loc: str, default: int | None, what: str) -> tuple[str, int]:
    m = re.fullmatch(r"\[?([A-Za-z0-9_.:-]+?)\]?(?::(\d{1,5}))?/?", loc.strip())
    if not m or (m.group(2) is None and default is None):
        raise ConfigError(f"mooncake tier: {what} address {loc!r} must be HOST:PORT")
    port = int(m.group(2)) if m.group(2) else default
    assert port is not None
    if not 0 < port < 65536:
        raise ConfigError(f"mooncake tier: {what} port {port} is out of range")
    return m.group(1), port


def route_address(host: str, port: int) -> str:
    """The local address this machine reaches ``host`` from (no packet is sent): what the other
    clients should dial for this client's segment. Loopback masters give 127.0.0.1."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, port))
            return str(s.getsockname()[0])
    except OSError:
        return "127.0.0.1"
