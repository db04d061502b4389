"""The load-balancing benchmark's model: Poisson arrivals, echo-like backends, and a dispatch simulation.

Pure: no I/O, no clock, randomness only from the `random.Random` it is handed, so a seed
reproduces every number. `bench_balancing` replays the arrival times it sends to real daemons
here, under the oracle policy, to have a p99 to compare each strategy's with.

The model, precisely:

- Arrivals: request i arrives at `arrivals[i]` seconds (non-decreasing); `poisson_arrivals`
  draws them with exponential gaps of mean 1 / rate.
- A backend is the echo provider with `concurrency = c`: c slots and one FIFO queue. Its
  service times are uniform on [min_ms, max_ms] (`random.uniform`, as echo draws them), one
  draw per request it receives, taken in the order the requests reach it:
  `service[b][j]` is the time of the j-th request backend b gets, whatever policy sent it
  there (the same numbers for every policy: common random numbers).
- Dispatch happens at arrival, once and for good (no failover, no stealing). The policy sees
  each backend's `in_system` count at that instant: requests sent to it whose service has not
  finished (in a slot or queued). A service that ends exactly at an arrival's time has ended.
- A request sent to backend b at time t starts when a slot is free and every earlier request
  of b has started: start = max(t, earliest free slot of b); it finishes at start + service.
  Its latency is finish - t. There is no network time and no cost of choosing.

Policies:

- `jsed`, the oracle: join the shortest expected delay with exact queue knowledge. A backend
  holding n requests with c slots and mean service m has expected delay
  ``wait + m`` with ``wait = 0`` if n < c, else ``(n - c + 1) * m / c`` (the requests ahead
  leave at rate c / m, and it needs n - c + 1 of them gone); lowest delay wins, a tie goes to
  the lower index.
- `round_robin`: request i goes to backend i mod k, load and speed ignored (the sanity check
  beside the real round robin).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = [
    "Backend",
    "Policy",
    "Run",
    "capacity",
    "draw_service_times",
    "expected_delay",
    "jsed",
    "poisson_arrivals",
    "round_robin",
    "simulate",
]


@dataclass(frozen=True)
class Backend:
    """One echo-like backend: service uniform on [min_ms, max_ms], `slots` at once, FIFO beyond."""

    name: str
    min_ms: float
    max_ms: float
    slots: int = 2

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_ms <= self.max_ms:
            raise ValueError(f"backend {self.name}: latency {self.min_ms}-{self.max_ms} ms (0 <= min <= max)")
        if self.slots < 1:
            raise ValueError(f"backend {self.name}: {self.slots} slots (at least 1)")

    @property
    def mean(self) -> float:
        """Mean service time in seconds."""
        return (self.min_ms + self.max_ms) / 2000.0

    def draw(self, rng: random.Random) -> float:
        """One service time in seconds, drawn as the echo provider draws its latency."""
        return (self.min_ms if self.min_ms == self.max_ms else rng.uniform(self.min_ms, self.max_ms)) / 1000.0


@dataclass(frozen=True)
class Run:
    """What a simulation gives back: per request, in arrival order, its latency and its backend."""

    latencies: tuple[float, ...]  # seconds from arrival to the end of service
    backends: tuple[int, ...]  # index of the backend that served it


# (request index, in_system per backend at its arrival, the backends) -> the chosen backend's index
Policy = Callable[[int, Sequence[int], Sequence[Backend]], int]


def capacity(backends: Sequence[Backend]) -> float:
    """Requests per second the backends finish when all are busy: sum of slots / mean service."""
    return sum(b.slots / b.mean for b in backends)


def poisson_arrivals(rate: float, n: int, rng: random.Random) -> list[float]:
    """`n` arrival times (seconds from 0) of a Poisson process of `rate` per second."""
    if not rate > 0.0:
        raise ValueError(f"rate must be positive, got {rate!r}")
    times, t = [], 0.0
    for _ in range(n):
        t += rng.expovariate(rate)
        times.append(t)
    return times


def draw_service_times(backends: Sequence[Backend], n: int, rng: random.Random) -> list[list[float]]:
    """`n` service times per backend (enough for any policy): row b is backend b's sequence."""
    return [[b.draw(rng) for _ in range(n)] for b in backends]


def expected_delay(in_system: int, backend: Backend) -> float:
    """Expected seconds from arrival to the end of service for a request joining `backend` now."""
    ahead = in_system - backend.slots + 1
    return (ahead * backend.mean / backend.slots if ahead > 0 else 0.0) + backend.mean


def jsed(i: int, in_system: Sequence[int], backends: Sequence[Backend]) -> int:
    """The oracle: the backend with the shortest expected delay (ties: the lower index)."""
    return min(range(len(backends)), key=lambda b: (expected_delay(in_system[b], backends[b]), b))


def round_robin(i: int, in_system: Sequence[int], backends: Sequence[Backend]) -> int:
    """Request i to backend i mod k."""
    return i % len(backends)


def simulate(arrivals: Sequence[float], service: Sequence[Sequence[float]], backends: Sequence[Backend],
             policy: Policy) -> Run:
    """Replay `arrivals` on `backends` under `policy` with the pre-drawn `service` times (see the module)."""
    if len(service) != len(backends):
        raise ValueError(f"{len(service)} service-time rows for {len(backends)} backends")
    slots = [[0.0] * b.slots for b in backends]  # per backend, a min-heap of the times its slots come free
    finishing: list[list[float]] = [[] for _ in backends]  # per backend, a min-heap of its requests' finish times
    served = [0] * len(backends)  # requests each backend has received (the next row index to use)
    latencies, chosen = [], []
    previous = 0.0
    for i, t in enumerate(arrivals):
        if t < previous:
            raise ValueError(f"arrival {i} at {t} s comes before arrival {i - 1} at {previous} s")
        previous = t
        for heap in finishing:
            while heap and heap[0] <= t:
                heapq.heappop(heap)
        b = policy(i, [len(heap) for heap in finishing], backends)
        if served[b] >= len(service[b]):
            raise ValueError(f"backend {b} received more than its {len(service[b])} pre-drawn service times")
        start = max(t, heapq.heappop(slots[b]))  # FIFO: requests reach b in order, the earliest free slot is next
        finish = start + service[b][served[b]]
        served[b] += 1
        heapq.heappush(slots[b], finish)
        heapq.heappush(finishing[b], finish)
        latencies.append(finish - t)
        chosen.append(b)
    return Run(tuple(latencies), tuple(chosen))
