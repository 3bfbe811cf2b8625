"""The Kubernetes manifests in deploy/, checked offline: built-in objects against the Kubernetes
schemas (kubernetes-validate, strict), ServiceMonitors against the CRD schema kept in
deploy/schemas/, kustomization.yaml files against the tree, and every kvbm_fs command, flag,
config key, environment variable and tier URL they use against kvbm_fs itself.

``python tests/test_deploy.py`` rewrites deploy/monitoring/grafana-dashboard.yaml from
docs/grafana/kvbm_fs.json.
"""

from __future__ import annotations

import argparse
import ast
import copy
import importlib.util
import inspect
import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import jsonschema
import kubernetes_validate
import pytest
import yaml

from kvbm_fs.cli import main as kvbm_main
from kvbm_fs.config import from_env, resolve
from kvbm_fs.daemon import DaemonConfig
from kvbm_fs.registry import TierSpec, known_schemes, tier_class
from kvbm_fs.serve import HEALTH_PATH
from kvbm_fs.tiers.peer.wire import TOKEN_ENV

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = "1.33.0"  # a version kubernetes-validate ships; native sidecars (restartPolicy on init containers) are GA
DASHBOARD = ROOT / "docs" / "grafana" / "kvbm_fs.json"
DASHBOARD_CM = DEPLOY / "monitoring" / "grafana-dashboard.yaml"
EXTRAS = [DEPLOY / "secrets" / "secrets.example.yaml", DEPLOY / "storage" / "local-nvme.yaml"]  # applied by hand
SECRETISH = ("secret", "token", "password", "key", "credential")


def _load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _listed(kfile: Path) -> Iterator[Path]:
    """Every file a kustomization.yaml names (resources, recursively through folders, generators' files)."""
    k = yaml.safe_load(kfile.read_text())
    for r in k.get("resources", []):
        p = kfile.parent / r
        yield p
        if p.is_dir():
            yield from _listed(p / "kustomization.yaml")
    for gen in (*k.get("configMapGenerator", []), *k.get("secretGenerator", [])):
        for f in gen.get("files", []):
            yield kfile.parent / f.split("=", 1)[-1]


def _manifests() -> list[Path]:
    return [p for p in _listed(DEPLOY / "kustomization.yaml") if p.is_file()] + EXTRAS


def _objects() -> list[dict[str, Any]]:
    return [d for p in _manifests() for d in _load(p)]


def _of(kind: str) -> list[dict[str, Any]]:
    return [d for d in _objects() if d["kind"] == kind]


def _containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    pod = workload["spec"]["template"]["spec"]
    return [*pod.get("initContainers", []), *pod["containers"]]


def _configmap(name: str) -> dict[str, str]:
    (cm,) = [c for c in _of("ConfigMap") if c["metadata"]["name"] == name]
    data: dict[str, str] = cm["data"]
    return data


