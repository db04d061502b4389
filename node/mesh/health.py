"""Passive health of backends as pure policy: failure windows, cooldowns with backoff, EWMAs, sole-provider order."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal, TypeVar

__all__ = [
    "BackendHealth",
    "Ewma",
    "HealthPolicy",
    "HealthState",
    "HealthStatistics",
    "false_cooldown_bound",
    "false_cooldown_probability",
    "ranked",
]

HealthState = Literal["ok", "cooling", "probing"]

T = TypeVar("T")


@dataclass(frozen=True)
class HealthPolicy:
    """When a backend is cooled down, and for how long.

    A backend is cooled when, just after a failure, its window holds at least `min_requests`
    outcomes and at least ``ceil(threshold * n)`` of the ``n`` are failures. Its k-th
    consecutive cooldown lasts ``base_cooldown * 2 ** (k - 1)`` seconds, at most `max_cooldown`.

    The defaults keep a healthy backend that fails 25% of its requests at random out of
    cooldown (`false_cooldown_probability` and `false_cooldown_bound` compute the figures):

    ============  ======================  ====================================
    outcomes n    one evaluation          one whole window of n (union bound)
    ============  ======================  ====================================
    20 (minimum)  9.35e-4                 1.14e-2
    30            5.01e-5                 9.14e-4
    50            1.64e-7                 4.97e-6
    ============  ======================  ====================================

    The price is that fewer than 20 outcomes in 30 s never cool a backend, however many fail:
    at low traffic a dead backend is found by the active pings, not by this policy.
    """

    window: float = 30.0  # seconds of outcomes considered: long enough to hold min_requests at modest traffic
    min_requests: int = 20  # fewer outcomes never cool: at 20 a 25%-failing backend reaches 60% with p < 1e-3
    threshold: float = 0.6  # failure ratio that cools: 0.5 would cool a 25%-failing backend with p = 1.4e-2 at n = 20
    base_cooldown: float = 5.0  # first cooldown, seconds: a restart or a brief overload is usually over by then
    max_cooldown: float = 120.0  # cap on the doubled cooldowns: a recovered backend waits at most two minutes
    max_outcomes: int = 1024  # outcomes kept per backend (the oldest drop first): bounds memory at any request rate

    def __post_init__(self) -> None:
        _require(self.window, "window", "a finite number > 0")
        if isinstance(self.min_requests, bool) or not isinstance(self.min_requests, int) or self.min_requests < 2:
            raise ValueError(f"HealthPolicy.min_requests must be an integer >= 2 "
                             f"(one failure alone never cools), got {self.min_requests!r}")
        if not (isinstance(self.threshold, (int, float)) and 0 < self.threshold <= 1):
            raise ValueError(f"HealthPolicy.threshold must be a failure ratio in (0, 1], got {self.threshold!r}")
        _require(self.base_cooldown, "base_cooldown", "a finite number of seconds > 0")
        _require(self.max_cooldown, "max_cooldown", "a finite number of seconds > 0")
        if self.max_cooldown < self.base_cooldown:
            raise ValueError(f"HealthPolicy.max_cooldown must be >= base_cooldown ({self.base_cooldown!r}), "
                             f"got {self.max_cooldown!r}")
        if (isinstance(self.max_outcomes, bool) or not isinstance(self.max_outcomes, int)
                or self.max_outcomes < self.min_requests):
            raise ValueError(f"HealthPolicy.max_outcomes must be an integer >= min_requests "
                             f"({self.min_requests!r}), got {self.max_outcomes!r}")

    def failures_to_cool(self, outcomes: int) -> int:
        """How many of `outcomes` outcomes in the window must be failures to cool (0: never, too few)."""
        if outcomes < self.min_requests:
            return 0
        return math.ceil(self.threshold * outcomes)

    def cooldown(self, consecutive: int) -> float:
        """Seconds of the `consecutive`-th cooldown in a row (1 for the first): doubled each time, capped."""
        if consecutive < 1:
            raise ValueError(f"consecutive must be >= 1, got {consecutive!r}")
        exponent = consecutive - 1
        if exponent >= 1000:  # 2.0 ** 1024 overflows; far past any cap anyway
            return self.max_cooldown
        return min(self.max_cooldown, self.base_cooldown * 2.0 ** exponent)


def _require(value: object, name: str, what: str) -> None:
    """A finite number > 0, or a ValueError naming the field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"HealthPolicy.{name} must be {what}, got {value!r}")


