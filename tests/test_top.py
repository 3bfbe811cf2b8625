"""``kvbm-fs top`` against real HTTP endpoints, and the Grafana dashboard against the metric-name contract."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kvbm_fs import cli, top

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "docs" / "grafana" / "kvbm_fs.json"
BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1)
NB = 8192


class Endpoint:
    """A real Prometheus endpoint on 127.0.0.1 whose values step forward on every scrape."""

    def __init__(self, steps: list[Callable[[], None]], body: Callable[[], bytes] | None = None) -> None:
        self.steps = steps
        self.scrapes = 0
        self.lock = threading.Lock()
        ep = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with ep.lock:
                    if ep.scrapes < len(ep.steps):
                        ep.steps[ep.scrapes]()
                    ep.scrapes += 1
                    data = body() if body else generate_latest(ep.registry)
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.registry = CollectorRegistry()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/metrics"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def contract_store(reg: CollectorRegistry) -> list[Callable[[], None]]:
    """The contract's metrics with known values: state A on the first scrape, A + known deltas on the second."""
    g = {n: Gauge(n, n, ["tier"], registry=reg) for n in top.GAUGES if n != "kvbm_fs_breaker_state"}
    breaker = Gauge("kvbm_fs_breaker_state", "breaker", ["tier"], registry=reg)
    c = {n: Counter(n.removesuffix("_total"), n, ["tier"], registry=reg) for n in top.COUNTERS[2:8]}
    hits = Counter("kvbm_fs_hits", "hits", ["tier", "op"], registry=reg)
    misses = Counter("kvbm_fs_misses", "misses", ["tier", "op"], registry=reg)
    dblocks = Counter("kvbm_fs_daemon_blocks", "daemon blocks", ["action"], registry=reg)
    dbytes = Counter("kvbm_fs_daemon_bytes", "daemon bytes", ["action"], registry=reg)
    lat = Histogram("kvbm_fs_op_seconds", "op latency", ["tier", "op"], buckets=BUCKETS, registry=reg)

    def first() -> None:
        for t, blocks, cap in (("host", 10, 100), ("disk", 40, 1000), ("remote", 7, 0)):
            g["kvbm_fs_tier_blocks"].labels(t).set(blocks)
            g["kvbm_fs_tier_used_bytes"].labels(t).set(blocks * NB)
            g["kvbm_fs_tier_capacity_bytes"].labels(t).set(cap * NB)
        breaker.labels("remote").set(0)
        hits.labels("host", "lookup").inc(30)
        misses.labels("host", "lookup").inc(10)
        hits.labels("host", "get").inc(20)
        hits.labels("disk", "lookup").inc(5)
        misses.labels("disk", "lookup").inc(5)
        c["kvbm_fs_read_bytes_total"].labels("host").inc(1 << 20)
        c["kvbm_fs_written_bytes_total"].labels("host").inc(2 << 20)
        c["kvbm_fs_verify_failed_blocks_total"].labels("disk").inc(0)
        for _ in range(10):
            lat.labels("host", "get").observe(0.002)
        lat.labels("disk", "put").observe(0.02)
        dblocks.labels("demote").inc(5)
        dbytes.labels("demote").inc(5 * NB)
        dblocks.labels("promote").inc(0)

    def second() -> None:
        g["kvbm_fs_tier_blocks"].labels("host").set(12)
        g["kvbm_fs_tier_used_bytes"].labels("host").set(12 * NB)
        breaker.labels("remote").set(2)
        hits.labels("host", "lookup").inc(9)
        misses.labels("host", "lookup").inc(1)
        misses.labels("host", "get").inc(4)
        c["kvbm_fs_read_bytes_total"].labels("host").inc(3 << 20)
        c["kvbm_fs_verify_failed_blocks_total"].labels("disk").inc(3)
        c["kvbm_fs_evicted_blocks_total"].labels("host").inc(6)
        for _ in range(98):
            lat.labels("host", "get").observe(0.003)
        for _ in range(2):
            lat.labels("host", "get").observe(0.07)
        dblocks.labels("demote").inc(10)
        dbytes.labels("demote").inc(10 * NB)

    return [first, second]


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    ep = Endpoint([])
    ep.steps = contract_store(ep.registry)
    yield ep
    ep.close()


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    assert cli.main(["top", *argv, "--once", "--json", "--interval", "0.05"]) == 0
    return json.loads(capsys.readouterr().out)