# ---- structure ----------------------------------------------------------------------------------
def test_kustomizations_name_only_files_that_exist_and_every_manifest_is_in_one() -> None:
    listed = list(_listed(DEPLOY / "kustomization.yaml"))
    assert [p for p in listed if not p.exists()] == []
    files = {p for p in listed if p.is_file()}
    yamls = {p for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml"}
    assert yamls - files == set(EXTRAS)  # the secrets and the local-PV alternative are applied by hand
    assert {"Deployment", "Service", "ConfigMap", "NetworkPolicy", "ServiceMonitor", "Namespace"} <= {
        d["kind"] for d in _objects()
    }


def test_builtin_objects_are_valid_kubernetes_objects() -> None:
    checked = 0
    for d in _objects():
        if d["apiVersion"].startswith("monitoring.coreos.com/"):
            continue
        kubernetes_validate.validate(d, K8S, strict=True)  # strict: an unknown field is an error too
        checked += 1
    assert checked >= 12


def _servicemonitor_validator() -> jsonschema.Draft7Validator:
    schema = json.loads((DEPLOY / "schemas" / "servicemonitor.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_servicemonitors_match_the_crd_schema_and_scrape_real_ports() -> None:
    v = _servicemonitor_validator()
    monitors = _of("ServiceMonitor")
    assert len(monitors) == 2
    services = _of("Service")
    for sm in monitors:
        v.validate(sm)
        want = sm["spec"]["selector"]["matchLabels"]
        (svc,) = [s for s in services if want.items() <= s["metadata"]["labels"].items()]
        assert {e["port"] for e in sm["spec"]["endpoints"]} <= {p["name"] for p in svc["spec"]["ports"]}


def test_the_validators_reject_broken_manifests() -> None:
    (dep,) = [d for d in _of("Deployment") if d["metadata"]["name"] == "vllm"]
    bad = copy.deepcopy(dep)
    bad["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8000"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S, strict=True)
    typo = copy.deepcopy(dep)
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/", "port": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, K8S, strict=True)
    v = _servicemonitor_validator()
    sm = _of("ServiceMonitor")[0]
    for broken in ({"interval": "15 seconds"}, {"port": 9400}, {"scheme": "ftp"}, {"intervall": "15s"}):
        bad_sm = copy.deepcopy(sm)
        bad_sm["spec"]["endpoints"][0].update(broken)
        assert not v.is_valid(bad_sm), broken
    no_selector = copy.deepcopy(sm)
    del no_selector["spec"]["selector"]
    assert not v.is_valid(no_selector)


def test_the_grafana_dashboard_configmap_is_the_dashboard_in_docs() -> None:
    (cm,) = _load(DASHBOARD_CM)
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["data"]["kvbm_fs.json"] == DASHBOARD.read_text(), "run: python tests/test_deploy.py"


# ---- what the manifests ask of kvbm_fs ------------------------------------------------------------
class _Parsed(Exception):
    pass


def _parse_kvbm(argv: list[str]) -> argparse.Namespace:
    """``argv`` through kvbm-fs's real parser (a bad subcommand or flag exits 2 and fails the test)."""
    real = argparse.ArgumentParser.parse_args

    def capture(self: argparse.ArgumentParser, args: Any = None, namespace: Any = None) -> Any:
        raise _Parsed(real(self, args, namespace))

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture), pytest.raises(_Parsed) as got:
        kvbm_main(argv)
    ns: argparse.Namespace = got.value.args[0]
    return ns


def _mounted(container: dict[str, Any], path: str) -> str:
    """The ConfigMap entry that ``path`` is inside ``container`` (mounted ConfigMap volume + key)."""
    (dep,) = [d for d in _of("Deployment") if container in _containers(d)]
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    for m in container["volumeMounts"]:
        if path.startswith(m["mountPath"] + "/") and "configMap" in volumes[m["name"]]:
            data = _configmap(volumes[m["name"]]["configMap"]["name"])
            return data[path[len(m["mountPath"]) + 1 :]]
    raise AssertionError(f"{path} is not in a ConfigMap mounted into {container['name']}")


def test_kvbm_fs_commands_and_flags_exist_and_probes_call_real_routes() -> None:
    seen = 0
    for dep in _of("Deployment"):
        for c in _containers(dep):
            if c.get("command", [""])[0] != "kvbm-fs":
                continue
            seen += 1
            args = _parse_kvbm([*c["command"][1:], *c.get("args", [])])
            assert args.cmd == "serve"
            tomllib.loads(_mounted(c, args.config))  # the config it names is in the mounted ConfigMap
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            assert ports["peer"] == args.peer_port and ports["metrics"] == args.metrics_port
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert c[probe]["httpGet"] == {"path": HEALTH_PATH, "port": "metrics"}
    assert seen == 1


def test_the_mooncake_master_takes_the_flags_the_manifest_gives_it() -> None:
    pytest.importorskip("mooncake", reason="the mooncake extra is not installed")
    from kvbm_fs.tiers.mooncake.master import master_binary

    (dep,) = [d for d in _of("Deployment") if d["metadata"]["name"] == "kvbm-mooncake-master"]
    (c,) = _containers(dep)
    assert c["command"] == ["mooncake_master"]  # the mooncake wheel's console script
    r = subprocess.run([master_binary(), "--help"], capture_output=True, text=True, timeout=60)
    known = set(re.findall(r"^\s+-(\w+) \(", r.stdout + r.stderr, re.M))
    assert {"rpc_port", "metrics_port"} <= known  # the help was read
    used = {a.removeprefix("--").split("=", 1)[0] for a in c["args"]}
    assert used <= known, used - known
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    flags = dict(a.removeprefix("--").split("=", 1) for a in c["args"])
    given = [int(flags[f]) for f in ("rpc_port", "http_metadata_server_port", "metrics_port")]
    assert given == [ports["rpc"], ports["metadata"], ports["admin"]]


def _tier_urls(cfg_text: str) -> list[str]:
    return [t if isinstance(t, str) else t["url"] for t in tomllib.loads(cfg_text)["tiers"]]


def _check_tier_url(url: str) -> None:
    spec = TierSpec.parse(url)
    assert spec.scheme in known_schemes() or spec.scheme == "s3", spec.scheme
    opts = set(spec.options)
    assert not [o for o in opts if any(w in o.lower() for w in SECRETISH)], f"a secret in a ConfigMap: {url}"
    if spec.scheme == "mooncake":
        from kvbm_fs.tiers.mooncake.config import MooncakeConfig

        MooncakeConfig.parse(spec.location, dict(spec.options))  # unknown options and bad values raise
        return
    if spec.scheme == "s3":
        from kvbm_fs.tiers.remote import RemoteTier

        accepted = set(inspect.signature(RemoteTier.__init__).parameters) | {"endpoint_url", "anon", "profile"}
    else:
        accepted = set(inspect.signature(tier_class(spec.scheme).__init__).parameters)
    assert opts <= accepted, (url, opts - accepted)


def test_config_keys_tier_urls_and_env_exist_in_kvbm_fs(tmp_path: Path) -> None:
    data = _configmap("kvbm-fs-config")
    for name in ("engine.toml", "sidecar.toml"):
        f = tmp_path / name
        f.write_text(data[name])
        cfg = resolve(config=f, env={})  # unknown keys and malformed values raise ConfigError
        if isinstance(cfg.daemon, dict):
            DaemonConfig.from_dict(cfg.daemon)
        for url in _tier_urls(data[name]):
            _check_tier_url(url)
    assert resolve(config=tmp_path / "sidecar.toml", env={}).namespace().block_nbytes == 2 << 20
    # the engine's peer:// is the sidecar's peer port, in the same pod
    (dep,) = [d for d in _of("Deployment") if d["metadata"]["name"] == "vllm"]
    side = next(c for c in _containers(dep) if c.get("command", [""])[0] == "kvbm-fs")
    peer_port = next(p["containerPort"] for p in side["ports"] if p["name"] == "peer")
    assert f"peer://127.0.0.1:{peer_port}" in [u.split("?")[0] for u in _tier_urls(data["engine.toml"])]
    # environment: KVBM_FS_* names kvbm_fs reads; secrets only from Secrets
    secrets = {s["metadata"]["name"]: s["stringData"] for s in _load(EXTRAS[0])}
    for d in _of("Deployment"):
        for c in _containers(d):
            for e in c.get("env", []):
                if e["name"].startswith("KVBM_FS_"):
                    assert e["name"] in (TOKEN_ENV, "KVBM_FS_CONFIG") or from_env({e["name"]: "1"}), e["name"]
                if any(w in e["name"].lower() for w in SECRETISH):
                    ref = e["valueFrom"]["secretKeyRef"]
                    assert ref["key"] in secrets[ref["name"]]
                ref = e.get("valueFrom", {}).get("configMapKeyRef")
                if ref:
                    assert ref["key"] in _configmap(ref["name"])


def _extra_keys() -> frozenset[str]:
    """The connector's EXTRA_KEYS, read from its source (importing it needs vLLM)."""
    spec = importlib.util.find_spec("kvbm_fs.integration.vllm")
    assert spec is not None and spec.origin is not None
    origin = Path(spec.origin)
    sources = sorted(origin.parent.glob("*.py")) if origin.name == "__init__.py" else [origin]
    for src in sources:
        for node in ast.walk(ast.parse(src.read_text())):
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "EXTRA_KEYS" for t in node.targets):
                assert isinstance(node.value, ast.Call)
                return frozenset(ast.literal_eval(node.value.args[0]))
    raise AssertionError("no EXTRA_KEYS in kvbm_fs.integration.vllm")


def test_the_vllm_kv_transfer_config_names_the_real_connector() -> None:
    data = _configmap("kvbm-fs-config")
    ktc = json.loads(data["kv-transfer-config.json"])
    assert ktc["kv_connector_module_path"] == "kvbm_fs.integration.vllm"
    spec = importlib.util.find_spec(ktc["kv_connector_module_path"])
    assert spec is not None and spec.origin is not None
    assert f"class {ktc['kv_connector']}(" in "".join(p.read_text() for p in Path(spec.origin).parent.glob("*.py"))
    assert ktc["kv_load_failure_policy"] == "recompute"
    extra = ktc["kv_connector_extra_config"]
    assert set(extra) <= _extra_keys()
    (dep,) = [d for d in _of("Deployment") if d["metadata"]["name"] == "vllm"]
    engine = next(c for c in _containers(dep) if c["name"] == "vllm")
    assert "$(KV_TRANSFER_CONFIG)" in engine["args"]
    # the sidecar's layout only sizes blocks; given to the engine it would pin the engine to it, and the
    # page order differs by attention backend (the CPU one's is LHKTD): vLLM refuses to start
    assert "layout" not in tomllib.loads(data["engine.toml"]) and "layout" not in extra
    assert "KVBM_FS_LAYOUT" not in {e["name"] for e in engine.get("env", [])}
    assert _mounted(engine, extra["config"]) == data["engine.toml"]


def write_dashboard_configmap() -> None:
    body = "".join(f"    {line}\n" if line else "\n" for line in DASHBOARD.read_text().splitlines())
    DASHBOARD_CM.write_text(
        "# Generated from docs/grafana/kvbm_fs.json by `python tests/test_deploy.py` (tests/test_deploy.py\n"
        "# checks they agree). Grafana's sidecar loads ConfigMaps labelled grafana_dashboard=1.\n"
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: kvbm-fs-grafana-dashboard\n  namespace: kvbm\n"
        '  labels:\n    app.kubernetes.io/part-of: kvbm-fs\n    grafana_dashboard: "1"\n'
        f"data:\n  kvbm_fs.json: |{'' if DASHBOARD.read_text().endswith(chr(10)) else '-'}\n{body}"
    )


if __name__ == "__main__":
    write_dashboard_configmap()
    sys.exit(0)
