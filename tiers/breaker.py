"""Circuit breaker shared by the network tiers (Redis, HTTP daemon client).

A failed round trip opens the breaker for a backoff interval during which callers
answer misses without touching the network; then one call goes through as a probe,
and its success closes the breaker. Thread-safe.
"""

from __future__ import annotations

import random
import threading
import time


class CircuitBreaker:
    """Circuit breaker: closed -> open (backoff) -> half-open (one probe) -> closed.

    Backoff after the ``n``-th consecutive failure: ``base_s * 2**(n-1)`` seconds, at most
    ``max_s``, shortened by up to 20 % jitter so many clients do not probe in step.
    """

    def __init__(self, base_s: float, max_s: float) -> None:
        self.base_s, self.max_s = base_s, max_s
        self._lock = threading.Lock()
        self._state = "closed"
        self._failures = 0
        self._retry_at = 0.0
        self._opened_at = 0.0

    @property
    def is_open(self) -> bool:
        """True during an outage (calls refused or being probed)."""
        return self._state != "closed"

    def allow(self) -> bool:
        """True if a call may use the network now (closed, or the half-open probe)."""
        with self._lock:
            if self._state == "closed":
                return True
            if self._state == "open" and time.monotonic() >= self._retry_at:
                self._state = "half-open"
                return True
            return False

    def success(self) -> float | None:
        """Record a reply; returns the outage length (s) if this reply ended one."""
        with self._lock:
            if self._state == "half-open":
                self._state, self._failures = "closed", 0
                return time.monotonic() - self._opened_at
            if self._state == "closed":
                self._failures = 0
            return None

    def failure(self) -> tuple[bool, float]:
        """Record a failed round trip; returns (this started an outage, backoff in s)."""
        with self._lock:
            now = time.monotonic()
            if self._state == "open":  # a call that started before the breaker opened
                return False, self._retry_at - now
            started = self._state == "closed"
            if started:
                self._opened_at = now
            self._failures += 1
            delay = min(self.max_s, self.base_s * 2 ** min(self._failures - 1, 30))
            delay *= random.uniform(0.8, 1.0)
            self._state, self._retry_at = "open", now + delay
            return started, delay
