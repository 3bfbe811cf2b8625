"""mount(): tier URLs, config files (TOML, YAML, JSON), KVBM_FS_* variables, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import LAYOUT

from kvbm_fs import CapacityError, ConfigError, KVLayout, UnknownSchemeError, mount
from kvbm_fs.registry import TierSpec, known_schemes, register_tier, tier_class
from kvbm_fs.units import parse_size

LAYOUT_DICT = LAYOUT.to_dict()


def test_mount_from_urls() -> None:
    with mount("gpu://cpu?capacity=64KiB", "host://?capacity=1MiB", layout=LAYOUT, env={}) as s:
        assert [t.name for t in s.tiers] == ["gpu", "host"]
        assert s.tier("gpu").capacity_bytes == 64 * 1024
        assert s.tier("host").capacity_bytes == 1024 * 1024


def test_mount_from_toml(tmp_path: Path) -> None:
    cfg = tmp_path / "kvbm.toml"
    cfg.write_text(
        'model = "llama"\ntenant = "acme"\ntiers = ["host://?capacity=256KiB", {url = "host://", capacity = "128KiB"}]\n'
        "[layout]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in LAYOUT_DICT.items())
    )
    with mount(config=cfg, env={}) as s:
        assert s.default_namespace is not None
        assert s.default_namespace.model == "llama" and s.default_namespace.tenant == "acme"
        assert [t.name for t in s.tiers] == ["host", "host1"]
        assert s.tiers[1].capacity_bytes == 128 * 1024


def test_mount_from_yaml(tmp_path: Path) -> None:
    pytest.importorskip("yaml")
    cfg = tmp_path / "kvbm.yaml"
    cfg.write_text(
        "model: m\ntiers:\n  - host://?capacity=64KiB\nlayout:\n"
        + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in LAYOUT_DICT.items())
    )
    with mount(config=cfg, env={}) as s:
        assert s.tiers[0].capacity_bytes == 64 * 1024


def test_mount_from_environment(tmp_path: Path) -> None:
    env = {
        "KVBM_FS_TIERS": "gpu://cpu?capacity=64KiB, host://?capacity=128KiB",
        "KVBM_FS_LAYOUT": json.dumps(LAYOUT_DICT),
        "KVBM_FS_MODEL": "env-model",
        "KVBM_FS_RANK": "1",
        "KVBM_FS_WORLD_SIZE": "2",
    }
    with mount(env=env) as s:
        ns = s.default_namespace
        assert ns is not None and (ns.model, ns.rank, ns.world_size) == ("env-model", 1, 2)
        assert [t.name for t in s.tiers] == ["gpu", "host"]


def test_precedence_args_over_file_over_env(tmp_path: Path) -> None:
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"model": "from-file", "layout": LAYOUT_DICT, "tiers": ["host://?capacity=64KiB"]}))
    env = {"KVBM_FS_MODEL": "from-env", "KVBM_FS_CONFIG": str(cfg)}
    with mount(env=env) as s:
        assert s.default_namespace is not None and s.default_namespace.model == "from-file"
    with mount(env=env, model="from-arg") as s:
        assert s.default_namespace is not None and s.default_namespace.model == "from-arg"


@pytest.mark.parametrize(
    ("url", "error", "match"),
    [
        ("nope://x", UnknownSchemeError, "unknown tier scheme 'nope'.*known schemes"),
        ("host:/capacity=1", ConfigError, "must look like scheme://"),
        ("host://?capacity=1KiB", CapacityError, "smaller than one"),
        ("gpu://cpu?capacity=100", CapacityError, "smaller than one"),
        ("host://?capacity=lots", CapacityError, "not a size"),
        ("host://?capacity=1GiB&colour=blue", ConfigError, "colour"),
        ("host://?capacity=1MiB&pin=maybe", ConfigError, "boolean"),
        ("host://?capacity=1MiB&policy=clairvoyant", ConfigError, "unknown eviction policy"),
    ],
)
def test_bad_tier_urls_name_the_problem(url: str, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        mount(url, layout=LAYOUT, env={})


def test_bad_config_files_name_the_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("tiers = [unterminated")
    with pytest.raises(ConfigError, match="not valid TOML"):
        mount(config=bad, env={})
    with pytest.raises(ConfigError, match="cannot read config file"):
        mount(config=tmp_path / "missing.toml", env={})
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['tires'\]"):
        mount(config={"tires": ["host://"], "layout": LAYOUT_DICT}, env={})
    with pytest.raises(ConfigError, match="no KV layout"):
        mount("host://?capacity=1MiB", env={})
    with pytest.raises(ConfigError, match="block_size must be a power of two"):
        mount("host://", layout={**LAYOUT_DICT, "block_size": 24}, env={})
    with pytest.raises(ConfigError, match="unknown KVLayout field"):
        mount("host://", layout={**LAYOUT_DICT, "heads": 3}, env={})
    with pytest.raises(ConfigError, match="rank must be an integer"):
        mount("host://", layout=LAYOUT, config={"rank": "zero"}, env={})
    with pytest.raises(ConfigError, match="KVBM_FS_RANK"):
        mount("host://", layout=LAYOUT, env={"KVBM_FS_RANK": "x"})
    with pytest.raises(ConfigError, match="KVBM_FS_LAYOUT must be a JSON object"):
        mount("host://", env={"KVBM_FS_LAYOUT": "{not json"})
    with pytest.raises(ConfigError, match="tiers must be a non-empty list"):
        mount(config={"tiers": [], "layout": LAYOUT_DICT}, env={})


def test_gpu_tier_on_a_machine_without_cuda_is_a_clear_error() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        mount("gpu://cuda:0?capacity=1MiB", layout=LAYOUT, env={})


def test_registry_is_lazy_and_extensible() -> None:
    assert {"gpu", "host"} <= set(known_schemes())
    with pytest.raises(ValueError, match="already registered"):
        register_tier("host", "somewhere.else:Tier")
    register_tier("hostcopy", "kvbm_fs.tiers.host:HostTier")
    assert tier_class("hostcopy").__name__ == "HostTier"
    with mount("hostcopy://?capacity=64KiB", layout=LAYOUT, env={}) as s:
        assert s.tiers[0].medium.value == "host"


def test_secrets_are_redacted_from_tier_urls() -> None:
    spec = TierSpec.parse("s3://AKIAXXX:hunter2@bucket/prefix?secret_access_key=hunter2&endpoint_url=http://x")
    shown = spec.redacted()
    assert "hunter2" not in shown and "AKIAXXX" not in shown
    assert "bucket/prefix" in shown and "endpoint_url=http://x" in shown


@pytest.mark.parametrize(
    ("text", "n"), [("4096", 4096), ("8GiB", 8 << 30), ("100GB", 10**11), ("1.5MiB", 1572864), (512, 512)]
)
def test_parse_size(text: str | int, n: int) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize("bad", ["", "-1", "1XB", "GiB", True, -5])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(CapacityError):
        parse_size(bad)  # type: ignore[arg-type]


def test_layout_from_mount_accepts_dataclass_and_dict() -> None:
    for lay in (LAYOUT, LAYOUT_DICT):
        with mount("host://?capacity=64KiB", layout=lay, env={}) as s:
            assert s.default_namespace is not None and s.default_namespace.layout == KVLayout(**LAYOUT_DICT)


def test_kvbm_fs_events_takes_an_endpoint_or_a_json_table() -> None:
    from kvbm_fs.config import resolve
    from kvbm_fs.kv_events import publisher_of

    assert resolve(env={"KVBM_FS_EVENTS": "tcp://*:5557"}).events == {"endpoint": "tcp://*:5557"}
    assert resolve(env={"KVBM_FS_EVENTS": ""}).events is None  # set but empty: no events
    assert resolve(env={"KVBM_FS_EVENTS": "tcp://*:5557"}, events=False).events is None  # an argument wins
    with pytest.raises(ConfigError, match="KVBM_FS_EVENTS must be an endpoint or a JSON object"):
        resolve(env={"KVBM_FS_EVENTS": '{"endpoint": '})
    with pytest.raises(ConfigError, match="unknown \\[events\\] option"):
        mount("host://?capacity=64KiB", layout=LAYOUT, env={"KVBM_FS_EVENTS": '{"port": 5}'})
    table = {"endpoint": "tcp://127.0.0.1:0", "bind": True, "topic": "from-env"}
    with mount("host://?capacity=64KiB", layout=LAYOUT, env={"KVBM_FS_EVENTS": json.dumps(table)}) as s:
        pub = publisher_of(s)
        assert pub is not None and pub.config.topic == "from-env" and pub.endpoint.startswith("tcp://127.0.0.1:")
