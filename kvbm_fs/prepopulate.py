"""``kvbm-fs prepopulate``: warm persistent tiers offline by driving the serving engine itself.

The driver here is engine-neutral: it reads a corpus (JSONL prompts, token ids or chat messages; or a
Mooncake trace turned into tokens), keeps one shard of it, matches every prompt against the store so a
resumed run skips what is stored, orders prompts by how shared their prefixes are (so a budget keeps
the most valuable blocks), and hands batches to an :class:`Engine` that prefills them with its
connector storing the blocks. Engines live in ``integration/`` (``vllm_prepopulate``,
``hf_prepopulate``); the core never imports them at module level. Guide: docs/operations.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import xxhash

from .engine import present
from .errors import ConfigError, KvbmError
from .events import BlockEvent, EventKind
from .keys import BlockKeys, Namespace
from .store import Store
from .units import parse_size

log = logging.getLogger("kvbm_fs")
PRIORITY_DEPTH = 64  # leading blocks whose sharing counts decide the order (bounds the sort's work)


# ---- corpus -------------------------------------------------------------------------------------------


@dataclass
class Prompt:
    """One prompt of the corpus: its token ids and where it came from (``file:line``)."""

    tokens: np.ndarray
    where: str
    system: bool = False


@dataclass
class Corpus:
    prompts: list[Prompt] = field(default_factory=list)
    bad: list[dict[str, str]] = field(default_factory=list)  # {"where": "file:line", "error": ...}


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def chat(self, messages: list[dict[str, Any]]) -> list[int]: ...


class HFTokenizer:
    """A local transformers tokenizer, loaded on first use (a corpus of token ids never needs one)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._tok: Any = None
        self._error = "" if path else "a text or chat prompt needs a tokenizer (--tokenizer or --model)"

    def _get(self) -> Any:
        if self._tok is None and not self._error:
            try:
                auto = importlib.import_module("transformers").AutoTokenizer
                self._tok = auto.from_pretrained(self.path, local_files_only=True)
            except (ImportError, OSError, ValueError) as e:
                self._error = f"no tokenizer in {self.path}: {str(e).splitlines()[0]}"  # said once a line, tried once
        if self._error:
            raise ValueError(self._error)
        return self._tok

    def encode(self, text: str) -> list[int]:
        return list(self._get()(text)["input_ids"])

    def chat(self, messages: list[dict[str, Any]]) -> list[int]:
        out = self._get().apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        if hasattr(out, "keys") and "input_ids" in out:  # transformers 5 returns a BatchEncoding
            out = out["input_ids"]
        return [int(t) for t in out]


