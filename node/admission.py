"""Admission: how many requests run on this node at once, how many wait, and when it answers busy.

Every daemon entry point (the control protocol, `/accelmesh/infer`, the HTTP API) admits its
requests here, through the front door (node.serving); in-process calls with no daemon do not.

    arrival ──► a slot free? ── yes ──► running (at most max_concurrent)
                    │ no
                    ▼
                queue full? ── no ──► queued, in arrival order, until a slot frees
                    │ yes
                    ▼
                Busy(retry_after)   at once: the caller retries, or another node serves

A request the mesh hands to another node gives its slot back while that node serves it
(`Slot.hand_off`); it counts as `forwarding`, not running, until it ends or needs a slot again
for work done here (`Slot.local`, held by the router around a local provider). So the slots
count the work done on this node, and two full nodes forwarding to each other never each hold
every slot while waiting for the other's.

`retry_after` is the time the requests ahead of a newcomer need at the recent service rate:
(running + queued) / max_concurrent x the mean time a slot was held (an EWMA), at least 50 ms,
at most 60 s; 1 s before anything was served.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from node.errors import Busy

__all__ = ["Admission", "AdmissionStatistics", "Slot"]

RETRY_AFTER_BEFORE_ANY = 1.0  # seconds: the busy hint before any request finished here
RETRY_AFTER_MIN, RETRY_AFTER_MAX = 0.05, 60.0
SERVICE_TIME_WEIGHT = 0.2  # weight of the newest sample in the EWMA of slot hold times


@dataclass(frozen=True)
class AdmissionStatistics:
    in_flight: int  # requests holding a slot now
    queued: int  # requests waiting for one
    forwarding: int  # admitted requests another node is serving (no slot held here)
    max_concurrent: int
    max_queue: int
    served: int  # admitted requests that ended, however they ended
    refused_busy: int  # requests answered busy
    peak_in_flight: int  # the most ever running at once
    peak_queued: int  # the most ever waiting at once
    service_time: float | None  # EWMA of seconds a slot was held (None before the first)


class Admission:
    """`max_concurrent` requests run here at once; up to `max_queue` more wait; beyond that: busy."""

    def __init__(self, max_concurrent: int, max_queue: int) -> None:
        self.max_concurrent, self.max_queue = max_concurrent, max_queue
        self.limiter = trio.CapacityLimiter(max_concurrent)  # FIFO: the queue is served in arrival order
        self.queued = 0
        self.forwarding = 0
        self.served = 0
        self.refused_busy = 0
        self.peak_in_flight = 0
        self.peak_queued = 0
        self.service_time: float | None = None
        self.changed = trio.Event()  # set whenever in_flight, queued or forwarding changes (load adverts watch it)

    @property
    def in_flight(self) -> int:
        return int(self.limiter.borrowed_tokens)

    @property
    def idle(self) -> bool:
        """Nothing running, waiting or forwarded (a drain waits for this)."""
        return not (self.in_flight or self.queued or self.forwarding)

    def retry_after(self) -> float:
        """Seconds until a newcomer could expect a slot, at the recent service rate."""
        if self.service_time is None:
            return RETRY_AFTER_BEFORE_ANY
        ahead = (self.in_flight + self.queued) / self.max_concurrent
        return min(RETRY_AFTER_MAX, max(RETRY_AFTER_MIN, ahead * self.service_time))

    def _touch(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def enter_now(self) -> Slot | None:
        """A slot if one is free now, without waiting (release it with `hold`); None otherwise:
        then `enter` queues for one."""
        if not self.limiter.available_tokens:
            return None
        slot = Slot(self)
        self.limiter.acquire_on_behalf_of_nowait(slot)
        self._held(slot)
        self._touch()
        return slot

    def _held(self, slot: Slot) -> None:
        slot.held, slot.since = True, trio.current_time()
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    async def _admit(self, slot: Slot) -> None:
        """A slot for `slot` now, or a place in the queue; Busy when the queue is full too."""
        if self.limiter.available_tokens:
            self.limiter.acquire_on_behalf_of_nowait(slot)
        else:
            if self.queued >= self.max_queue:
                self.refused_busy += 1
                raise Busy(self.retry_after())
            self.queued += 1
            self.peak_queued = max(self.peak_queued, self.queued)
            self._touch()
            try:
                await self.limiter.acquire_on_behalf_of(slot)
            finally:
                self.queued -= 1
                self._touch()  # also when cancelled while waiting: a drain may be waiting for this
        self._held(slot)

    def _release(self, slot: Slot, *, finished: bool) -> None:
        self.limiter.release_on_behalf_of(slot)
        slot.held = False
        if not finished:
            return  # handed off: how long it held the slot says nothing about service times
        sample = trio.current_time() - slot.since
        old = self.service_time
        self.service_time = sample if old is None else old + SERVICE_TIME_WEIGHT * (sample - old)

    async def enter(self) -> Slot:
        """A slot now, or a place in the queue until one frees; Busy when both are full. Release
        it with `hold` (cancelled while queued, nothing is held)."""
        slot = Slot(self)
        await self._admit(slot)
        self._touch()
        return slot

    @asynccontextmanager
    async def hold(self, slot: Slot) -> AsyncIterator[Slot]:
        """Give `slot` (from `enter`) back when the body ends, however it ends."""
        try:
            yield slot
        finally:
            if slot.held:
                self._release(slot, finished=True)
            else:
                self.forwarding -= 1
            self.served += 1
            self._touch()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[Slot]:
        """Hold a slot for the body (waiting in the queue first if need be); Busy when both are full."""
        async with self.hold(await self.enter()) as slot:
            yield slot

    def statistics(self) -> AdmissionStatistics:
        return AdmissionStatistics(
            in_flight=self.in_flight, queued=self.queued, forwarding=self.forwarding,
            max_concurrent=self.max_concurrent, max_queue=self.max_queue, served=self.served,
            refused_busy=self.refused_busy, peak_in_flight=self.peak_in_flight, peak_queued=self.peak_queued,
            service_time=self.service_time,
        )

    def __repr__(self) -> str:
        return (f"<Admission {self.in_flight}/{self.max_concurrent} in flight, {self.queued}/{self.max_queue} "
                f"queued, {self.forwarding} forwarded>")


class Slot:
    """One admitted request's slot: held while it works here, handed off while another node serves it."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.held = False
        self.since = 0.0

    def hand_off(self) -> None:
        """Another node serves the request now: free the slot for other work here."""
        if self.held:
            self.admission._release(self, finished=False)
            self.admission.forwarding += 1
            self.admission._touch()

    async def take_back(self) -> None:
        """Hold the slot again if it was handed off: through the queue, or Busy when that is full;
        cancelled while waiting, nothing changes."""
        if not self.held:
            await self.admission._admit(self)
            self.admission.forwarding -= 1
            self.admission._touch()

    def local(self) -> _Local:
        """Hold the slot around work done here (`take_back` first if it was handed off)."""
        return _Local(self)

    def __repr__(self) -> str:
        return f"<Slot {'held' if self.held else 'handed off'}>"


class _Local:
    """`Slot.local()`: an async context manager of its own (not a generator's: every local request
    enters one)."""

    __slots__ = ("slot",)

    def __init__(self, slot: Slot) -> None:
        self.slot = slot

    async def __aenter__(self) -> None:
        await self.slot.take_back()

    async def __aexit__(self, *exc_info: object) -> None:
        return None
