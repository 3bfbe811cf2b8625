"""A KV-aware router's index, built from KV events alone: which instance holds the longest prefix?

Two kvbm_fs stores (two serving instances) publish vLLM-format KV events on 127.0.0.1.  The router
never touches a store: it subscribes to each instance's PUB socket, catches up through the replay
socket, and keeps {block hash -> media} per instance.  It hashes a prompt with the same Dynamo v1
sequence hashes kvbm_fs names blocks by, and answers with the instance holding the longest prefix.

Run: .venv/bin/python examples/router_index.py   (needs the ``events`` extra: pyzmq, msgspec)
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import zmq

from kvbm_fs import KVLayout, Store, hashing, mount
from kvbm_fs.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, decoder, publisher_of, replay

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=32, block_size=16, dtype="float16")
LOOPBACK = {"endpoint": "tcp://127.0.0.1:0", "bind": True, "replay_endpoint": "tcp://127.0.0.1:0"}


class RouterIndex:
    """{instance: {block hash: {medium: count}}}, fed only by KV event batches."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.ctx = zmq.Context()
        self.poller = zmq.Poller()
        self.subs: dict[zmq.Socket[bytes], tuple[str, str | None]] = {}
        self.blocks: dict[str, dict[int, dict[str, int]]] = defaultdict(dict)
        self.last_seq: dict[str, int] = {}
        self.dec = decoder()

    def add_instance(self, name: str, endpoint: str, replay_endpoint: str | None = None) -> zmq.Socket[bytes]:
        sub = self.ctx.socket(zmq.SUB)
        sub.connect(endpoint)
        sub.setsockopt(zmq.SUBSCRIBE, b"")  # every namespace; a prefix such as b"kvbm_fs.<ns>" narrows it
        self.subs[sub] = (name, replay_endpoint)
        self.poller.register(sub, zmq.POLLIN)
        return sub

    def catch_up(self, name: str) -> None:
        """Ask the instance's replay socket for what this index has not seen (all of it, at first)."""
        ep = next(r for n, r in self.subs.values() if n == name)
        if ep is not None:
            for seq, payload in replay(self.ctx, ep, self.last_seq.get(name, -1) + 1):
                self._apply(name, seq, payload)

    def poll(self, timeout_ms: int = 200) -> int:
        """Apply every batch that arrives until the sockets stay quiet for ``timeout_ms``."""
        n = 0
        while ready := dict(self.poller.poll(timeout_ms)):
            for sub in ready:
                _topic, seq, payload = sub.recv_multipart()
                name, _ = self.subs[sub]
                seq_no = int.from_bytes(seq, "big")
                if seq_no > self.last_seq.get(name, -1) + 1:  # a gap: fetch the missed batches first
                    self.catch_up(name)
                self._apply(name, seq_no, payload)
                n += 1
        return n

    def _apply(self, name: str, seq: int, payload: bytes) -> None:
        if seq <= self.last_seq.get(name, -1):
            return  # already applied (live and replayed copies overlap)
        self.last_seq[name] = seq
        held = self.blocks[name]
        for ev in self.dec.decode(payload).events:
            if isinstance(ev, BlockStored):
                for h in ev.block_hashes:
                    media = held.setdefault(int(h), {})
                    media[str(ev.medium)] = media.get(str(ev.medium), 0) + 1
            elif isinstance(ev, BlockRemoved):
                for h in ev.block_hashes:
                    media = held.get(int(h), {})
                    if media.get(str(ev.medium), 0) > 1:
                        media[str(ev.medium)] -= 1
                    else:
                        media.pop(str(ev.medium), None)
                    if not media:
                        held.pop(int(h), None)
            elif isinstance(ev, AllBlocksCleared):
                held.clear()

    def longest_prefix(self, tokens: np.ndarray) -> list[tuple[str, int, list[str]]]:
        """[(instance, leading blocks it holds, medium of each)], best first."""
        hashes = hashing.sequence_hash_array(tokens, self.block_size, hashing.salt_hash()).tolist()
        out = []
        for name, _ in self.subs.values():
            held, media = self.blocks[name], []
            for h in hashes:
                if h not in held:
                    break
                media.append(min(held[h], key=["GPU", "CPU", "STORAGE"].index))  # the fastest copy
            out.append((name, len(media), media))
        return sorted(out, key=lambda r: -r[1])

    def close(self) -> None:
        self.ctx.destroy(linger=0)


def store(*tiers: str, daemon: object = None) -> Store:
    return mount(*tiers, layout=LAYOUT, model="router-demo", env={}, events=LOOPBACK, daemon=daemon)  # type: ignore[arg-type]


def main() -> int:
    import tempfile

    rng = np.random.default_rng(0)
    system = rng.integers(0, 32_000, 4 * 16)  # a 4-block system prompt
    chat = np.concatenate([system, rng.integers(0, 32_000, 4 * 16)])  # one conversation on top of it
    with tempfile.TemporaryDirectory() as tmp:
        nb = LAYOUT.block_nbytes
        a = store(f"host://?capacity={8 * nb}", f"file://{tmp}/a", daemon={"high": 0.9, "low": 0.5})
        b = store(f"host://?capacity={64 * nb}")
        assert a.daemon is not None
        a.stop_daemon()  # demote when the demo says so
        pa, pb = publisher_of(a), publisher_of(b)
        assert pa is not None and pb is not None
        router = RouterIndex(LAYOUT.block_size)

        kb = b.keys(system)
        b.put(kb, np.zeros((len(kb), nb), np.uint8))  # before the router listens: it catches up by replay
        assert pb.flush()
        for name, pub in (("A", pa), ("B", pb)):
            router.add_instance(name, pub.endpoint, pub.replay_endpoint)
            assert pub.wait_subscribed()
            router.catch_up(name)

        ka = a.keys(chat)
        a.put(ka, np.zeros((len(ka), nb), np.uint8))  # A served the whole conversation
        assert pa.flush()
        router.poll()
        query = np.concatenate([chat, rng.integers(0, 32_000, 40)])
        print("query of", len(query) // 16, "blocks; holders:", router.longest_prefix(query))
        assert router.longest_prefix(query)[0][:2] == ("A", 8)

        a.daemon.run_once()  # A's host tier is over its high mark: blocks move to A's disk
        assert pa.flush()
        router.poll()
        best = router.longest_prefix(query)[0]
        print("after A demoted to disk:", best)
        assert best[0] == "A" and "STORAGE" in best[2]

        a.close(persist=False)  # A leaves: AllBlocksCleared, the router forgets it
        router.poll()
        best = router.longest_prefix(query)[0]
        print("after A shut down:", best)
        assert best[:2] == ("B", 4)
        b.close()
        router.close()
    print("router index: answered from KV events alone")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
