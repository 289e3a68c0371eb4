"""Login attempt limiting: a sliding window of failures per key (username, client address).

Kept in process memory on purpose: it must answer before any password hash is computed (that
is what it protects), and a restart forgetting the window costs an attacker nothing they could
not get by waiting. With several controller replicas each keeps its own window, so the budget
an attacker gets is multiplied by the replica count; the window stays small enough for that.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class LoginRateLimiter:
    """Allow at most ``max_failures`` failed logins per key within ``window_s`` seconds.

    Raising ``max_failures`` forgives more typos but gives a password guesser more tries;
    a longer ``window_s`` slows guessing further but locks a clumsy user out for longer.
    """

    def __init__(self, max_failures: int = 5, window_s: float = 300.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}

    def _prune(self, key: str, now: float) -> deque[float]:
        q = self._failures.get(key)
        if q is None:
            return deque()
        while q and q[0] <= now - self.window_s:
            q.popleft()
        if not q:
            del self._failures[key]
        return q

    def retry_after(self, *keys: str) -> float:
        """Return seconds until any of ``keys`` may try again (0 when all may try now)."""
        now = self._clock()
        wait = 0.0
        for key in keys:
            q = self._prune(key, now)
            if len(q) >= self.max_failures:
                wait = max(wait, q[len(q) - self.max_failures] + self.window_s - now)
        return wait

    def failed(self, *keys: str) -> None:
        """Record a failed attempt for every key."""
        now = self._clock()
        for key in keys:
            self._prune(key, now)
            self._failures.setdefault(key, deque()).append(now)

    def succeeded(self, *keys: str) -> None:
        """Forget the failures of ``keys`` after a successful login."""
        for key in keys:
            self._failures.pop(key, None)
