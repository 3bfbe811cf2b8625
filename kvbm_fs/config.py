"""Where a store's configuration comes from: arguments, a TOML/YAML file, or ``KVBM_FS_*`` variables.

Precedence: explicit arguments, then the config file (argument or ``KVBM_FS_CONFIG``),
then the other environment variables, then embedded defaults.  Every malformed
value raises :class:`ConfigError` naming the key and what was expected.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .keys import Namespace
from .layout import KVLayout

ENV_PREFIX = "KVBM_FS_"
DEFAULT_TIERS = ("host://?capacity=1GiB",)
_KEYS = {"model", "layout", "tiers", "tenant", "rank", "world_size", "policy", "hash_scheme", "daemon", "cost"}
_KEYS |= {"metrics_port", "metrics_host"}
_KEYS |= {"events"}  # [events]: KV events for routers (kvbm_fs.kv_events)


@dataclass
class StoreConfig:
    model: str = "default"
    layout: KVLayout | None = None
    tiers: list[Any] = field(default_factory=lambda: list(DEFAULT_TIERS))
    tenant: str = ""
    rank: int = 0
    world_size: int = 1
    policy: str = "default"
    hash_scheme: str = "kvbm-v1"
    daemon: bool | dict[str, Any] = False  # true or a [daemon] table: run the placement daemon
    cost: dict[str, Any] = field(default_factory=dict)  # [cost] table: prefill_tokens_per_s, latency, bandwidth
    metrics_port: int | None = None  # serve Prometheus /metrics here (0: any free port); None: no server
    metrics_host: str = "127.0.0.1"
    events: dict[str, Any] | None = None  # [events] table: publish KV events for routers (kvbm_fs.kv_events)

    def namespace(self) -> Namespace:
        if self.layout is None:
            raise ConfigError("no KV layout configured: pass layout=..., a [layout] table, or KVBM_FS_LAYOUT")
        return Namespace(self.model, self.layout, self.rank, self.world_size, self.tenant, self.hash_scheme)


def load_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror}") from None
    if p.suffix in (".yaml", ".yml"):
        return _yaml(p, text)
    if p.suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"config file {p} is not valid JSON: {e}") from None
    else:
        try:
            data = tomllib.loads(text.decode())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {p} is not valid TOML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a table/mapping at top level")
    return data


def _yaml(p: Path, text: bytes) -> dict[str, Any]:
    try:
        import yaml
    except ImportError:
        raise ConfigError(f"{p} is YAML; install PyYAML (pip install 'kvbm-fs[yaml]') or use TOML") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at top level")
    return data


def from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("model", "tenant", "policy", "hash_scheme", "metrics_host"):
        if ENV_PREFIX + key.upper() in env:
            out[key] = env[ENV_PREFIX + key.upper()]
    for key in ("rank", "world_size", "metrics_port"):
        name = ENV_PREFIX + key.upper()
        if name in env:
            try:
                out[key] = int(env[name])
            except ValueError:
                raise ConfigError(f"{name}={env[name]!r} is not an integer") from None
    if ENV_PREFIX + "TIERS" in env:
        out["tiers"] = [u for u in env[ENV_PREFIX + "TIERS"].replace(",", " ").split() if u]
    if ENV_PREFIX + "EVENTS" in env:
        out["events"] = events_text(env[ENV_PREFIX + "EVENTS"], ENV_PREFIX + "EVENTS")
    if ENV_PREFIX + "LAYOUT" in env:
        try:
            out["layout"] = json.loads(env[ENV_PREFIX + "LAYOUT"])
        except ValueError as e:
            raise ConfigError(f"{ENV_PREFIX}LAYOUT must be a JSON object: {e}") from None
    return out


def resolve(
    *,
    config: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    **explicit: Any,
) -> StoreConfig:
    env = os.environ if env is None else env
    merged: dict[str, Any] = from_env(env)
    cfg_src = config if config is not None else env.get(ENV_PREFIX + "CONFIG")
    if cfg_src is not None:
        merged.update(dict(cfg_src) if isinstance(cfg_src, Mapping) else load_file(cfg_src))
    merged.update({k: v for k, v in explicit.items() if v is not None})
    unknown = set(merged) - _KEYS
    if unknown:
        raise ConfigError(f"unknown config key(s) {sorted(unknown)}; known: {sorted(_KEYS)}")
    return _build(merged)


def _build(d: dict[str, Any]) -> StoreConfig:
    cfg = StoreConfig()
    for k, v in d.items():
        if k == "layout":
            v = v if isinstance(v, KVLayout) else _layout(v)
        elif k == "tiers":
            v = _tiers(v)
        elif k in ("rank", "world_size", "metrics_port") and (isinstance(v, bool) or not isinstance(v, int)):
            raise ConfigError(f"config {k} must be an integer, got {v!r}")
        elif k in ("model", "tenant", "policy", "hash_scheme", "metrics_host") and not isinstance(v, str):
            raise ConfigError(f"config {k} must be a string, got {v!r}")
        elif k == "daemon" and not isinstance(v, (bool, Mapping)):
            raise ConfigError(f"config daemon must be true/false or a table of daemon options, got {v!r}")
        elif k == "events":
            v = _events(v)
        elif k == "cost" and not isinstance(v, Mapping):
            raise ConfigError(f"config cost must be a table (prefill_tokens_per_s, latency, bandwidth), got {v!r}")
        setattr(cfg, k, v)
    return cfg


def events_text(raw: str, what: str) -> Any:
    """``KVBM_FS_EVENTS`` / ``--events``: an endpoint (``tcp://*:5557``), a JSON table, or "" for none."""
    raw = raw.strip()
    if not raw.startswith("{"):
        return raw or None
    try:
        return json.loads(raw)
    except ValueError as e:
        raise ConfigError(f"{what} must be an endpoint or a JSON object of [events] options: {e}") from None


def _events(v: Any) -> dict[str, Any] | None:
    if v is None or v is False:
        return None
    if isinstance(v, str):
        v = {"endpoint": v}
    if not isinstance(v, Mapping):
        raise ConfigError(f"config events must be a table (endpoint, replay_endpoint, topic, ...), got {v!r}")
    return dict(v)


def _layout(v: Any) -> KVLayout:
    if not isinstance(v, Mapping):
        raise ConfigError(f"config layout must be a table of KVLayout fields, got {type(v).__name__}")
    return KVLayout.from_dict(dict(v))


def _tiers(v: Any) -> list[Any]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not v:
        raise ConfigError("config tiers must be a non-empty list of URLs or {url=..., ...} tables")
    for t in v:
        if not (isinstance(t, str) or (isinstance(t, Mapping) and isinstance(t.get("url"), str))):
            what = f"a table with keys {sorted(t)}" if isinstance(t, Mapping) else type(t).__name__
            raise ConfigError(f"each tier must be a URL string or a table with a 'url', got {what}")
    return list(v)
