"""A ZMQ SUB socket on a KV-event publisher, for tests.

Reads go on until a condition holds (the publisher's last batch arrived, an ``AllBlocksCleared`` came),
with a generous cap, never "until the socket stays quiet for 200 ms", which a busy machine breaks.
pyzmq is imported when a socket opens, so tests that skip without it can import this module.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from kvbm_fs.kv_events import AllBlocksCleared, KVEventPublisher, decoder

CAP_S = 60.0  # what a read waits at most for its condition: only a broken publisher takes this long


class Sub:
    """A SUB socket that connects to ``endpoint`` (or, with ``bind``, binds one of its own on
    127.0.0.1 for a publisher to connect to) and keeps every batch it read, as (topic, seq, batch)."""

    def __init__(self, endpoint: str | None = None, *, topic: str = "", bind: bool = False, decode: Any = None) -> None:
        import zmq

        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        if bind:
            self.sock.bind("tcp://127.0.0.1:0")
            self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        else:
            assert endpoint is not None, "a connecting SUB needs the publisher's endpoint"
            self.sock.connect(endpoint)
            self.endpoint = endpoint
        self.decode = decode or decoder()
        self.batches: list[tuple[str, int, Any]] = []

    @property
    def events(self) -> list[Any]:
        return [ev for _, _, b in self.batches for ev in b.events]

    def read(self, until: Callable[[Sub], bool], timeout: float | None = CAP_S) -> list[Any]:
        """Read batches until ``until(self)`` holds; the events read by this call. Fails after ``timeout``
        (None: no limit, for a reader whose ``until`` ends with something else that is bounded)."""
        first = len(self.batches)
        deadline = time.monotonic() + (timeout if timeout is not None else float("inf"))
        while not until(self):
            left = deadline - time.monotonic()
            assert left > 0, f"no KV event batch met the condition in {timeout:.0f} s ({len(self.batches)} read)"
            if self.sock.poll(int(min(left, 0.1) * 1000) + 1):
                topic, seq, payload = self.sock.recv_multipart()
                self.batches.append((topic.decode(), int.from_bytes(seq, "big"), self.decode.decode(payload)))
        return [ev for _, _, b in self.batches[first:] for ev in b.events]

    def read_upto(self, pub: KVEventPublisher, timeout: float = CAP_S) -> list[Any]:
        """Everything ``pub`` (in this process) has published: flushed first while it is open, then read
        until its last batch arrived (batches carry consecutive sequence numbers from 0)."""
        if not pub._closed:
            assert pub.flush(), "the publisher did not flush"
        last = int(pub.stats()["batches"]) - 1
        return self.read(lambda s: last < 0 or any(seq >= last for _, seq, _ in s.batches), timeout)

    def read_until_cleared(
        self, done: Callable[[], bool] = lambda: True, abort: Callable[[], bool] = lambda: False, timeout: float = CAP_S
    ) -> list[Any]:
        """Read until ``done()`` holds (the publisher's process exited: no limit here) and then until the
        last event read is ``AllBlocksCleared`` (what a closing publisher sends last; ``timeout`` applies);
        or until ``abort()``. For a publisher in another process."""
        first = len(self.batches)
        self.read(lambda s: abort() or done(), None)
        self.read(lambda s: abort() or (bool(s.batches) and _cleared(s.batches[-1][2])), timeout)
        return [ev for _, _, b in self.batches[first:] for ev in b.events]

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()

    def __enter__(self) -> Sub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cleared(batch: Any) -> bool:
    return bool(batch.events) and type(batch.events[-1]).__name__ == AllBlocksCleared.__name__


def subscribe(pub: KVEventPublisher, topic: str = "", n: int = 1, decode: Any = None) -> Sub:
    """A Sub connected to ``pub`` whose subscription has reached it (ZMQ drops what PUB sent before)."""
    sub = Sub(pub.endpoint, topic=topic, decode=decode)
    assert pub.wait_subscribed(n), "the subscription never reached the publisher"
    return sub
