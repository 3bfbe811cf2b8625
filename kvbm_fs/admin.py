"""Operator commands: ``kvbm-fs ls|du|stat|rm|verify|cp TARGET``, each a rich table or ``--json``.

The work is done by :mod:`kvbm_fs.catalog`; this module parses arguments and renders results.
Progress bars (blocks/s, ETA) go to stderr, so ``--json`` output on stdout stays clean.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from .catalog import Catalog, Progress, parse_age, stored_bytes
from .errors import ConfigError
from .units import fmt_size

COMMANDS = ("ls", "du", "stat", "rm", "verify", "cp")
TARGET_HELP = "a tier URL (file:///var/cache/kvbm, s3://bucket/prefix?endpoint_url=...) or a config file"


def add_parsers(sub: Any) -> None:
    """Register the operator subcommands on ``kvbm-fs``'s subparsers."""

    def cmd(name: str, text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=text, description=text)
        p.add_argument("target", help=TARGET_HELP)
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")
        return p

    cmd("ls", "namespaces of the persistent tiers: model, layout, tenant, rank, blocks, bytes, oldest, newest")
    cmd("du", "usage per tier and namespace")
    st = cmd("stat", "where each block of a prompt (or a given hash) lives")
    what = st.add_mutually_exclusive_group(required=True)
    what.add_argument("--tokens", help="file of token ids (a JSON list, or integers separated by spaces/commas)")
    what.add_argument("--hash", action="append", help="a block's sequence hash, 16 hex digits (repeatable)")
    st.add_argument("--namespace", help="namespace id (hex, or a unique prefix); default: every namespace")
    st.add_argument("--cache-salt", help="the request's cache_salt, as the engine hashed it")
    rm = cmd("rm", "remove the blocks of a namespace, of a tenant's namespaces, or written before an age")
    rm.add_argument("--namespace", help="namespace id (hex, or a unique prefix)")
    rm.add_argument("--tenant", help="every namespace of this tenant")
    rm.add_argument("--older-than", help="blocks written longer ago than this (30m, 12h, 7d); remote tiers only")
    rm.add_argument("--dry-run", action="store_true", help="say what would be removed; remove nothing")
    v = cmd("verify", "re-read and check every block of the disk and remote tiers (extends `check --deep`)")
    v.add_argument("--fix", action="store_true", help="remove blocks that fail, and free slots of dead writers")
    v.add_argument("--rebuild-index", action="store_true", help="rebuild disk tiers' indexes from their segments first")
    cp = sub.add_parser(
        "cp",
        help="copy blocks between two tiers (verified; resumes: blocks already there are skipped)",
        description="Copy every block of SRC (or of some namespaces) into DST, e.g. to seed a new cluster's "
        "bucket from a disk tier. DST is created if missing (a new disk tier gets room for SRC's blocks "
        "unless its URL says ?capacity=).",
    )
    cp.add_argument("src", help=TARGET_HELP)
    cp.add_argument("dst", help="one tier URL or a config with one tier")
    cp.add_argument("--namespace", action="append", help="copy only this namespace (repeatable)")
    cp.add_argument("--limit", type=int, help="stop after writing this many blocks")
    cp.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    fn: Callable[[argparse.Namespace], int] = globals()[f"_{args.cmd}"]
    return fn(args)


# ---- commands ------------------------------------------------------------------------------------
def _ls(args: argparse.Namespace) -> int:
    with Catalog.open(args.target) as cat:
        rows = cat.ls()
    if args.json:
        return _print_json({"namespaces": rows})
    t = _table("namespace", "model", "layout", "tenant", "rank", "blocks", "bytes", "oldest", "newest", "tiers")
    for r in rows:
        rank = f"{r['rank']}/{r['world_size']}" if r["rank"] is not None else "-"
        tiers = " ".join(f"{k}:{v['blocks']}" for k, v in r["tiers"].items())
        tiers += "".join(f" (retained on {k}, share {s:g})" for k, s in r["retained"].items())
        t.add_row(r["namespace"], r["model"] or "?", _layout(r["layout"]), r["tenant"] or "-", rank,
                  str(r["blocks"]), fmt_size(r["bytes"]), _when(r["oldest"]), _when(r["newest"]), tiers)  # fmt: skip
    return _print(t, f"{len(rows)} namespaces, {sum(r['blocks'] for r in rows)} blocks")


