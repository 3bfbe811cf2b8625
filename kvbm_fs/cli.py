"""``kvbm-fs`` command line: ``demo`` (the main job on embedded defaults), ``info``, ``check``, ``gds``, ``replay``, ``daemon``, ``serve``,
``prepopulate`` (offline warm-cache prepopulation driving the serving engine; ``hf-prepopulate`` is its
transformers alias)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import ConfigError, KvbmError


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["hf-prepopulate"] and len(argv) >= 3 and not argv[1].startswith("-"):
        argv = ["prepopulate", argv[2], "--engine", "hf", "--model", argv[1], *argv[3:]]  # the old spelling
    if argv[:1] in (["prepopulate"], ["hf-prepopulate"]):  # its own parser (kvbm_fs/prepopulate.py)
        from .prepopulate import main as prepopulate_main

        return prepopulate_main(argv[1:])
    if argv[:1] == ["top"]:  # its own parser (kvbm_fs/top.py)
        from .top import main as top_main

        return top_main(argv[1:])
    if argv[:1] == ["pd-proxy"]:  # its own parser (kvbm_fs/pd_proxy.py)
        from .pd_proxy import main as pd_proxy_main

        return pd_proxy_main(argv[1:])
    p = argparse.ArgumentParser(prog="kvbm-fs", description="Tiered KV-cache block store")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("top", help="live view of a store's metrics endpoint: tiers, hit rates, bandwidth, daemon moves")
    sub.add_parser("pd-proxy", help="prefill->decode proxy in front of vLLM servers (--help for options)")
    sub.add_parser(
        "prepopulate",
        help="warm persistent tiers offline with the serving engine itself (vllm or hf; --help for options)",
    )
    sub.add_parser("hf-prepopulate", help="MODEL_DIR PROMPTS ...: prepopulate --engine hf --model MODEL_DIR PROMPTS")
    d = sub.add_parser("demo", help="store and match real KV-shaped blocks through every tier")
    d.add_argument("--json", action="store_true", help="print only the JSON summary")
    d.add_argument("--requests", type=int, default=8)
    d.add_argument("--tiers", nargs="*", help="tier URLs, fastest first (default: GPU/CPU pool, host, local disk)")
    d.add_argument("--dir", help="folder for the default disk tier (default: ./.kvbm_fs-demo)")
    d.add_argument("--no-model", action="store_true", help="skip the transformers model part")
    i = sub.add_parser("info", help="show the store a config/environment would mount")
    i.add_argument("--config", help="TOML/YAML/JSON config file")
    c = sub.add_parser("check", help="verify a disk tier's index against its segment files")
    c.add_argument("url", help="file:///path/to/tier")
    c.add_argument("--deep", action="store_true", help="also verify every payload checksum")
    c.add_argument("--fix", action="store_true", help="remove bad entries and reclaim leaked slots")
    c.add_argument(
        "--rebuild-index", action="store_true", help="rebuild the index from the segment files (old one kept aside)"
    )
    r = sub.add_parser(
        "replay",
        help="replay a Mooncake-format trace through the store: every policy beside Belady's optimum",
        description="Replays a request trace (JSONL with hash_ids) through the real store for each policy at "
        "each capacity (one host tier holding that fraction of the trace's distinct blocks), beside "
        "Belady's MIN, and optionally over several tiers (--tiers host:0.02 disk:0.1 remote).",
    )
    r.add_argument("trace", help="JSONL trace, one request a line with hash_ids (Mooncake format)")
    r.add_argument(
        "--capacities", type=float, nargs="+", help="fractions of distinct blocks (default 0.02 0.05 0.1 0.2)"
    )
    r.add_argument("--policies", nargs="+", help="policy specs EVICTION[+ADMISSION] (default: every shipped one)")
    r.add_argument(
        "--tiers",
        nargs="+",
        help="multi-tier replay too: KIND[:FRACTION] ... with KIND in gpu, host, peer, disk, remote (peer: a host tier served over NIXL UCX)",
    )
    r.add_argument(
        "--placement",
        choices=("auto", "daemon", "spill"),
        default="auto",
        help="multi-tier: run the placement daemon after each request, or only spill refused puts (auto: daemon)",
    )
    r.add_argument("--real-bytes", action="store_true", help="move blocks of --block-bytes (default: 1 KiB stand-ins)")
    r.add_argument("--block-bytes", type=int, help="bytes per block with --real-bytes (default 262144)")
    r.add_argument("--prefill-tps", type=float, default=10_000.0, help="engine prefill rate, tokens/s (default 10000)")
    r.add_argument(
        "--kv-bytes-per-token",
        type=int,
        default=131_072,
        help="KV bytes per token for the cost model (default: Llama-3-8B fp16)",
    )
    r.add_argument(
        "--recompute",
        type=float,
        nargs=2,
        metavar=("A", "B"),
        help="recomputing block i costs A + B*i seconds (default: from --prefill-tps and attention cost)",
    )
    r.add_argument("--bandwidth", nargs="+", help="tier bandwidths for the cost model, NAME=BYTES_PER_S (host=12e9)")
    r.add_argument("--latency", nargs="+", help="tier latencies for the cost model, NAME=SECONDS (remote=0.03)")
    r.add_argument("--daemon", nargs="+", metavar="OPT=VALUE", help="placement daemon options (make_room=true)")
    r.add_argument("--out", help="folder for replay.json and replay.png")
    r.add_argument("--limit", type=int, help="replay only the first N requests")
    r.add_argument("--jobs", type=int, default=1, help="replays to run in parallel processes (default 1)")
    r.add_argument("--json", action="store_true", help="print the JSON result instead of the table")
    r.add_argument(
        "--instances",
        type=int,
        nargs="+",
        help="cluster replay: N instances (e.g. 1 4 16 64), each with its own host tier (the first of --tiers), "
        "sharing the other tiers (default tiers: host:0.02 disk:0.1 remote)",
    )
    r.add_argument(
        "--router",
        nargs="+",
        choices=("round-robin", "prefix-hash", "kv-aware"),
        help="cluster replay: routers to compare (default: all three)",
    )
    r.add_argument(
        "--load-weight", type=float, default=1.0, help="kv-aware: weight of queued prefill seconds (default 1)"
    )
    r.add_argument("--hash-blocks", type=int, default=1, help="prefix-hash: leading blocks hashed (default 1)")
    g = sub.add_parser("gds", help="say whether a disk tier in DIR would load into GPU memory by GDS, and why")
    g.add_argument("dir", nargs="?", default=".", help="folder a disk tier would live in (default: .)")
    g.add_argument("--no-trial", action="store_true", help="skip the put/get of GPU blocks through a scratch tier")
    dm = sub.add_parser(
        "daemon", help="run the placement daemon over the tiers of a config (e.g. shared disk + remote)"
    )
    dm.add_argument("--config", required=True, help="TOML/YAML/JSON config with tiers, layout and a [daemon] table")
    dm.add_argument("--once", action="store_true", help="run one round, print stats and exit")
    dm.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port (0: any free one)")
    dm.add_argument("--metrics-host", default="127.0.0.1", help="address /metrics listens on (default 127.0.0.1)")
    dm.add_argument("--events", help="publish KV events: an endpoint (tcp://*:5557) or a JSON [events] table")
    ps = sub.add_parser(
        "peer-serve",
        help="lend this machine's DRAM to peers: serve a host tier at peer://HOST:PORT until stopped "
        "(clients must present KVBM_FS_PEER_TOKEN if it is set)",
    )
    ps.add_argument("--capacity", default="1GiB", help="host memory to serve (default 1GiB)")
    ps.add_argument("--block-bytes", type=int, help="bytes per block (or take it from --config's layout)")
    ps.add_argument("--config", help="TOML/YAML/JSON config whose layout gives the block size")
    ps.add_argument("--host", default="127.0.0.1", help="address the control port listens on (default 127.0.0.1)")
    ps.add_argument("--port", type=int, default=0, help="control port (default: any free one, printed)")
    ps.add_argument("--policy", help="eviction policy of the served tier (default: the store default)")
    ps.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port (0: any free one)")
    ps.add_argument("--metrics-host", default="127.0.0.1", help="address /metrics listens on (default 127.0.0.1)")
    from . import admin, serve  # ls, du, stat, rm, verify, cp; serve (the node sidecar), health

    admin.add_parsers(sub)
    serve.add_parsers(sub)
    args = p.parse_args(argv)
    try:
        if args.cmd in admin.COMMANDS:
            return admin.run(args)
        if args.cmd in serve.COMMANDS:
            return serve.run(args)
        if args.cmd == "demo":
            from .demo import DEMO_DIR, default_tiers, run_demo

            root = args.dir or DEMO_DIR
            tiers = args.tiers or default_tiers(root)
            return run_demo(
                requests=args.requests,
                tiers=tiers,
                json_only=args.json,
                model_dir=os.path.join(root, "hf"),
                model=not args.no_model,
            )
        if args.cmd == "replay" and args.instances:
            from .cluster import cli_main

            return cli_main(args)
        if args.cmd == "replay":
            from .replay import run_cli

            return run_cli(
                args.trace,
                capacities=args.capacities,
                policies=args.policies,
                tiers=args.tiers,
                placement=args.placement,
                real_bytes=args.real_bytes,
                block_bytes=args.block_bytes,
                prefill_tps=args.prefill_tps,
                kv_bytes_per_token=args.kv_bytes_per_token,
                recompute=args.recompute,
                daemon=args.daemon,
                bandwidth=args.bandwidth,
                latency=args.latency,
                out_dir=args.out,
                limit=args.limit,
                jobs=args.jobs,
                json_only=args.json,
            )
        if args.cmd == "daemon":
            return _daemon(args.config, args.once, args.metrics_port, args.metrics_host, args.events)
        if args.cmd == "peer-serve":
            return _peer_serve(args)
        if args.cmd == "check" and args.rebuild_index:
            from .maintenance import rebuild_index

            print(json.dumps(rebuild_index(args.url, deep=args.deep), indent=2, default=str))
            return 0
        if args.cmd == "check":
            from .maintenance import check

            report = check(args.url, fix=args.fix, deep=args.deep)
            print(json.dumps(report, indent=2, default=str))
            return 0 if report["bad"] == 0 or args.fix else 1
        if args.cmd == "gds":
            from .gds_doctor import diagnose

            print(json.dumps(diagnose(args.dir, trial=not args.no_trial), indent=2))
            return 0
        if args.cmd == "info":
            from .mount import mount

            with mount(config=args.config) as store:
                print(json.dumps(store.stats(), indent=2))
            return 0
    except KvbmError as e:
        print(f"kvbm-fs: error: {e}", file=sys.stderr)
        return 2
    return 1


def _peer_serve(args: argparse.Namespace) -> int:
    """A memory-only peer: one host tier, served until SIGINT/SIGTERM; prints its URL as JSON."""
    from .serve import say, stop_event
    from .tiers.peer import serve_host_memory

    block = args.block_bytes
    if block is None:
        if not args.config:
            raise ConfigError("peer-serve needs --block-bytes or a --config with a layout")
        from .config import resolve

        block = resolve(config=args.config).namespace().block_nbytes
    srv = serve_host_memory(args.capacity, block, args.host, args.port, args.policy)
    metrics = None
    if args.metrics_port is not None:  # the served tier's own figures (what it holds, stores, evicts)
        from .metrics import StoreMetrics

        metrics = StoreMetrics([srv.tier], srv.tier.events)
        metrics.serve(args.metrics_port, args.metrics_host)
    done = stop_event()
    info = {"url": srv.url, "block_bytes": block, "slots": srv.slots}
    if metrics is not None:
        info["metrics_port"] = metrics.port
    say(info)
    done.wait()
    if metrics is not None:
        metrics.close()
    srv.close()
    srv.tier.close()
    return 0  # a plain exit: nixl_api pins the host's rdma-core, so UCX no longer crashes at exit


def _daemon(
    config: str, once: bool, metrics_port: int | None = None, metrics_host: str = "127.0.0.1", events: str | None = None
) -> int:
    """Standalone daemon: no engine in this process, so it only demotes between the configured tiers."""
    import threading

    from .config import events_text, load_file
    from .mount import mount
    from .serve import stop_event

    daemon_cfg = load_file(config).get("daemon", True)
    with mount(config=config, events=None if events is None else events_text(events, "--events")) as store:
        if metrics_port is not None:
            store.enable_metrics(metrics_port, metrics_host)
        d = store.start_daemon(daemon_cfg if isinstance(daemon_cfg, dict) else None)
        done = threading.Event() if once else stop_event()
        if metrics_port is not None:  # the ready line: a SIGINT from here on stops cleanly
            print(json.dumps({"metrics_port": store.enable_metrics().port}), flush=True)
        if "kvbm_fs.kv_events" in sys.modules:  # mount attached a publisher: say where (port 0 picks one)
            from .kv_events import publisher_of

            pub = publisher_of(store)
            if pub is not None:
                print(json.dumps({"events_endpoint": pub.endpoint, "replay_endpoint": pub.replay_endpoint}), flush=True)
        if once:
            d.stop()
            d.run_once()
        else:
            done.wait()
            d.stop()
        print(json.dumps(store.stats(), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
