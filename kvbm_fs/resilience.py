"""Failure handling shared by the networked tiers (remote, peer): a circuit breaker and jittered backoff.

A dead endpoint should cost one timeout per cool-down, not one per request: the breaker stops
calling it after ``threshold`` consecutive failures and lets one probe through after ``cooldown``.
"""

from __future__ import annotations

import random
import threading
import time


class CircuitBreaker:
    """Closed -> open after ``threshold`` consecutive failures; after ``cooldown`` s one probe may pass."""

    def __init__(self, threshold: int = 5, cooldown: float = 5.0) -> None:
        self.threshold, self.cooldown = threshold, cooldown
        self.failures = 0
        self.opened_at: float | None = None
        self._probing = False
        self._lock = threading.Lock()
        self.trips = 0

    def allow(self) -> bool:
        with self._lock:
            if self.opened_at is None:
                return True
            if time.monotonic() - self.opened_at < self.cooldown or self._probing:
                return False
            self._probing = True  # half-open: exactly one request probes the endpoint
            return True

    def record(self, ok: bool) -> None:
        with self._lock:
            self._probing = False
            if ok:
                self.failures, self.opened_at = 0, None
                return
            self.failures += 1
            if self.opened_at is not None:  # a failed probe: stay open for another cool-down
                self.opened_at = time.monotonic()
            elif self.failures >= self.threshold:
                self.opened_at = time.monotonic()
                self.trips += 1

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half-open" if time.monotonic() - self.opened_at >= self.cooldown else "open"


def backoff_delay(base: float, attempt: int) -> float:
    """Seconds to wait before retry ``attempt + 1``: exponential, jittered to 0.5-1.5x so that
    clients that failed together do not retry together."""
    return base * (2**attempt) * (0.5 + random.random())