def test_once_json_computes_rates_ratios_and_quantiles(endpoint: Endpoint, capsys: pytest.CaptureFixture[str]) -> None:
    view = run_json(capsys, "--url", endpoint.url)
    assert endpoint.scrapes == 2
    dt = view["interval_s"]
    assert dt > 0
    tiers = {t["tier"]: t for t in view["tiers"]}
    assert list(tiers) == ["host", "disk", "remote"]  # the endpoint's order (fastest first)
    host, disk, remote = tiers["host"], tiers["disk"], tiers["remote"]
    assert (host["blocks"], host["used_bytes"], host["capacity_bytes"]) == (12, 12 * NB, 100 * NB)
    assert host["used_fraction"] == pytest.approx(0.12)
    assert remote["used_fraction"] is None  # capacity 0: unbounded
    # hit ratios: over the window (9 of 10) and over the lifetime (39 of 50)
    assert host["lookup"]["hit_ratio"] == pytest.approx(0.9)
    assert host["lookup"]["hit_ratio_total"] == pytest.approx(39 / 50)
    assert host["lookup"]["hits_per_s"] * dt == pytest.approx(9)
    assert host["get"]["hit_ratio"] == 0.0 and host["get"]["hit_ratio_total"] == pytest.approx(20 / 24)
    assert disk["lookup"]["hit_ratio"] is None and disk["lookup"]["hit_ratio_total"] == 0.5  # idle window
    # bandwidth: counter deltas over the measured window
    assert host["read_bytes_per_s"] * dt == pytest.approx(3 << 20)
    assert host["written_bytes_per_s"] == 0.0 and host["written_bytes"] == 2 << 20
    # latency: histogram_quantile over the window's 100 get observations (98 in (1, 5] ms, 2 in (50, 100] ms)
    get = host["latency"]["get"]
    assert get["count"] == 100 and get["count_total"] == 110
    assert get["p50_s"] == pytest.approx(0.001 + 0.004 * 50 / 98)
    assert get["p99_s"] == pytest.approx(0.075)
    put = disk["latency"]["put"]
    assert put["count"] == 0 and put["p50_s"] is None
    assert put["p50_total_s"] == pytest.approx(0.01 + 0.04 * 0.5)
    # failures, evictions, breaker, daemon
    assert disk["verify_failed_blocks"] == 3 and disk["verify_failed_blocks_per_s"] * dt == pytest.approx(3)
    assert host["evicted_blocks"] == 6
    assert remote["breaker"] == "open" and "breaker" not in host
    assert view["daemon"]["demote"]["blocks"] == 15 and view["daemon"]["demote"]["bytes"] == 15 * NB
    assert view["daemon"]["demote"]["blocks_per_s"] * dt == pytest.approx(10)
    assert view["daemon"]["promote"]["blocks_per_s"] == 0.0


def test_once_table(endpoint: Endpoint, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "140")
    assert cli.main(["top", "--url", endpoint.url, "--once", "--interval", "0.05"]) == 0
    out = capsys.readouterr().out
    for text in ("host", "disk", "remote", "open", "90.0%", "daemon moves", "demote", "96.0 KiB / 800.0 KiB"):
        assert text in out, text
    row = next(line for line in out.splitlines() if "disk" in line and "KiB" in line)
    assert " 3 " in row  # the disk tier's verification failures


