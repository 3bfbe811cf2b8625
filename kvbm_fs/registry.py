"""Tier URL schemes, resolved lazily (like fsspec's protocol registry): nothing is imported until used.

A tier URL is ``scheme://location?option=value&...``; options are passed to the
tier class's ``from_options``.  Unknown schemes and unknown options fail loudly.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from .errors import ConfigError, UnknownSchemeError
from .events import EventBus
from .tier import Tier

_REGISTRY: dict[str, str] = {
    "host": "kvbm_fs.tiers.host:HostTier",
    "gpu": "kvbm_fs.tiers.gpu:GpuTier",
    "disk": "kvbm_fs.tiers.disk:DiskTier",
    "file": "kvbm_fs.tiers.disk:DiskTier",
    "peer": "kvbm_fs.tiers.peer:PeerTier",
    "mooncake": "kvbm_fs.tiers.mooncake:MooncakeTier",
}
# Any other scheme fsspec knows (s3, gs, az, memory, ...) is a G4 remote tier, and so is
# "remote+<scheme>://" (e.g. remote+file:///mnt/nfs/kv for a shared filesystem).
REMOTE = "kvbm_fs.tiers.remote:open_remote"


def register_tier(scheme: str, target: str | type, clobber: bool = False) -> None:
    """Register a tier class (or a lazy ``"module:Class"`` string) for ``scheme``."""
    if scheme in _REGISTRY and not clobber and _REGISTRY[scheme] != target:
        raise ValueError(f"scheme {scheme!r} already registered to {_REGISTRY[scheme]}")
    _REGISTRY[scheme] = target if isinstance(target, str) else f"{target.__module__}:{target.__qualname__}"


def known_schemes() -> list[str]:
    return sorted(_REGISTRY)


def tier_class(scheme: str) -> Any:
    """The tier class for ``scheme``, or (for remote schemes) a factory ``open(spec, **common)``."""
    target = _REGISTRY.get(scheme) or (REMOTE if scheme.startswith("remote+") or _fsspec_knows(scheme) else None)
    if target is None:
        raise UnknownSchemeError(
            f"unknown tier scheme {scheme!r}; known schemes: {', '.join(known_schemes())} and any fsspec protocol"
        )
    mod, _, cls = target.partition(":")
    try:
        return getattr(importlib.import_module(mod), cls)
    except ImportError as e:
        raise ConfigError(f"tier scheme {scheme!r} needs an optional dependency: {e}") from e


def _fsspec_knows(scheme: str) -> bool:
    try:
        from fsspec.registry import known_implementations, registry
    except ImportError:
        return False
    return scheme in known_implementations or scheme in registry


@dataclass
class TierSpec:
    """A parsed tier URL: scheme, location (netloc + path) and options."""

    scheme: str
    location: str
    options: dict[str, Any] = field(default_factory=dict)
    url: str = ""

    @classmethod
    def parse(cls, url: str, **options: Any) -> TierSpec:
        if not isinstance(url, str) or "://" not in url:
            raise ConfigError(f"tier URL {_shape(url)!r} must look like scheme://location?option=value")
        parts = urlsplit(url)
        if not parts.scheme:
            raise ConfigError(f"tier URL {_shape(url)!r} has no scheme")
        # '+' stays a plus ("policy=lru+count2"), not a form-encoded space; a space is %20
        opts: dict[str, Any] = dict(parse_qsl(parts.query.replace("+", "%2B"), keep_blank_values=True))
        opts.update(options)
        return cls(parts.scheme.lower(), parts.netloc + parts.path, opts, url)

    def redacted(self) -> str:
        """The URL without credentials or option values that look secret (for logs and repr)."""
        shown = {k: ("***" if _secret(k) else v) for k, v in self.options.items()}
        q = "&".join(f"{k}={v}" for k, v in shown.items())
        loc = self.location.rsplit("@", 1)[-1]
        return f"{self.scheme}://{loc}" + (f"?{q}" if q else "")


def _shape(url: object) -> str:
    """A malformed URL as far as it is safe to echo: no query (options may hold secrets), no userinfo."""
    if not isinstance(url, str):
        return f"<{type(url).__name__}>"
    head = url.split("?", 1)[0]
    return (
        head.rsplit("@", 1)[-1]
        if "://" not in head
        else head.split("://", 1)[0] + "://" + head.split("://", 1)[1].rsplit("@", 1)[-1]
    )


def _secret(key: str) -> bool:
    k = key.lower()
    return any(w in k for w in ("secret", "password", "token", "key", "credential"))


def open_tier(
    spec: TierSpec | str, *, block_nbytes: int, block_size: int | None = None, events: EventBus | None = None
) -> Tier:
    if isinstance(spec, str):
        spec = TierSpec.parse(spec)
    cls: Any = tier_class(spec.scheme)
    opts = dict(spec.options)
    common: dict[str, Any] = dict(block_nbytes=block_nbytes, block_size=block_size, events=events)
    if "name" in opts:
        common["name"] = opts.pop("name")
    try:
        if hasattr(cls, "from_options"):
            return cls.from_options(spec.location, opts, **common)
        return cls(TierSpec(spec.scheme, spec.location, opts, spec.url), **common)
    except TypeError as e:
        raise ConfigError(f"bad option for {spec.redacted()}: {e}") from None
