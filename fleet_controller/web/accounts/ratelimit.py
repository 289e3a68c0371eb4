"""Login attempt limiting: exponential backoff per (user, address) and a sliding window per address.

Why not per user name: a limit on the user name alone lets anyone who knows the name lock the
real user out from anywhere (five wrong passwords and the account is closed for everyone). So the
backoff is kept per (user name, client address) pair (:class:`LoginBackoff`): a guesser slows down
only themselves, and the real user on another address logs in as usual. A per-address window
(:class:`LoginRateLimiter`) stops one address spraying many user names. What neither stops: a
guesser with very many addresses against one account gets (free failures + the backoff's pace)
per address; long random passwords are the defence there (docs/security.md).

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


class LoginBackoff:
    """Exponential backoff per key: after ``free`` failures each further one doubles the wait, up to ``max_s``.

    Keys are ``(user, address)`` pairs. The first ``free`` failures cost nothing (typos); then the
    key must wait ``base_s``, ``2 * base_s``, ``4 * base_s``... after each failure. A key with no
    failure for ``forget_s`` seconds starts over, and a success forgets it at once. Entries are
    bounded (``max_keys``, oldest dropped) so a flood of made-up names cannot exhaust memory.
    """

    def __init__(self, free: int = 3, base_s: float = 2.0, max_s: float = 900.0, forget_s: float = 3600.0,
                 max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.free, self.base_s, self.max_s, self.forget_s, self.max_keys = free, base_s, max_s, forget_s, max_keys
        self._clock = clock
        self._state: dict[str, tuple[int, float]] = {}  # key -> (failures, time of the last failure)

    def _get(self, key: str, now: float) -> tuple[int, float]:
        entry = self._state.get(key)
        if entry is None:
            return 0, 0.0
        if now - entry[1] >= self.forget_s:
            del self._state[key]
            return 0, 0.0
        return entry

    def delay(self, failures: int) -> float:
        """Return the wait after ``failures`` consecutive failures."""
        if failures < self.free:
            return 0.0
        return float(min(self.max_s, self.base_s * 2 ** min(failures - self.free, 30)))

    def retry_after(self, key: str) -> float:
        """Return seconds until ``key`` may try again (0 when it may try now)."""
        now = self._clock()
        failures, last = self._get(key, now)
        return max(0.0, last + self.delay(failures) - now) if failures else 0.0

    def failed(self, key: str) -> None:
        """Record a failed attempt of ``key``."""
        now = self._clock()
        failures, _ = self._get(key, now)
        self._state.pop(key, None)
        self._state[key] = (failures + 1, now)
        while len(self._state) > self.max_keys:
            del self._state[next(iter(self._state))]

    def succeeded(self, key: str) -> None:
        """Forget ``key`` after a successful login."""
        self._state.pop(key, None)