def test_port_and_env_select_the_local_endpoint(endpoint: Endpoint, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    port = endpoint.url.split(":")[2].split("/")[0]
    assert run_json(capsys, "--port", port)["url"] == endpoint.url
    monkeypatch.setenv("KVBM_FS_METRICS_PORT", port)
    assert run_json(capsys)["url"] == endpoint.url
    assert cli.main(["top", "--port", port, "--url", endpoint.url, "--once"]) == 2
    assert "not both" in capsys.readouterr().err


def test_histogram_quantile_follows_promql() -> None:
    inf = float("inf")
    assert top.histogram_quantile(0.5, []) is None
    assert top.histogram_quantile(0.5, [(0.1, 0), (inf, 0)]) is None  # no observations
    assert top.histogram_quantile(0.5, [(0.1, 5)]) is None  # no +Inf bucket: not a histogram
    assert top.histogram_quantile(0.5, [(0.1, 4), (inf, 4)]) == pytest.approx(0.05)  # from 0 in the first bucket
    assert top.histogram_quantile(0.99, [(0.1, 1), (1.0, 1), (inf, 10)]) == 1.0  # in +Inf: highest finite bound
    assert top.histogram_quantile(0.5, [(inf, 3), (0.1, 2), (0.2, 1)]) == pytest.approx(0.1 * 1.5 / 2)  # unsorted,
    # and a non-monotonic (reset) count is clamped, as PromQL does


def test_counter_reset_and_multiprocess_labels() -> None:
    """A restarted process (counter drops) counts its whole new value; extra labels (pid) are summed."""
    a = top.Scrape("u", 0.0, {"kvbm_fs_read_bytes_total": [({"tier": "host"}, 1000.0)]})
    b = top.Scrape(
        "u",
        2.0,
        {
            "kvbm_fs_read_bytes_total": [({"tier": "host"}, 100.0)],
            "kvbm_fs_tier_blocks": [({"tier": "host", "pid": "1"}, 3.0), ({"tier": "host", "pid": "2"}, 4.0)],
        },
    )
    view = top.compute_view(a, b)
    assert view["tiers"][0]["read_bytes_per_s"] == 50.0
    assert view["tiers"][0]["blocks"] == 7
    assert top.compute_view(None, b)["tiers"][0]["read_bytes_per_s"] is None  # no window yet


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_dead_or_wrong_endpoint_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    r = subprocess.run([sys.executable, "-m", "kvbm_fs", "top", "--port", str(port), "--once"],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2
    assert f"kvbm-fs top: error: cannot scrape http://127.0.0.1:{port}/metrics" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    other = Endpoint([], body=lambda: b"# TYPE up gauge\nup 1\n")
    html = Endpoint([], body=lambda: b"<html><body>hello</body></html>")
    try:
        assert cli.main(["top", "--url", other.url, "--once"]) == 2
        assert "serves no kvbm_fs_ metrics" in capsys.readouterr().err
        assert cli.main(["top", "--url", html.url, "--once"]) == 2
        assert "kvbm-fs top: error:" in capsys.readouterr().err
    finally:
        other.close()
        html.close()
    assert cli.main(["top", "--url", "http://127.0.0.1:1/metrics", "--once", "--interval", "0"]) == 2
    assert "--interval must be positive" in capsys.readouterr().err


def test_live_mode_exits_0_on_ctrl_c(endpoint: Endpoint) -> None:
    p = subprocess.Popen([sys.executable, "-m", "kvbm_fs", "top", "--url", endpoint.url, "--interval", "0.1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while endpoint.scrapes < 3 and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert endpoint.scrapes >= 3, "live mode did not keep scraping"
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    assert "Traceback" not in err
    assert "remote" in out and "open" in out  # the last frame stays on screen


def test_live_mode_gives_back_the_callers_sigint_handler(endpoint: Endpoint) -> None:
    """Run in-process (main thread): Ctrl-C stops the live view, which then restores the SIGINT
    handler it found, so a later Ctrl-C reaches the caller's again."""
    import os

    caught: list[int] = []

    def callers(signum: int, frame: Any) -> None:
        caught.append(signum)

    before = signal.signal(signal.SIGINT, callers)

    def ctrl_c_after_scrapes() -> None:
        deadline = time.monotonic() + 60
        while endpoint.scrapes < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)

    t = threading.Thread(target=ctrl_c_after_scrapes, daemon=True)
    try:
        t.start()
        assert top.main(["--url", endpoint.url, "--interval", "0.05"]) == 0
        t.join()
        assert endpoint.scrapes >= 3 and caught == [], "the Ctrl-C stopped top, not the caller's handler"
        assert signal.getsignal(signal.SIGINT) is callers
        signal.raise_signal(signal.SIGINT)
        assert caught == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, before)


# ---- the Grafana dashboard ----

FUNCTIONS = {"rate", "irate", "increase", "sum", "max", "min", "avg", "histogram_quantile", "clamp_min", "topk",
             "label_replace", "vector", "count", "delta", "deriv", "abs", "scalar"}  # fmt: skip
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset", "bool"}
CONTRACT = set(top.GAUGES) | set(top.COUNTERS) | {h + s for h in top.HISTOGRAMS for s in ("_bucket", "_sum", "_count")}


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords or label names."""
    e = re.sub(r'"[^"]*"', '""', expr)  # strings (label values, label_replace args)
    e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)  # grouping labels
    e = re.sub(r"\[[^\]]*\]", "", e)  # range selectors
    e = re.sub(r"\$\w+|\$\{[^}]*\}", "", e)  # Grafana variables ($__rate_interval)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        word, after = m.group(0), e[m.end() :].lstrip()
        if word in KEYWORDS or (word in FUNCTIONS and after.startswith("(")):
            continue
        if re.fullmatch(r"\d*e\d*|inf|nan", word, re.IGNORECASE):
            continue
        names.add(word)
    return names


def label_names(expr: str) -> set[str]:
    labels = set()
    for body in re.findall(r"\{([^}]*)\}", expr):
        labels |= set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", body))
    for body in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        labels |= {x.strip() for x in body.split(",") if x.strip()}
    return labels


def panels(dash: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])  # collapsed rows


def test_metric_names_parser_catches_strangers() -> None:
    assert metric_names('sum by (tier) (rate(kvbm_fs_hits_total{tier=~"$tier",op="get"}[$__rate_interval]))') == {
        "kvbm_fs_hits_total"
    }
    assert metric_names("up + rate(node_cpu_seconds_total[5m]) * 1e3") == {"up", "node_cpu_seconds_total"}
    assert label_names('sum by (tier, le) (x{op="get", tier=~"$tier"})') == {"tier", "le", "op"}


def test_grafana_dashboard_uses_only_contract_metrics() -> None:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [(p["title"], t["expr"]) for p in panels(dash) for t in p.get("targets", [])]
    assert exprs
    used: set[str] = set()
    for title, expr in exprs:
        names = metric_names(expr)
        assert names, f"{title}: {expr} reads no metric"
        assert names <= CONTRACT, f"{title}: {sorted(names - CONTRACT)} not in the metric contract"
        assert label_names(expr) <= {"tier", "op", "action", "le"}, f"{title}: {expr}"
        for name, sel in re.findall(r"(kvbm_fs_\w+)(\{[^}]*\})?", expr):
            if not name.startswith("kvbm_fs_daemon_"):
                assert 'tier=~"$tier"' in sel, f"{title}: {name} ignores the tier variable"
        used |= names
    # every metric group has a panel
    assert {n for n in CONTRACT if not n.endswith(("_sum", "_count"))} <= used


def test_grafana_dashboard_structure() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["title"] and dash["uid"] and isinstance(dash["schemaVersion"], int)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["tier"]["type"] == "query" and "kvbm_fs_tier_blocks" in json.dumps(variables["tier"]["query"])
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for p in panels(dash):
        gp = p["gridPos"]
        assert {"h", "w", "x", "y"} <= set(gp) and gp["x"] >= 0 and gp["x"] + gp["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(gp["x"], gp["x"] + gp["w"]) for y in range(gp["y"], gp["y"] + gp["h"])}
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine
        if p["type"] == "row":
            continue
        assert p["targets"], p["title"]
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
    titles = " ".join(p["title"].lower() for p in panels(dash))
    for group in ("occupancy", "hit ratio", "read", "latency", "evict", "verif", "breaker", "daemon"):
        assert group in titles, group


def test_top_against_a_mounted_store(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The real thing: a store's own /metrics, a known workload between top's two scrapes."""
    pytest.importorskip("kvbm_fs.metrics")
    from conftest import LAYOUT, tokens

    from kvbm_fs import mount
    from kvbm_fs.testing import blocks_for

    nb = LAYOUT.block_nbytes
    store = mount(f"gpu://cpu?capacity={16 * nb}", f"file://{tmp_path}/disk?capacity=1MiB", layout=LAYOUT,
                  model="top-test", env={}, metrics_port=0)  # fmt: skip
    try:
        assert store.metrics is not None and store.metrics.port
        real_scrape, calls = top.scrape, list[str]()

        def scrape_then_work(url: str, timeout: float = 5.0) -> top.Scrape:
            s = real_scrape(url, timeout)
            if not calls:  # between top's two scrapes: put 8 blocks, match and get them
                keys = store.keys(tokens(8, seed=1))
                data = blocks_for(keys, nb)
                assert store.put(keys, data).all()
                m = store.match(keys)
                assert m.length == 8
                out = np.zeros_like(data)
                assert store.get(keys, out, m).all()
            calls.append(url)
            return s

        monkeypatch.setattr(top, "scrape", scrape_then_work)
        view = run_json(capsys, "--port", str(store.metrics.port))
        names = [t.name for t in store.tiers]
        exported = {f.name for f in text_string_to_metric_families(store.metrics.text())}
        exported = {n for n in exported if not n.endswith("_created")}  # counters' creation times
    finally:
        store.close()
    assert len(calls) == 2
    contract = {*top.GAUGES, *(c.removesuffix("_total") for c in top.COUNTERS), *top.HISTOGRAMS}
    assert exported <= contract, "the store exports a metric top and the dashboard do not know"
    assert contract - {"kvbm_fs_breaker_state"} <= exported  # no remote or peer tier here: no breaker
    assert [t["tier"] for t in view["tiers"]] == names  # fastest first
    gpu, disk = view["tiers"]
    assert gpu["blocks"] == 8 and gpu["used_bytes"] == 8 * nb and gpu["capacity_bytes"] == 16 * nb
    assert gpu["written_bytes_per_s"] * view["interval_s"] == pytest.approx(8 * nb)
    assert gpu["lookup"]["hit_ratio"] == 1.0 and gpu["lookup"]["hits"] == 8
    assert gpu["get"]["hit_ratio"] == 1.0 and gpu["get"]["hits"] == 8
    assert gpu["read_bytes_per_s"] * view["interval_s"] == pytest.approx(8 * nb)
    assert gpu["latency"]["get"]["count"] == 1 and gpu["latency"]["get"]["p50_s"] > 0
    assert gpu["latency"]["put"]["count"] == 1
    assert gpu.get("verify_failed_blocks", 0) == 0
    assert disk["blocks"] == 0 and disk["lookup"]["hits"] == 0  # everything was found in the first tier
