"""What ``kv_connector_extra_config`` may say, checked once at start-up (a typo fails the engine, not a request)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kvbm_fs import ConfigError
from kvbm_fs.config import resolve

EXTRA_KEYS = frozenset(
    {
        "tiers",
        "config",
        "model",
        "tenant",
        "policy",
        "daemon",
        "cost",
        "layout",
        "write_through",
        "async_load",
        "async_save",
        "max_inflight_save_bytes",
        "events",
    }
)
STAGE_BYTES = 256 << 20  # host staging buffer per load/save batch (read at start-up: tests shrink it)


def store_config(extra: Mapping[str, Any]) -> Any:
    """The kvbm_fs StoreConfig for this connector: extra config, then its ``config`` file, then env."""
    unknown = set(extra) - EXTRA_KEYS
    if unknown:
        raise ConfigError(
            f"kvbm_fs: unknown kv_connector_extra_config key(s) {sorted(unknown)}; known: {sorted(EXTRA_KEYS)}"
        )
    explicit = {k: extra[k] for k in ("tiers", "tenant", "policy", "daemon", "cost", "layout", "events") if k in extra}
    return resolve(config=extra.get("config"), **explicit)


@dataclass(frozen=True)
class Options:
    """The connector's own switches (the store's come from ``store_config``)."""

    write_through: bool = False
    async_load: bool | str = "auto"
    async_save: bool = True
    max_inflight_save_bytes: int = STAGE_BYTES
    stage_bytes: int = STAGE_BYTES

    @classmethod
    def parse(cls, extra: Mapping[str, Any], *, producer: bool = False) -> Options:
        # a P/D producer answers after one token: a save still in the background then races the
        # decode engine's lookup, so a producer saves synchronously unless told otherwise
        return cls(
            write_through=bool(extra.get("write_through", False)),
            async_load=_auto_flag(extra, "async_load"),
            async_save=_flag(extra, "async_save", not producer),
            max_inflight_save_bytes=_size(extra, "max_inflight_save_bytes", STAGE_BYTES),
            stage_bytes=STAGE_BYTES,
        )


def _auto_flag(extra: Mapping[str, Any], key: str) -> bool | str:
    """``"auto"`` (the default) or a boolean."""
    v = extra.get(key, "auto")
    return "auto" if isinstance(v, str) and v.lower() == "auto" else _flag(extra, key, True)


def _flag(extra: Mapping[str, Any], key: str, default: bool) -> bool:
    v = extra.get(key, default)
    if isinstance(v, str) and v.lower() in ("0", "1", "true", "false"):
        return v.lower() in ("1", "true")
    if not isinstance(v, bool):
        raise ConfigError(f"kvbm_fs: kv_connector_extra_config.{key} must be true or false, not {v!r}")
    return v


def _size(extra: Mapping[str, Any], key: str, default: int) -> int:
    from kvbm_fs.units import parse_size

    v = extra.get(key, default)
    try:
        n = parse_size(v)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"kvbm_fs: kv_connector_extra_config.{key}: {e}") from None
    if n < 0:
        raise ConfigError(f"kvbm_fs: kv_connector_extra_config.{key} must not be negative")
    return n


__all__ = ["EXTRA_KEYS", "STAGE_BYTES", "Options", "store_config"]
