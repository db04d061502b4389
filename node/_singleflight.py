"""Single flight: concurrent identical requests run once; the others wait for the first and re-read the cache.

Works across threads (sync callers) and trio loops (async callers) at once: a waiter from a
trio loop is woken through its loop's `TrioToken`, which is safe from any thread.
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["InFlight", "Flight"]


class Flight:
    __slots__ = ("done", "waiters")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.waiters: list[tuple[Any, Any]] = []  # (trio token, trio.Event)


class InFlight:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[str, Flight] = {}

    def join(self, key: str) -> tuple[bool, Flight]:
        """(True, flight) if the caller leads the work for `key`, else (False, the leader's flight)."""
        with self._lock:
            flight = self._flights.get(key)
            if flight is None:
                flight = self._flights[key] = Flight()
                return True, flight
            return False, flight

    def finish(self, key: str, flight: Flight) -> None:
        """The leader is done (successfully or not): wake every waiter."""
        with self._lock:
            if self._flights.get(key) is flight:
                del self._flights[key]
            flight.done.set()
            waiters, flight.waiters = flight.waiters, []
        for token, event in waiters:
            try:
                token.run_sync_soon(event.set)
            except RuntimeError:  # trio.RunFinishedError: that loop is gone, nobody to wake
                pass

    def wait(self, flight: Flight, timeout: float) -> bool:
        return flight.done.wait(max(timeout, 0.0))

    async def await_(self, flight: Flight, deadline: float) -> None:
        """Wait in a trio loop until the flight is done or trio's clock reaches `deadline`."""
        import trio

        event = trio.Event()
        with self._lock:
            if flight.done.is_set():
                return
            flight.waiters.append((trio.lowlevel.current_trio_token(), event))
        with trio.move_on_at(deadline):
            await event.wait()

    def __len__(self) -> int:
        return len(self._flights)