def _du(args: argparse.Namespace) -> int:
    with Catalog.open(args.target) as cat:
        tiers = cat.du()
    if args.json:
        return _print_json({"tiers": tiers, "blocks": sum(t["blocks"] for t in tiers),
                            "bytes": sum(t["bytes"] for t in tiers)})  # fmt: skip
    t = _table("tier", "namespace", "blocks", "bytes", "capacity", "used")
    for d in tiers:
        cap = d["capacity_bytes"]
        used = f"{100 * d['bytes'] / cap:.1f}%" if cap else "-"
        t.add_row(
            d["tier"], "(all)", str(d["blocks"]), fmt_size(d["bytes"]), fmt_size(cap) if cap else "unbounded", used
        )
        for ns, u in d["namespaces"].items():
            t.add_row("", ns, str(u["blocks"]), fmt_size(u["bytes"]), "", "")
    return _print(t, None)


def _stat(args: argparse.Namespace) -> int:
    with Catalog.open(args.target) as cat:
        ids = [cat.resolve_namespace(args.namespace)] if args.namespace is not None else cat.namespace_ids()
        results = []
        for ns in ids:
            if args.tokens is not None:
                d = cat.namespace(ns)
                if d is None or d.hash_scheme != "kvbm-v1":
                    continue  # tokens hash into keys only where the layout and scheme are known
                keys = d.keys_for_tokens(_read_tokens(args.tokens), cache_salt=args.cache_salt)
            else:
                from .keys import BlockKeys

                keys = BlockKeys(ns, np.array([_hex(h) for h in args.hash], np.uint64))
            results.append(cat.locate(keys))
    if not results:
        raise ConfigError("no namespace here can hash tokens (none is described with a kvbm-v1 layout)")
    if args.json:
        return _print_json({"namespaces": results})
    t = _table("namespace", "block", "hash", "tiers")
    for r in results:
        for k in r["keys"]:
            t.add_row(r["namespace"], str(k["index"]), k["hash"], ", ".join(k["tiers"]) or "[red]nowhere[/]")
    found = "; ".join(f"{r['namespace']}: " + ", ".join(f"{n} {c}/{r['blocks']}" for n, c in r["found"].items())
                      for r in results)  # fmt: skip
    return _print(t, found)


def _rm(args: argparse.Namespace) -> int:
    age = parse_age(args.older_than) if args.older_than is not None else None
    with Catalog.open(args.target) as cat:
        rep = cat.remove(cat.select(args.namespace, args.tenant, age), dry_run=args.dry_run)
    if args.older_than is not None and rep["no_write_times"]:
        print(f"kvbm-fs: note: {', '.join(rep['no_write_times'])} record no write times; --older-than "
              "selects nothing there", file=sys.stderr)  # fmt: skip
    if args.json:
        return _print_json(rep)
    t = _table("tier", "namespace", "blocks", "bytes", "removed")
    for r in rep["rows"]:
        t.add_row(r["tier"], r["namespace"], str(r["blocks"]), fmt_size(r["bytes"]), str(r["removed"]))
    verb = "would remove" if rep["dry_run"] else "removed"
    return _print(t, f"{verb} {rep['selected'] if rep['dry_run'] else rep['removed']} blocks")


def _verify(args: argparse.Namespace) -> int:
    rebuilt = _rebuild(args.target, not args.json) if args.rebuild_index else None
    with Catalog.open(args.target) as cat, _progress(not args.json) as bar:
        rep = cat.verify(fix=args.fix, progress=bar)
    if rebuilt is not None:
        rep["rebuilt"] = rebuilt
    code = 0 if rep["bad"] == 0 or args.fix else 1
    if args.json:
        _print_json(rep)
        return code
    t = _table("tier", "entries", "ok", "bad", "fixed", "first problem")
    for r in rep["tiers"]:
        first = r["bad_keys"][0] if r["bad_keys"] else None
        t.add_row(r["tier"], str(r["entries"]), str(r["ok"]), str(r["bad"]), str(r["fixed"]),
                  f"{first[0]}: {first[1]}" if first else "")  # fmt: skip
    _print(t, None)
    return code


def _rebuild(target: str, show: bool) -> list[dict[str, Any]]:
    """Rebuild the index of every disk tier of ``target`` from its segment files (tiers/disk/rebuild.py)."""
    from . import catalog
    from .tiers.disk import rebuild as disk_rebuild

    rebuild = getattr(disk_rebuild, "rebuild_index", None)
    if rebuild is None:
        raise ConfigError("this build cannot rebuild disk indexes (kvbm_fs.tiers.disk.rebuild.rebuild_index)")
    out = []
    for _, spec in catalog.target_specs(target):
        if spec.scheme in ("file", "disk"):
            with _progress(show) as bar:
                cb = _absolute(bar(f"rebuild {spec.location}", 0))
                out.append({"path": spec.location, **rebuild(spec.location, progress=cb)})
    return out