def parse_record(rec: Any, tokenizer: Tokenizer | None) -> np.ndarray:
    """Token ids of one JSONL record: ``{"prompt_token_ids"|"token_ids"|"input_ids": [...]}``, a bare list,
    ``{"prompt"|"text": "..."}`` or a bare string (tokenized), or ``{"messages": [...]}`` (chat template)."""
    if isinstance(rec, dict):
        for k in ("prompt_token_ids", "token_ids", "input_ids"):
            if k in rec:
                rec = rec[k]
                if not isinstance(rec, list):
                    raise ValueError("token ids must be a list of non-negative integers")
                break
        else:
            if "messages" in rec:
                msgs = rec["messages"]
                if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m for m in msgs):
                    raise ValueError("messages must be a list of {role, content} objects")
                if tokenizer is None:
                    raise ValueError("a chat prompt needs a tokenizer (--tokenizer or --model)")
                rec = tokenizer.chat(msgs)
            elif isinstance(rec.get("prompt", rec.get("text")), str):
                rec = rec.get("prompt", rec.get("text"))
            else:
                raise ValueError("expected prompt, prompt_token_ids or messages")
    if isinstance(rec, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer (--tokenizer or --model)")
        rec = tokenizer.encode(rec)
    if not isinstance(rec, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in rec):
        raise ValueError("token ids must be a list of non-negative integers")
    if not rec:
        raise ValueError("empty prompt")
    return np.asarray(rec, dtype=np.int64)


def read_jsonl(
    path: str,
    tokenizer: Tokenizer | None = None,
    *,
    strict: bool = False,
    system: bool = False,
    into: Corpus | None = None,
) -> Corpus:
    """Prompts of a JSONL file; a bad line is recorded with its line number and skipped (``strict``: raised)."""
    out = into if into is not None else Corpus()
    try:
        f = open(path, encoding="utf-8")  # noqa: SIM115 - the with below closes it; only open's error is caught
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                out.prompts.append(Prompt(parse_record(json.loads(line), tokenizer), where, system))
            except (ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
                if strict:
                    raise ConfigError(f"{where}: {e}") from None
                out.bad.append({"where": where, "error": str(e)})
    return out


def synthesize(
    path: str, *, block_tokens: int = 512, vocab_size: int = 32000, seed: int = 0, limit: int | None = None
) -> Corpus:
    """Prompts from a Mooncake trace: each hash id becomes ``block_tokens`` random tokens drawn from a
    generator seeded by (seed, id), so requests sharing leading hash ids share those tokens; the last
    id is cut to the request's ``input_length``."""
    from .replay import load_trace

    trace = load_trace(path, limit)
    memo: dict[int, np.ndarray] = {}
    out = Corpus()
    for i, (ids, length) in enumerate(zip(trace.requests, trace.input_lengths)):
        parts = []
        for h in np.asarray(ids).tolist():
            t = memo.get(h)
            if t is None:
                t = memo[h] = np.random.default_rng([seed, h]).integers(10, vocab_size, block_tokens, dtype=np.int64)
            parts.append(t)
        if not parts:
            continue
        toks = np.concatenate(parts)
        cut = min(max(int(length), (len(parts) - 1) * block_tokens + 1), toks.size)
        out.prompts.append(Prompt(toks[:cut], f"{path}:{i + 1}"))
    return out


def parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"--shard {text!r}: need 0 <= I < N")
    return i, n


def shard_of(tokens: np.ndarray, count: int) -> int:
    """The shard a prompt belongs to: a hash of its tokens, so the split depends on content, not line order."""
    return int(xxhash.xxh3_64_intdigest(np.ascontiguousarray(tokens, dtype="<i8").tobytes()) % count)


def shard(prompts: Sequence[Prompt], index: int, count: int) -> list[Prompt]:
    return list(prompts) if count == 1 else [p for p in prompts if shard_of(p.tokens, count) == index]


# ---- engines and the driver ------------------------------------------------------------------------------


class Engine(Protocol):
    """What the driver needs from an engine: the namespaces its connector stores into (one per rank; a
    prompt is stored when every rank holds its blocks), a store to match against, and a batched prefill."""

    name: str
    namespaces: list[Namespace]
    store: Store

    def prefill(self, batch: list[np.ndarray]) -> None: ...
    def counters(self) -> dict[str, float]: ...
    def close(self) -> None: ...


@dataclass
class Report:
    engine: str = ""
    namespace: str = ""
    model: str = ""
    shard: str = "0/1"
    prompts: int = 0  # in this shard, read without error
    prefilled: int = 0  # handed to the engine
    already_present: int = 0  # every block stored before this run (a resumed run skips them)
    covered: int = 0  # every block stored by an earlier prompt of this run (duplicates, prefixes)
    too_short: int = 0  # no full block
    not_reached: int = 0  # left when a budget stopped the run
    tokens: int = 0  # prompt tokens prefilled
    blocks: int = 0  # distinct full blocks of the shard's prompts
    blocks_stored: int = 0
    blocks_already_present: int = 0
    blocks_failed: int = 0  # planned but absent after the prefill
    bytes_stored: int = 0
    tiers: dict[str, dict[str, int]] = field(default_factory=dict)  # per tier: blocks, bytes added
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    stopped: str | None = None  # "max_blocks" | "max_bytes" when a budget ended the run
    verified: dict[str, dict[str, int]] = field(default_factory=dict)  # --verify: per persistent tier
    retained: dict[str, int] = field(default_factory=dict)  # --retain/--no-retain: per tier, blocks (re)marked
    bad_lines: list[dict[str, str]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    engine_counters: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Progress = Callable[[dict[str, Any]], None]


def _priority(uidx: list[np.ndarray], counts: np.ndarray, prompts: Sequence[Prompt]) -> list[int]:
    """Prompt order: system prompts first, then by how many prompts share each leading block (most shared
    first, lexicographically), so the prompts of the most shared prefix trees come before the rest."""
    keys = [(not prompts[i].system, tuple((-counts[u[:PRIORITY_DEPTH]]).tolist()), i) for i, u in enumerate(uidx)]
    return [k[2] for k in sorted(keys)]


def set_retain(
    store: Store, namespaces: Sequence[Namespace], retain: bool, share: float | None = None,
    hashes: np.ndarray | None = None,
) -> dict[str, int]:  # fmt: skip
    """Mark the blocks ``hashes`` (default: all held) of the namespaces retained (``share``: default
    0.3), or unmark them, on every tier that keeps marks (disk, remote, mooncake); {tier: blocks
    re-ranked}. GPU and host tiers are process memory: nothing there outlives the run."""
    from .tier import DEFAULT_RETAIN_SHARE, check_share

    share = check_share(DEFAULT_RETAIN_SHARE if share is None else share) if retain else None
    out: dict[str, int] = {}
    for tier in store.tiers:
        mark = getattr(tier, "retain", None)
        if callable(mark):
            out[tier.name] = sum(int(mark(ns.id, share, hashes)) for ns in namespaces)
    return out


def _present_all(engine: Engine, hashes: np.ndarray, parents: np.ndarray) -> np.ndarray:
    have = np.ones(hashes.size, bool)
    for ns in engine.namespaces:
        if have.any():
            idx = np.flatnonzero(have)
            have[idx] = present(engine.store, BlockKeys(ns.id, hashes[idx], parents[idx]))
    return have


class _TierCounts:
    """Blocks and bytes each tier stored while the run lasted (from the store's events: remote tiers
    without a bound do not count what they hold)."""

    def __init__(self, store: Store, namespaces: Sequence[Namespace]) -> None:
        self.nbytes = {ns.id: ns.layout.block_nbytes for ns in namespaces}
        self.tiers: dict[str, dict[str, int]] = {t.name: {"blocks": 0, "bytes": 0} for t in store.tiers}
        self.stop = store.events.subscribe(self._on, kinds=(EventKind.STORED,))

    def _on(self, ev: BlockEvent) -> None:
        d = self.tiers.setdefault(ev.tier, {"blocks": 0, "bytes": 0})
        d["blocks"] += len(ev.keys)
        d["bytes"] += len(ev.keys) * self.nbytes.get(ev.keys.ns, 0)


def _prefill(engine: Engine, batch: list[np.ndarray]) -> list[str]:
    """Prefill a batch; the error of each prompt ("" when it went through). A batch the engine refuses
    (e.g. one prompt over its maximum length) is retried prompt by prompt, so only the bad one fails."""
    try:
        engine.prefill(batch)
        return [""] * len(batch)
    except Exception as e:
        if len(batch) > 1:
            return [err for p in batch for err in _prefill(engine, [p])]
        log.warning("prepopulate: a prompt of %d tokens failed: %s", batch[0].size, e)
        return [f"{type(e).__name__}: {e}"]


def verify_blocks(engine: Engine, hashes: np.ndarray, parents: np.ndarray) -> dict[str, dict[str, int]]:
    """Read ``hashes`` back from each persistent tier of the engine's store (each tier verifies what
    it reads: header, key echo, checksum) and count per tier the blocks verified and failed (missing
    or corrupt). Chunks of about 64 MiB keep the buffer bounded."""
    out: dict[str, dict[str, int]] = {}
    for tier in engine.store.tiers:
        if not tier.persistent:
            continue
        ok = failed = 0
        for ns in engine.namespaces:
            step = max(1, (64 << 20) // ns.layout.block_nbytes)
            for a in range(0, hashes.size, step):
                keys = BlockKeys(ns.id, hashes[a : a + step], parents[a : a + step])
                rows = np.empty((len(keys), ns.layout.block_nbytes), np.uint8)
                got = int(np.count_nonzero(tier.get(keys, rows)))
                ok, failed = ok + got, failed + len(keys) - got
        out[tier.name] = {"blocks": ok, "failed": failed}
    return out


def _progress(rep: Report, total: int, seconds: float, stored: int) -> dict[str, Any]:
    dt = max(seconds, 1e-9)
    rate = rep.prefilled / dt
    eta = round((total - rep.prefilled) / rate, 1) if rate else None
    return {"done": rep.prefilled, "total": total, "tokens": rep.tokens, "blocks_stored": stored,
            "prompts_per_s": round(rate, 2), "tokens_per_s": round(rep.tokens / dt, 1), "eta_s": eta}  # fmt: skip


def run(
    engine: Engine,
    corpus: Corpus,
    *,
    batch_size: int = 16,
    shard_spec: tuple[int, int] = (0, 1),
    max_blocks: int | None = None,
    max_bytes: int | None = None,
    progress: Progress | None = None,
    verify: bool = False,
    retain: bool | None = None,
    retain_share: float | None = None,
) -> Report:
    """Prefill the shard's prompts not yet stored, most shared prefixes first, within the budget.
    ``retain`` True then marks the corpus's blocks retained on the tiers that keep marks (disk, remote,
    mooncake), False unmarks them, None leaves marks alone."""
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    if retain and retain_share is not None:
        from .tier import check_share

        check_share(retain_share)  # before the run, not after it
    t0 = time.perf_counter()
    ns0 = engine.namespaces[0]
    rep = Report(engine.name, ns0.short_id, ns0.model, f"{shard_spec[0]}/{shard_spec[1]}", bad_lines=list(corpus.bad))
    prompts = shard(corpus.prompts, *shard_spec)
    rep.prompts = len(prompts)
    keys = [ns0.keys_for_tokens(p.tokens) for p in prompts]
    sizes = np.fromiter((len(k) for k in keys), np.int64, len(keys))
    all_h = np.concatenate([k.hashes for k in keys]) if keys else np.zeros(0, np.uint64)
    all_p = np.concatenate([k.parents for k in keys]) if keys else np.zeros(0, np.uint64)
    uniq, first, inverse, counts = np.unique(all_h, return_index=True, return_inverse=True, return_counts=True)
    uidx = np.split(inverse, np.cumsum(sizes)[:-1]) if keys else []
    stored = _present_all(engine, uniq, all_p[first])  # held now, or by the end of this run
    held_before = stored.copy()
    rep.blocks, rep.blocks_already_present = int(uniq.size), int(stored.sum())
    block_bytes = sum(ns.layout.block_nbytes for ns in engine.namespaces)
    budgets = [(n, why) for n, why in ((max_blocks, "max_blocks"), (max_bytes, "max_bytes")) if n is not None]
    tally = _TierCounts(engine.store, engine.namespaces)
    planned = 0
    plan: list[list[int]] = [[]]
    order = _priority(uidx, counts, prompts)
    for pos, i in enumerate(order):
        u = uidx[i]
        if not u.size:
            rep.too_short += 1
            continue
        if held_before[u].all():
            rep.already_present += 1
            continue
        new = np.unique(u[~stored[u]])
        if not new.size:
            rep.covered += 1
            continue
        over = [why for n, why in budgets if (planned + new.size) * (block_bytes if why == "max_bytes" else 1) > n]
        if over:
            rep.stopped = over[0]
            rep.not_reached = sum(1 for j in order[pos:] if uidx[j].size and not held_before[uidx[j]].all())
            break
        planned += int(new.size)
        stored[new] = True
        if len(plan[-1]) == batch_size:
            plan.append([])
        plan[-1].append(i)
    plan = [b for b in plan if b]
    total = sum(len(b) for b in plan)
    now = held_before.copy()
    try:
        for batch in plan:
            errors = _prefill(engine, [prompts[i].tokens for i in batch])
            rep.prefilled += sum(not e for e in errors)
            rep.tokens += int(sum(prompts[i].tokens.size for i, e in zip(batch, errors) if not e))
            bu = np.unique(np.concatenate([uidx[i] for i in batch]))
            todo = bu[~now[bu]]
            if todo.size:
                now[todo] = _present_all(engine, uniq[todo], all_p[first[todo]])
            for i, err in zip(batch, errors):
                missing = int((~now[uidx[i]]).sum())
                if missing:
                    rep.failures.append({"where": prompts[i].where, "error": err or f"{missing} blocks not stored"})
            if progress is not None:
                progress(_progress(rep, total, time.perf_counter() - t0, int((now & ~held_before).sum())))
    finally:
        tally.stop()
    rep.blocks_stored = int((now & ~held_before).sum())
    if retain is not None:  # every block of the corpus held now, stored by this run or before, most shared
        ranked = np.concatenate([uidx[i] for i in order]) if order else np.zeros(0, np.int64)  # first (a tier
        _, at = np.unique(ranked, return_index=True)  # that keeps only part of them keeps those)
        ranked = ranked[np.sort(at)]
        rep.retained = set_retain(engine.store, engine.namespaces, retain, retain_share, uniq[ranked[now[ranked]]])
        if not rep.retained:
            log.warning("kvbm-fs prepopulate: --retain: no tier keeps retain marks (disk, remote and mooncake do)")
    if verify:
        new = np.flatnonzero(now & ~held_before)
        rep.verified = verify_blocks(engine, uniq[new], all_p[first[new]])
        bad = max((d["failed"] for d in rep.verified.values()), default=0)
        if not rep.verified:
            rep.failures.append({"where": "verify", "error": "the store has no persistent tier to read back"})
        elif bad:
            rep.failures.append({"where": "verify", "error": f"{bad} stored blocks did not read back verified"})
    rep.blocks_failed = int((stored & ~now).sum())
    rep.bytes_stored = rep.blocks_stored * block_bytes
    rep.tiers = tally.tiers
    rep.seconds = round(time.perf_counter() - t0, 3)
    rep.tokens_per_s = round(rep.tokens / rep.seconds, 1) if rep.seconds else 0.0
    rep.engine_counters = engine.counters()
    return rep


# ---- command line --------------------------------------------------------------------------------------


def configure_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument(
        "corpus", nargs="?", help="JSONL: {prompt|prompt_token_ids|messages} a line (or a trace: --synthesize)"
    )
    p.add_argument("--engine", choices=("vllm", "hf"), help="serving engine (default: vllm when it imports, else hf)")
    p.add_argument("--tiers", nargs="+", help="tier URLs, fastest first (default: from --config / KVBM_FS_TIERS)")
    p.add_argument("--config", help="kvbm_fs TOML/YAML/JSON config (tiers, policy, ...)")
    p.add_argument("--system-prompts", help="JSONL of shared prefixes, stored first")
    p.add_argument("--synthesize", action="store_true", help="CORPUS is a Mooncake trace: random tokens per hash id")
    p.add_argument("--trace-block-tokens", type=int, default=512, help="tokens per trace hash id (default 512)")
    p.add_argument("--vocab-size", type=int, default=32000, help="token ids drawn below this (--synthesize)")
    p.add_argument("--seed", type=int, default=0, help="--synthesize seed")
    p.add_argument("--model", help="local model folder (nothing is downloaded)")
    p.add_argument("--tokenizer", help="local tokenizer folder (default: --model)")
    p.add_argument("--name", help="model name in the namespace (default: the engine's)")
    p.add_argument("--dtype", help="model dtype")
    p.add_argument("--block-size", type=int, help="KV block size in tokens (must be what the servers use)")
    p.add_argument("--tensor-parallel-size", type=int, help="vLLM tensor parallel size")
    p.add_argument("--kv-cache-dtype", help="vLLM KV cache dtype")
    p.add_argument("--max-model-len", type=int, help="vLLM max model length")
    p.add_argument("--engine-args", help="YAML file of vLLM engine arguments (flags above override it)")
    p.add_argument("--device", default="cpu", help="hf: torch device")
    p.add_argument("--weights", action="store_true", help="hf: fold a fingerprint of the weights into the namespace")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per engine call (default 16)")
    p.add_argument("--shard", help="I/N: this machine's share of the corpus (by a hash of each prompt)")
    p.add_argument("--max-blocks", type=int, help="stop before storing more than this many new blocks")
    p.add_argument("--max-bytes", help="stop before storing more than this many bytes (e.g. 50GiB)")
    p.add_argument("--strict", action="store_true", help="a malformed line is fatal")
    p.add_argument("--json", action="store_true", help="JSON progress lines and a JSON report on stdout")
    p.add_argument("--report", help="also write the JSON report to this file")
    p.add_argument("--verify", action="store_true", help="read the stored blocks back from each persistent tier")
    p.add_argument("--retain", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the corpus's blocks on disk, remote and mooncake tiers against everyday eviction "
                        "(--no-retain: undo)")  # fmt: skip
    p.add_argument("--retain-share", type=float, help="most of each tier's capacity retained blocks keep (default 0.3)")
    return p


def read_inputs(args: argparse.Namespace) -> Corpus:
    tok = HFTokenizer(args.tokenizer or args.model)
    corpus = Corpus()
    if args.system_prompts:
        read_jsonl(args.system_prompts, tok, strict=args.strict, system=True, into=corpus)
    if args.corpus and args.synthesize:
        syn = synthesize(args.corpus, block_tokens=args.trace_block_tokens, vocab_size=args.vocab_size, seed=args.seed)
        corpus.prompts += syn.prompts
    elif args.corpus:
        read_jsonl(args.corpus, tok, strict=args.strict, into=corpus)
    elif not args.system_prompts:
        raise ConfigError("nothing to prepopulate: give a CORPUS and/or --system-prompts")
    return corpus


def open_engine(args: argparse.Namespace) -> Engine:
    kind = args.engine or ("vllm" if importlib.util.find_spec("vllm") is not None else "hf")
    if not args.model:
        raise ConfigError("--model (a local model folder) is required")
    if kind == "vllm":
        from .integration.vllm_prepopulate import VllmEngine

        return VllmEngine.from_args(args)
    from .integration.hf_prepopulate import HFEngine

    return HFEngine.from_args(args)


def print_table(rep: Report, file: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"prepopulate {rep.engine} {rep.namespace} ({rep.model}) shard {rep.shard}")
    t.add_column("what")
    t.add_column("value", justify="right")
    for k in ("prompts", "prefilled", "already_present", "covered", "too_short", "not_reached", "tokens",
              "blocks", "blocks_stored", "blocks_already_present", "blocks_failed", "bytes_stored", "seconds",
              "tokens_per_s"):  # fmt: skip
        t.add_row(k, str(getattr(rep, k)))
    for name, d in rep.tiers.items():
        t.add_row(f"tier {name}", f"+{d['blocks']} blocks, +{d['bytes']} B")
    for name, n in rep.retained.items():
        t.add_row(f"retain {name}", f"{n} blocks re-ranked")
    t.add_row("stopped", rep.stopped or "-")
    t.add_row("bad lines / failures", f"{len(rep.bad_lines)} / {len(rep.failures)}")
    Console(file=file or sys.stdout).print(t)


class _Bar:
    """A rich progress bar on stderr: prompts done, prompts/s, tokens/s, ETA."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = (TextColumn("prefill"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"))
        self.p = Progress(*columns, TimeRemainingColumn(), console=Console(stderr=True))  # stdout: the table
        self.task: Any = None

    def __call__(self, d: dict[str, Any]) -> None:
        if self.task is None:
            self.p.start()
            self.task = self.p.add_task("prefill", total=d["total"], rate="")
        rate = f"{d['prompts_per_s']:.1f} prompts/s {d['tokens_per_s']:.0f} tok/s"
        self.p.update(self.task, completed=d["done"], rate=rate)

    def close(self) -> None:
        if self.task is not None:
            self.p.stop()


def prepopulate_cli(args: argparse.Namespace) -> int:
    if args.max_bytes is not None:
        args.max_bytes = parse_size(args.max_bytes)
    spec = parse_shard(args.shard)
    if args.retain_share is not None:
        from .tier import check_share

        check_share(args.retain_share)
    corpus = read_inputs(args)
    for b in corpus.bad:
        print(f"kvbm-fs prepopulate: skipped {b['where']}: {b['error']}", file=sys.stderr)
    engine = open_engine(args)
    bar = None if args.json else _Bar()

    def json_line(d: dict[str, Any]) -> None:
        print(json.dumps({"event": "progress", **d}), flush=True)

    try:
        rep = run(engine, corpus, batch_size=args.batch_size, shard_spec=spec, max_blocks=args.max_blocks,
                  max_bytes=args.max_bytes, progress=json_line if bar is None else bar, verify=args.verify,
                  retain=args.retain, retain_share=args.retain_share)  # fmt: skip
    finally:
        if bar is not None:
            bar.close()
        engine.close()
    out = rep.to_dict()
    if args.report:
        with open(args.report, "w") as f:
            json.dump(out, f, indent=2)
    if args.json:
        print(json.dumps({"event": "report", **out}), flush=True)
    else:
        print_table(rep)
    return 1 if rep.failures else 0


def main(argv: Iterable[str] | None = None) -> int:
    p = configure_parser(argparse.ArgumentParser(prog="kvbm-fs prepopulate", description=__doc__.split("\n")[0]))
    args = p.parse_args(None if argv is None else list(argv))
    try:
        return prepopulate_cli(args)
    except KvbmError as e:
        print(f"kvbm-fs prepopulate: error: {e}", file=sys.stderr)
        return 2


__all__ = ["Corpus", "Engine", "Prompt", "Report", "main", "parse_record", "read_jsonl", "run", "shard", "synthesize"]