def _tail_numerator(n: int, k: int, a: int, d: int) -> int:
    """``P(X >= k) * d**n`` for X ~ Binomial(n, a / d), as an exact integer."""
    if k <= 0:
        return d ** n
    if k > n or a == 0:
        return 0
    c = d - a
    total, power_a, power_c = 0, a ** n, 1
    for i in range(n, k - 1, -1):  # comb(n, i) * a**i * c**(n - i), from i = n down to k
        total += math.comb(n, i) * power_a * power_c
        power_a //= a  # exact: power_a is a**i with i >= k >= 1
        power_c *= c
    return total


def _rate(failure_rate: float, requests_in_window: int) -> tuple[int, int]:
    """`failure_rate` as an exact fraction (numerator, denominator), after checking both arguments."""
    if not (0 <= failure_rate <= 1):
        raise ValueError(f"failure_rate must be in [0, 1], got {failure_rate!r}")
    if isinstance(requests_in_window, bool) or not isinstance(requests_in_window, int) or requests_in_window < 0:
        raise ValueError(f"requests_in_window must be an integer >= 0, got {requests_in_window!r}")
    exact = Fraction(failure_rate)
    return exact.numerator, exact.denominator


def false_cooldown_probability(policy: HealthPolicy, failure_rate: float, requests_in_window: int) -> float:
    """The chance that `requests_in_window` = n independent outcomes, each a failure with probability
    `failure_rate`, meet the policy's cooling rule: at least ``ceil(threshold * n)`` failures among
    n >= `min_requests` (0 below `min_requests`). Computed exactly (binomial tail in integers, one
    rounding at the end).

    This is the chance *at one evaluation* that sees n outcomes in the window. (An evaluation runs
    only after a failure, so the chance that a given outcome triggers a cooldown is smaller still;
    `false_cooldown_bound` uses that.) The window never holds more than `max_outcomes`, so a larger
    n is taken as `max_outcomes`.

    For the default policy and a healthy backend failing 25% at random:
    n = 20 (= min_requests): 9.35e-4; n = 30: 5.01e-5; n = 50: 1.64e-7.
    """
    a, d = _rate(failure_rate, requests_in_window)
    n = min(requests_in_window, policy.max_outcomes)
    k = policy.failures_to_cool(n)
    if k == 0:
        return 0.0
    return _tail_numerator(n, k, a, d) / d ** n


def false_cooldown_bound(policy: HealthPolicy, failure_rate: float, requests_in_window: int) -> float:
    """An upper bound (union bound) on the chance that a backend failing at random with
    `failure_rate`, with n = `requests_in_window` outcomes per window at a steady rate, is cooled at
    some point during one window.

    Over one window n outcomes arrive, each evaluated with n outcomes in the window. Outcome i
    cools only if it is a failure and the other n - 1 hold at least ``ceil(threshold * n) - 1``
    failures: ``q(n) = p * P(Bin(n - 1, p) >= ceil(threshold * n) - 1)``. The evaluations are
    strongly correlated, so the true chance is well below the bound ``min(1, n * q(n))``. At
    start-up, while the window fills from empty, the evaluations with k < n outcomes add at most
    ``sum(q(k) for min_requests <= k < n)`` once. 0 below `min_requests`.

    For the default policy at 25% failures: n = 20: 1.14e-2; n = 30: 9.14e-4; n = 50: 4.97e-6.
    """
    a, d = _rate(failure_rate, requests_in_window)
    n = min(requests_in_window, policy.max_outcomes)
    k = policy.failures_to_cool(n)
    if k == 0:
        return 0.0
    per_outcome = a * _tail_numerator(n - 1, k - 1, a, d) / d ** n
    return min(1.0, requests_in_window * per_outcome)