def _absolute(advance: Any) -> Callable[[int, int], None]:
    """rebuild_index reports (slots done, slots in all); the bar advances by steps."""
    done = [0]

    def cb(n: int, total: int) -> None:
        advance(n - done[0], total=total)
        done[0] = n

    return cb


def _cp(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    with Catalog.open(args.src) as src:
        sizes = {t.block_nbytes for t in src.tiers}
        if len(sizes) != 1:
            raise ConfigError(f"{args.src}: the source tiers hold blocks of different sizes {sorted(sizes)}")
        n = sum(len(b.hashes) for t in src.tiers for b in src.blocks(t).values())
        with Catalog.open(args.dst, create=True, block_nbytes=sizes.pop(), blocks=n) as dst:
            if len(dst.tiers) != 1:
                raise ConfigError(f"cp writes to one tier; {args.dst} names {len(dst.tiers)}")
            with _progress(not args.json) as bar:
                rep = src.copy_to(dst.tiers[0], args.namespace, args.limit, bar)
            dst_tier = dst.tiers[0]
            rep.update(src=args.src, dst=dst_tier.name, dst_block_bytes=stored_bytes(dst_tier))
    secs = time.monotonic() - t0
    rep.update(seconds=round(secs, 3), blocks_per_s=round(rep["written"] / secs, 1) if secs > 0 else None)
    if args.json:
        return _print_json(rep)
    t = _table("written", "already there", "failed verification", "refused (full)", "blocks/s")
    t.add_row(str(rep["written"]), str(rep["present"]), str(rep["failed"]), str(rep["refused"]),
              str(rep["blocks_per_s"]))  # fmt: skip
    note = (
        f"namespaces without a description (not copied): {', '.join(rep['undescribed'])}"
        if rep["undescribed"]
        else None
    )
    return _print(t, note)


# ---- rendering -----------------------------------------------------------------------------------
def _table(*cols: str) -> Any:
    from rich.table import Table

    t = Table(box=None, header_style="bold", pad_edge=False)
    for c in cols:
        right = c in ("blocks", "bytes", "entries", "ok", "bad", "fixed")
        t.add_column(c.upper(), justify="right" if right else "left", no_wrap=c != "first problem")
    return t


def _print(table: Any, caption: str | None) -> int:
    from rich.console import Console

    con = Console(width=max(100, _width()) if sys.stdout.isatty() else 400)  # piped: one line per row
    con.print(table)
    if caption:
        con.print(caption)
    return 0


def _width() -> int:
    import shutil

    return shutil.get_terminal_size((160, 24)).columns


def _print_json(doc: Any) -> int:
    print(json.dumps(doc, indent=2, default=str))
    return 0


def _layout(d: dict[str, Any] | None) -> str:
    if not d:
        return "?"
    shape = (
        f"{d['num_layers']}L {d['head_dim']}d"
        if d.get("mla")
        else f"{d['num_layers']}L {d['num_kv_heads']}x{d['head_dim']}"
    )
    return f"{shape} bs{d['block_size']} {d['dtype']}" + (" mla" if d.get("mla") else "")


def _when(iso: str | None) -> str:
    return iso.replace("T", " ").removesuffix("+00:00") if iso else "-"


def _hex(text: str) -> int:
    try:
        v = int(text.lower().removeprefix("0x"), 16)
    except ValueError:
        raise ConfigError(f"--hash {text!r} is not hex") from None
    if v >> 64:
        raise ConfigError(f"--hash {text!r} has more than 64 bits")
    return v


def _read_tokens(path: str) -> np.ndarray:
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path) as f:
                text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read tokens file {path}: {e.strerror}") from None
    try:
        vals = json.loads(text) if text.lstrip().startswith("[") else text.replace(",", " ").split()
        return np.array([int(v) for v in vals], np.int64)
    except (ValueError, TypeError):
        raise ConfigError(f"{path}: token ids must be a JSON list or integers separated by spaces") from None


def _silent(desc: str, total: int) -> Callable[..., None]:
    return lambda *a, **k: None


@contextmanager
def _progress(show: bool) -> Iterator[Progress]:
    """A rich progress bar on stderr (blocks done, blocks/s, ETA); silent when ``show`` is false."""
    if not show:
        yield _silent
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        ProgressColumn,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.progress import Progress as Bar
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task: Any) -> Text:
            return Text(f"{task.speed or 0:,.0f} blocks/s")

    cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(), Rate(),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())  # fmt: skip
    with Bar(*cols, console=Console(stderr=True), transient=False) as bar:

        def task(desc: str, total: int) -> Callable[[int], None]:
            tid = bar.add_task(desc, total=total or None)

            def advance(n: int, total: int | None = None) -> None:
                bar.update(tid, advance=n, total=total)

            return advance

        yield task
