"""``kvbm-fs top``: a live view of a store, computed from two scrapes of its Prometheus endpoint.

Reads only the exposition text (no import of the store), so it works against any process that serves
kvbm_fs metrics: a mounted store, ``kvbm-fs daemon --metrics-port``, ``peer-serve`` or a vLLM worker.
Rates are deltas between scrapes; quantiles follow PromQL's ``histogram_quantile`` (docs/architecture.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, KvbmError
from .units import fmt_size

# The metric-name contract (docs/architecture.md, metrics): what `top` reads and the Grafana dashboard may use.
GAUGES = (
    "kvbm_fs_tier_blocks",
    "kvbm_fs_tier_used_bytes",
    "kvbm_fs_tier_capacity_bytes",
    "kvbm_fs_breaker_state",
)
COUNTERS = (
    "kvbm_fs_hits_total",
    "kvbm_fs_misses_total",
    "kvbm_fs_read_bytes_total",
    "kvbm_fs_written_bytes_total",
    "kvbm_fs_evicted_blocks_total",
    "kvbm_fs_admission_refused_blocks_total",
    "kvbm_fs_verify_failed_blocks_total",
    "kvbm_fs_store_failed_blocks_total",
    "kvbm_fs_daemon_blocks_total",
    "kvbm_fs_daemon_bytes_total",
)
HISTOGRAMS = ("kvbm_fs_op_seconds",)
LABELS = ("tier", "op", "action")
BREAKER = {0: "closed", 1: "half-open", 2: "open"}
DEFAULT_PORT = 9400


class MetricsScrapeError(KvbmError, ConnectionError):
    """The metrics endpoint could not be reached, or what it served is not kvbm_fs metrics."""


@dataclass
class Scrape:
    """One scrape: summed samples by (sample name, label tuple), and when it was taken."""

    url: str
    at: float
    samples: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=dict)

    def sum_by(self, name: str, by: tuple[str, ...]) -> dict[tuple[str, ...], float]:
        """Sum a sample over every label not in ``by`` (e.g. ``pid`` in multiprocess mode)."""
        out: dict[tuple[str, ...], float] = {}
        for labels, value in self.samples.get(name, ()):
            k = tuple(labels.get(b, "") for b in by)
            out[k] = out.get(k, 0.0) + value
        return out


def scrape(url: str, timeout: float = 5.0) -> Scrape:
    """GET ``url`` and parse it with prometheus_client's parser; every failure is a MetricsScrapeError."""
    from prometheus_client.parser import text_string_to_metric_families

    req = urllib.request.Request(url, headers={"Accept": "text/plain; version=0.0.4"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            text = resp.read().decode("utf-8")
    except urllib.error.HTTPError as e:
        raise MetricsScrapeError(f"cannot scrape {url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise MetricsScrapeError(f"cannot scrape {url}: {e.reason}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise MetricsScrapeError(f"cannot scrape {url}: {e}") from None
    s = Scrape(url, time.monotonic())
    try:
        for fam in text_string_to_metric_families(text):
            if not fam.name.startswith("kvbm_fs_"):
                continue
            for smp in fam.samples:
                s.samples.setdefault(smp.name, []).append((dict(smp.labels), float(smp.value)))
    except (ValueError, TypeError, IndexError) as e:
        raise MetricsScrapeError(f"{url} did not serve Prometheus text: {e}") from None
    if not s.samples:
        raise MetricsScrapeError(f"{url} serves no kvbm_fs_ metrics (is it a kvbm_fs metrics endpoint?)")
    return s


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """PromQL's histogram_quantile over cumulative (le, count) buckets: linear inside the bucket."""
    bs = sorted(buckets)
    if not bs or bs[-1][0] != math.inf:
        return None
    fixed: list[tuple[float, float]] = []
    top = 0.0
    for le, c in bs:  # counts must be monotonic (a counter reset mid-window can break that)
        top = max(top, c)
        fixed.append((le, top))
    total = fixed[-1][1]
    if total <= 0:
        return None
    rank = q * total
    b = next(i for i, (_, c) in enumerate(fixed) if c >= rank)
    if b == len(fixed) - 1:  # in the +Inf bucket: the highest finite bound is the best estimate
        return fixed[-2][0] if len(fixed) > 1 else None
    end, count = fixed[b]
    start, before = (0.0, 0.0) if b == 0 else fixed[b - 1]
    if b == 0 and end <= 0:
        return end
    return start + (end - start) * ((rank - before) / (count - before)) if count > before else end


def _delta(cur: float, prev: float | None) -> float:
    """A counter's increase; a drop means the process restarted, so the whole value is new (as in rate())."""
    if prev is None:
        return cur
    return cur - prev if cur >= prev else cur


def _ratio(hits: float, misses: float) -> float | None:
    return hits / (hits + misses) if hits + misses > 0 else None


def compute_view(prev: Scrape | None, cur: Scrape) -> dict[str, Any]:
    """The view as plain data (what ``--json`` prints); rates and interval figures are None without ``prev``."""
    dt = cur.at - prev.at if prev is not None else None

    def counter(name: str, by: tuple[str, ...]) -> dict[tuple[str, ...], tuple[float, float | None]]:
        now = cur.sum_by(name, by)
        before = prev.sum_by(name, by) if prev is not None else {}
        return {k: (v, _delta(v, before.get(k)) if prev is not None else None) for k, v in now.items()}

    def rate(d: float | None) -> float | None:
        return d / dt if d is not None and dt else None

    tiers: dict[str, dict[str, Any]] = {}

    def tier(name: str) -> dict[str, Any]:
        return tiers.setdefault(name, {"tier": name})

    for metric, key in (
        ("kvbm_fs_tier_blocks", "blocks"),
        ("kvbm_fs_tier_used_bytes", "used_bytes"),
        ("kvbm_fs_tier_capacity_bytes", "capacity_bytes"),
    ):
        for (t,), v in cur.sum_by(metric, ("tier",)).items():
            tier(t)[key] = int(v)
    for (t,), v in cur.sum_by("kvbm_fs_breaker_state", ("tier",)).items():
        tier(t)["breaker"] = BREAKER.get(int(v), str(v))
    hits = counter("kvbm_fs_hits_total", ("tier", "op"))
    misses = counter("kvbm_fs_misses_total", ("tier", "op"))
    for t, op in sorted(set(hits) | set(misses)):
        h, dh = hits.get((t, op), (0.0, 0.0 if prev is not None else None))
        m, dm = misses.get((t, op), (0.0, 0.0 if prev is not None else None))
        tier(t)[op] = {
            "hits": int(h),
            "misses": int(m),
            "hit_ratio": _ratio(dh, dm) if dh is not None and dm is not None else None,
            "hit_ratio_total": _ratio(h, m),
            "hits_per_s": rate(dh),
            "misses_per_s": rate(dm),
        }
    for metric, key in (
        ("kvbm_fs_read_bytes_total", "read_bytes"),
        ("kvbm_fs_written_bytes_total", "written_bytes"),
        ("kvbm_fs_evicted_blocks_total", "evicted_blocks"),
        ("kvbm_fs_admission_refused_blocks_total", "admission_refused_blocks"),
        ("kvbm_fs_verify_failed_blocks_total", "verify_failed_blocks"),
        ("kvbm_fs_store_failed_blocks_total", "store_failed_blocks"),
    ):
        for (t,), (v, d) in counter(metric, ("tier",)).items():
            tier(t)[key] = int(v)
            tier(t)[key + "_per_s"] = rate(d)
    buckets = counter("kvbm_fs_op_seconds_bucket", ("tier", "op", "le"))
    by_op: dict[tuple[str, str], list[tuple[float, float, float | None]]] = {}
    for (t, op, le), (v, d) in buckets.items():
        by_op.setdefault((t, op), []).append((float(le), v, d))
    for (t, op), bs in sorted(by_op.items()):
        total = [(le, v) for le, v, _ in bs]
        window = [(le, d) for le, _, d in bs if d is not None] if prev is not None else []
        lat = tier(t).setdefault("latency", {})
        lat[op] = {
            "count": int(max((c for _, c in window), default=0)) if prev is not None else None,
            "p50_s": histogram_quantile(0.5, window),
            "p99_s": histogram_quantile(0.99, window),
            "count_total": int(max((c for _, c in total), default=0)),
            "p50_total_s": histogram_quantile(0.5, total),
            "p99_total_s": histogram_quantile(0.99, total),
        }
    for entry in tiers.values():
        cap, used = entry.get("capacity_bytes"), entry.get("used_bytes")
        entry["used_fraction"] = used / cap if cap and used is not None else None
    daemon: dict[str, dict[str, Any]] = {}
    for metric, key in (("kvbm_fs_daemon_blocks_total", "blocks"), ("kvbm_fs_daemon_bytes_total", "bytes")):
        for (action,), (v, d) in counter(metric, ("action",)).items():
            daemon.setdefault(action, {})[key] = int(v)
            daemon[action][key + "_per_s"] = rate(d)
    return {"url": cur.url, "interval_s": dt, "tiers": list(tiers.values()), "daemon": daemon}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _per_s(x: float | None) -> str:
    return "-" if x is None else f"{fmt_size(int(x))}/s"


def _ms(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return "-"
    return f"{a * 1e3:.2f} / {b * 1e3:.2f} ms"


def _cap(cap: int | None) -> str:
    return "-" if cap is None else fmt_size(cap) if cap else "unbounded"


def _hit(d: dict[str, Any] | None) -> str:
    """Hit ratio over the interval; the lifetime ratio (marked Σ) when the interval saw no lookups."""
    if not d:
        return "-"
    if d["hit_ratio"] is not None:
        return f"{_pct(d['hit_ratio'])} ({d['hits_per_s']:.0f}/s)"
    return f"{_pct(d['hit_ratio_total'])} Σ" if d["hit_ratio_total"] is not None else "-"


def _lat(t: dict[str, Any], op: str) -> str:
    d = t.get("latency", {}).get(op)
    if not d:
        return "-"
    if d["p50_s"] is not None:
        return _ms(d["p50_s"], d["p99_s"])
    return _ms(d["p50_total_s"], d["p99_total_s"]) + (" Σ" if d["p50_total_s"] is not None else "")


def render(view: dict[str, Any], error: str | None = None) -> Any:
    """Rich tables for one frame: occupancy and health, traffic, daemon moves."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    iv = view.get("interval_s")
    head = Text(f"kvbm-fs top  {view['url']}  " + (f"window {iv:.1f} s" if iv else "first scrape"), style="bold")
    occ = Table(title="tiers", title_justify="left")
    for col in ("tier", "blocks", "used / capacity", "used", "evicted", "refused", "verify failed", "store failed"):
        occ.add_column(col, justify="left" if col == "tier" else "right")
    occ.add_column("breaker")
    traffic = Table(title="traffic (this window; Σ = lifetime when idle)", title_justify="left")
    for col in ("tier", "lookup hit", "get hit", "read", "written", "get p50 / p99", "put p50 / p99"):
        traffic.add_column(col, justify="left" if col == "tier" else "right")
    for t in view["tiers"]:
        used, cap = t.get("used_bytes"), t.get("capacity_bytes")
        vf = t.get("verify_failed_blocks", 0)
        occ.add_row(
            t["tier"],
            str(t.get("blocks", "-")),
            f"{fmt_size(used) if used is not None else '-'} / {_cap(cap)}",
            _pct(t.get("used_fraction")),
            str(t.get("evicted_blocks", 0)),
            str(t.get("admission_refused_blocks", 0)),
            Text(str(vf), style="bold red" if vf else ""),
            str(t.get("store_failed_blocks", 0)),
            Text(
                t.get("breaker", "-"), style={"open": "bold red", "half-open": "yellow"}.get(t.get("breaker", ""), "")
            ),
        )
        traffic.add_row(
            t["tier"],
            _hit(t.get("lookup")),
            _hit(t.get("get")),
            _per_s(t.get("read_bytes_per_s")),
            _per_s(t.get("written_bytes_per_s")),
            _lat(t, "get"),
            _lat(t, "put"),
        )
    parts: list[Any] = [head, occ, traffic]
    if view["daemon"]:
        dm = Table(title="daemon moves", title_justify="left")
        for col in ("action", "blocks", "bytes", "blocks/s", "bytes/s"):
            dm.add_column(col, justify="left" if col == "action" else "right")
        for action, d in sorted(view["daemon"].items()):
            bps = d.get("blocks_per_s")
            dm.add_row(
                action,
                str(d.get("blocks", 0)),
                fmt_size(d.get("bytes", 0)),
                "-" if bps is None else f"{bps:.1f}",
                _per_s(d.get("bytes_per_s")),
            )
        parts.append(dm)
    if error:
        parts.append(Text(f"last scrape failed: {error}", style="bold red"))
    return Group(*parts)


def _url(args: argparse.Namespace) -> str:
    if args.url and args.port is not None:
        raise ConfigError("give --url or --port, not both")
    if args.url:
        return str(args.url)
    port = args.port if args.port is not None else os.environ.get("KVBM_FS_METRICS_PORT", DEFAULT_PORT)
    try:
        return f"http://127.0.0.1:{int(port)}/metrics"
    except ValueError:
        raise ConfigError(f"KVBM_FS_METRICS_PORT={port!r} is not a port number") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvbm-fs top",
        description="Live view of a kvbm_fs store from its Prometheus endpoint: tiers, hit rates, bandwidth, "
        "latency quantiles, verification failures, breaker state and daemon moves.",
    )
    p.add_argument("--url", help="metrics URL (default http://127.0.0.1:$KVBM_FS_METRICS_PORT/metrics, port 9400)")
    p.add_argument("--port", type=int, help="scrape http://127.0.0.1:PORT/metrics")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between scrapes (default 2)")
    p.add_argument("--once", action="store_true", help="print one frame from two scrapes --interval apart, exit")
    p.add_argument("--json", action="store_true", help="print the view as JSON (one line per frame when live)")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        if not args.interval > 0:
            raise ConfigError(f"--interval must be positive, got {args.interval}")
        return _run(_url(args), args.interval, args.once, args.json)
    except KvbmError as e:
        print(f"kvbm-fs top: error: {e}", file=sys.stderr)
        return 2


def _run(url: str, interval: float, once: bool, as_json: bool) -> int:
    from rich.console import Console

    console = Console()
    prev = scrape(url)  # a dead endpoint fails here, before any screen is drawn
    try:
        if once or as_json:
            while True:
                time.sleep(interval)
                cur = scrape(url)
                view = compute_view(prev, cur)
                if as_json:
                    print(json.dumps(view, indent=2 if once else None), flush=True)
                else:
                    console.print(render(view))
                if once:
                    return 0
                prev = cur
        import signal
        import threading

        from rich.live import Live

        # Ctrl-C sets a flag the loop checks, instead of raising wherever it lands (mid-render, it
        # could leave the live display half torn down and the process hanging); the caller's handler
        # is back when it returns (main() is callable in-process)
        stop = threading.Event()
        previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
        try:
            with Live(render(compute_view(None, prev)), console=console, auto_refresh=False) as live:
                while not stop.wait(interval):
                    try:
                        cur = scrape(url)
                    except MetricsScrapeError as e:  # keep the last frame; the store may come back
                        live.update(render(compute_view(None, prev), error=str(e)), refresh=True)
                        continue
                    live.update(render(compute_view(prev, cur)), refresh=True)
                    prev = cur
        finally:  # None: a handler not set from Python; the default is the nearest
            signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)
        return 0
    except KeyboardInterrupt:
        return 0