@dataclass(frozen=True)
class HealthStatistics:
    """A snapshot of one backend's health (`BackendHealth.statistics(now)`)."""

    state: HealthState
    outcomes: int  # outcomes in the window now
    failures: int  # of which failures
    cooldowns: int  # cooldowns so far, in all
    consecutive_cooldowns: int  # cooldowns since the last success after one (the backoff exponent + 1)
    cooldown_until: float | None  # when the current cooldown ends; None when not cooling
    ignored: int  # outcomes recorded while cooling, dropped (requests sent before the cooldown)


class BackendHealth:
    """One backend's passive health, fed with the outcomes of real requests.

    Contract with the caller: `record(now, ok)` once per attempt that reached the backend, with
    ``ok=False`` for a failure *including an attempt that timed out*. Never record `bad_request`
    (the caller's fault) or `busy` (the backend said no in time): those say nothing of its
    health. A slow success is a success; slowness lowers its score through the caller's `Ewma`.
    `now` is seconds on any monotonic clock and must not go backwards.

    States::

                  failure ratio >= threshold            cooldown ends
        ok ---- (>= min_requests in window) ----> cooling ------------> probing
         ^                                           ^                   |  |
         |                                           +--- failure -------+  |
         +------------------------------ success ---------------------------+

    - ok: outcomes go into the sliding window (an outcome recorded at t counts while
      ``now < t + window``; at most `max_outcomes` are kept). Just after a failure the rule is
      evaluated; if it holds, the backend cools.
    - cooling: for ``policy.cooldown(consecutive)`` seconds, doubling with each cooldown in a row
      and capped. The window is cleared when the cooldown starts, and outcomes recorded while
      cooling (requests sent before it) are dropped, so stale failures cannot re-cool the
      backend the moment it comes back. `available(now)` is False.
    - probing: available again; its first outcome decides. A failure cools it again at once with
      the next, doubled cooldown; a success resets the backoff and makes it ok.
    """

    __slots__ = (
        "_consecutive",
        "_cooldowns",
        "_cooling_until",
        "_failures",
        "_ignored",
        "_last_now",
        "_outcomes",
        "_probing",
        "policy",
    )

    def __init__(self, policy: HealthPolicy | None = None) -> None:
        self.policy = policy if policy is not None else HealthPolicy()
        self._outcomes: deque[tuple[float, bool]] = deque()  # (time, ok), oldest first
        self._failures = 0  # failures in self._outcomes
        self._cooling_until: float | None = None
        self._probing = False
        self._consecutive = 0
        self._cooldowns = 0
        self._ignored = 0
        self._last_now = -math.inf

    # -- outcomes ---------------------------------------------------------------------------

    def record(self, now: float, ok: bool) -> HealthState:
        """Record one attempt's outcome at `now`; returns the state after it."""
        self._last_now = max(self._last_now, now)
        if self._cooling(now):
            self._ignored += 1
            return "cooling"
        if self._probing:
            if ok:
                self._probing = False
                self._consecutive = 0
                self._append(now, ok)
                return "ok"
            self._cool(now)
            return "cooling"
        self._drop_stale(now)
        self._append(now, ok)
        if not ok:
            n = len(self._outcomes)
            needed = self.policy.failures_to_cool(n)
            if needed and self._failures >= needed:
                self._cool(now)
                return "cooling"
        return "ok"

    def trip(self, now: float) -> HealthState:
        """Cool the backend at once, with the next backed-off cooldown: for evidence stronger than
        one request's failure (the active pings found it unreachable). Already cooling: no change."""
        self._last_now = max(self._last_now, now)
        if not self._cooling(now):
            self._cool(now)
        return "cooling"

    def _append(self, now: float, ok: bool) -> None:
        if len(self._outcomes) >= self.policy.max_outcomes:
            _, oldest_ok = self._outcomes.popleft()
            self._failures -= not oldest_ok
        self._outcomes.append((now, ok))
        self._failures += not ok

    def _drop_stale(self, now: float) -> None:
        horizon = now - self.policy.window
        while self._outcomes and self._outcomes[0][0] <= horizon:
            _, ok = self._outcomes.popleft()
            self._failures -= not ok

    def _cool(self, now: float) -> None:
        self._consecutive += 1
        self._cooldowns += 1
        self._cooling_until = now + self.policy.cooldown(self._consecutive)
        self._probing = True
        self._outcomes.clear()
        self._failures = 0

    def _cooling(self, now: float) -> bool:
        return self._cooling_until is not None and now < self._cooling_until

    def _window(self, now: float) -> tuple[int, int]:
        """(outcomes, failures) in the window at `now`, without changing anything."""
        horizon = now - self.policy.window
        outcomes, failures = len(self._outcomes), self._failures
        for t, ok in self._outcomes:
            if t > horizon:
                break
            outcomes -= 1
            failures -= not ok
        return outcomes, failures

    # -- queries (none of them changes anything) ----------------------------------------------

    def state(self, now: float) -> HealthState:
        if self._cooling(now):
            return "cooling"
        return "probing" if self._probing else "ok"

    def available(self, now: float) -> bool:
        """Whether the backend may be tried first (not cooling; a probing one is)."""
        return not self._cooling(now)

    def cooldown_until(self, now: float) -> float | None:
        """When the current cooldown ends, or None when not cooling at `now`."""
        return self._cooling_until if self._cooling(now) else None

    def failure_ratio(self, now: float) -> float:
        """Failures / outcomes in the window at `now` (0.0 for an empty window)."""
        outcomes, failures = self._window(now)
        return failures / outcomes if outcomes else 0.0

    def statistics(self, now: float | None = None) -> HealthStatistics:
        """A snapshot at `now` (None: at the latest outcome recorded)."""
        at = self._last_now if now is None else now
        outcomes, failures = self._window(at)
        return HealthStatistics(self.state(at), outcomes, failures, self._cooldowns, self._consecutive,
                                self.cooldown_until(at), self._ignored)

    def __repr__(self) -> str:
        s = self.statistics()
        until = "" if s.cooldown_until is None else f" until {s.cooldown_until:g}"
        return (f"<BackendHealth {s.state}{until} failed {s.failures}/{s.outcomes} in {self.policy.window:g} s "
                f"(cools at >= {self.policy.threshold:g} of >= {self.policy.min_requests}) "
                f"cooldowns={s.cooldowns} consecutive={s.consecutive_cooldowns} ignored={s.ignored}>")


