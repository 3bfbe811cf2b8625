"""``kvbm-fs`` command line: ``demo`` (the main job on embedded defaults) and ``info``."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import KvbmError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvbm-fs", description="Tiered KV-cache block store")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="store and match real KV-shaped blocks through every tier")
    d.add_argument("--json", action="store_true", help="print only the JSON summary")
    d.add_argument("--requests", type=int, default=8)
    d.add_argument("--tiers", nargs="*", help="tier URLs, fastest first (default: GPU/CPU pool, host, local disk)")
    d.add_argument("--dir", help="folder for the default disk tier (default: ./.kvbm_fs-demo)")
    i = sub.add_parser("info", help="show the store a config/environment would mount")
    i.add_argument("--config", help="TOML/YAML/JSON config file")
    c = sub.add_parser("check", help="verify a disk tier's index against its segment files")
    c.add_argument("url", help="file:///path/to/tier")
    c.add_argument("--deep", action="store_true", help="also verify every payload checksum")
    c.add_argument("--fix", action="store_true", help="remove bad entries and reclaim leaked slots")
    dm = sub.add_parser(
        "daemon", help="run the placement daemon over the tiers of a config (e.g. shared disk + remote)"
    )
    dm.add_argument("--config", required=True, help="TOML/YAML/JSON config with tiers, layout and a [daemon] table")
    dm.add_argument("--once", action="store_true", help="run one round, print stats and exit")
    args = p.parse_args(argv)
    try:
        if args.cmd == "demo":
            from .demo import DEMO_DIR, default_tiers, run_demo

            tiers = args.tiers or default_tiers(args.dir or DEMO_DIR)
            return run_demo(requests=args.requests, tiers=tiers, json_only=args.json)
        if args.cmd == "daemon":
            return _daemon(args.config, args.once)
        if args.cmd == "check":
            from .maintenance import check

            report = check(args.url, fix=args.fix, deep=args.deep)
            print(json.dumps(report, indent=2, default=str))
            return 0 if report["bad"] == 0 or args.fix else 1
        if args.cmd == "info":
            from .mount import mount

            with mount(config=args.config) as store:
                print(json.dumps(store.stats(), indent=2))
            return 0
    except KvbmError as e:
        print(f"kvbm-fs: error: {e}", file=sys.stderr)
        return 2
    return 1


def _daemon(config: str, once: bool) -> int:
    """Standalone daemon: no engine in this process, so it only demotes between the configured tiers."""
    import signal
    import threading

    from .config import load_file
    from .mount import mount

    daemon_cfg = load_file(config).get("daemon", True)
    with mount(config=config) as store:
        d = store.start_daemon(daemon_cfg if isinstance(daemon_cfg, dict) else None)
        if once:
            d.stop()
            d.run_once()
        else:
            done = threading.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: done.set())
            done.wait()
            d.stop()
        print(json.dumps(store.stats(), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
