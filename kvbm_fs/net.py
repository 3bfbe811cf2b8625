"""A TCP listener that hands each connection to a thread of its own, and stops cleanly.

Shared by the peer tier's control server and the tests' fault-injecting proxy: both serve a few
long-lived connections, where a thread per connection is the simple, adequate design."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable


class Listener:
    def __init__(
        self,
        host: str,
        port: int,
        handle: Callable[[socket.socket], None],
        *,
        name: str,
        backlog: int = 64,
        nodelay: bool = False,
    ) -> None:
        self._handle, self._nodelay = handle, nodelay
        self._sock = socket.create_server((host, port), backlog=backlog)
        self.host, self.port = host, int(self._sock.getsockname()[1])
        self.stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True, name=name)
        self._thread.start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            if self._nodelay:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def close(self) -> None:
        """Stop listening: from now on the port refuses connections.

        shutdown() wakes the accept() in the serving thread; close() alone leaves it blocked
        there, still accepting one more connection."""
        self.stopped.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(5)