class Ewma:
    """Exponentially weighted moving average (latency, time to first chunk): each sample moves the
    value by `alpha` of the way towards it; the first sample is taken as it is."""

    __slots__ = ("_value", "alpha", "samples")

    def __init__(self, alpha: float) -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (0 < alpha <= 1):
            raise ValueError(f"Ewma.alpha must be in (0, 1], got {alpha!r}")
        self.alpha = float(alpha)
        self._value: float | None = None
        self.samples = 0

    @property
    def value(self) -> float | None:
        """The average so far; None before the first sample."""
        return self._value

    def update(self, sample: float) -> float:
        """Fold in one sample (a finite number); returns the new average."""
        if isinstance(sample, bool) or not isinstance(sample, (int, float)) or not math.isfinite(sample):
            raise ValueError(f"Ewma sample must be a finite number, got {sample!r}")
        self._value = float(sample) if self._value is None else self._value + self.alpha * (sample - self._value)
        self.samples += 1
        return self._value

    def __repr__(self) -> str:
        value = "none" if self._value is None else f"{self._value:g}"
        return f"<Ewma alpha={self.alpha:g} value={value} samples={self.samples}>"


def ranked(backends: Iterable[T], now: float, health_of: Callable[[T], BackendHealth]) -> list[T]:
    """The sole-provider rule: the available backends first, then the cooling ones, each group in
    the given order. Nothing is dropped, so a backend that alone can serve a model is tried last,
    never excluded. (The caller passes candidates already filtered by task, model and constraints.)
    """
    available: list[T] = []
    cooling: list[T] = []
    for backend in backends:
        (available if health_of(backend).available(now) else cooling).append(backend)
    return available + cooling
