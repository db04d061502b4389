"""Admission: max_concurrent running, max_queue waiting in arrival order, Busy with retry_after beyond;
counts stay right when waiters are cancelled. Virtual time (autojump_clock): no timing assumptions."""

from __future__ import annotations

import pytest
import trio

from node.admission import RETRY_AFTER_BEFORE_ANY, RETRY_AFTER_MAX, RETRY_AFTER_MIN, Admission
from node.errors import Busy


async def hold(admission: Admission, name: str, order: list[str], release: trio.Event,
               task_status=trio.TASK_STATUS_IGNORED) -> None:
    task_status.started()
    async with admission.slot():
        order.append(name)
        await release.wait()


async def test_slots_then_the_queue_in_arrival_order_then_busy(autojump_clock):
    admission = Admission(max_concurrent=2, max_queue=3)
    order: list[str] = []
    releases = {name: trio.Event() for name in "abcdefg"}
    async with trio.open_nursery() as nursery:
        for name in "abcde":  # 2 run, 3 wait
            await nursery.start(hold, admission, name, order, releases[name])
            await trio.sleep(0.01)
        assert (admission.in_flight, admission.queued) == (2, 3) and order == ["a", "b"]
        with pytest.raises(Busy) as info:  # the sixth: both full
            async with admission.slot():
                pass  # pragma: no cover - never admitted
        assert info.value.retry_after == RETRY_AFTER_BEFORE_ANY  # nothing finished yet: the default hint
        for name in "abcde":
            releases[name].set()
            await trio.sleep(0.01)
        assert order == ["a", "b", "c", "d", "e"], "the queue is served in arrival order"
    s = admission.statistics()
    assert (s.peak_in_flight, s.peak_queued, s.served, s.refused_busy) == (2, 3, 5, 1)
    assert (s.in_flight, s.queued) == (0, 0) and admission.idle


async def test_a_cancelled_waiter_leaves_the_queue_and_the_order_of_the_others_holds(autojump_clock):
    admission = Admission(max_concurrent=1, max_queue=3)
    order: list[str] = []
    release = {name: trio.Event() for name in "abcd"}
    async with trio.open_nursery() as nursery:
        await nursery.start(hold, admission, "a", order, release["a"])
        await trio.sleep(0.01)
        scopes = {}
        for name in "bcd":
            scope = trio.CancelScope()
            scopes[name] = scope

            async def waiter(name=name, scope=scope):
                with scope:
                    await hold(admission, name, order, release[name])

            nursery.start_soon(waiter)
            await trio.sleep(0.01)
        assert admission.queued == 3
        scopes["c"].cancel()
        await trio.sleep(0.01)
        assert admission.queued == 2, "a cancelled waiter gives its place back at once"
        async with trio.open_nursery() as late:  # room again: a newcomer queues instead of hearing busy
            late.start_soon(hold, admission, "e", order, trio.Event())
            await trio.sleep(0.01)
            assert admission.queued == 3
            late.cancel_scope.cancel()
        for name in "abd":
            release[name].set()
            await trio.sleep(0.01)
    assert order == ["a", "b", "d"]
    s = admission.statistics()
    assert (s.in_flight, s.queued, s.refused_busy, s.served) == (0, 0, 0, 3)


async def test_a_cancelled_running_request_frees_its_slot_for_the_first_waiter(autojump_clock):
    admission = Admission(max_concurrent=1, max_queue=1)
    order: list[str] = []
    async with trio.open_nursery() as nursery:
        running = trio.CancelScope()

        async def first():
            with running:
                await hold(admission, "a", order, trio.Event())

        nursery.start_soon(first)
        await trio.sleep(0.01)
        done = trio.Event()
        nursery.start_soon(hold, admission, "b", order, done)
        await trio.sleep(0.01)
        running.cancel()
        await trio.sleep(0.01)
        assert order == ["a", "b"] and (admission.in_flight, admission.queued) == (1, 0)
        done.set()
    assert admission.idle


async def test_retry_after_is_the_queue_ahead_at_the_recent_service_time(autojump_clock):
    admission = Admission(max_concurrent=2, max_queue=2)
    for _ in range(3):  # three requests of 4 s each: the service-time estimate is 4 s
        async with admission.slot():
            await trio.sleep(4)
    assert admission.statistics().service_time == pytest.approx(4.0)
    release = trio.Event()
    async with trio.open_nursery() as nursery:
        for name in "abcd":
            nursery.start_soon(hold, admission, name, [], release)
            await trio.sleep(0.01)
        with pytest.raises(Busy) as info:
            async with admission.slot():
                pass  # pragma: no cover
        # 2 running + 2 queued ahead, 2 slots, 4 s each: the queue drains in about 8 s
        assert info.value.retry_after == pytest.approx(8.0)
        release.set()
    assert RETRY_AFTER_MIN <= info.value.retry_after <= RETRY_AFTER_MAX


async def test_a_handed_off_slot_serves_others_and_is_taken_back_through_the_queue(autojump_clock):
    admission = Admission(max_concurrent=1, max_queue=1)
    async with admission.slot() as slot:
        slot.hand_off()  # another node serves this request now
        s = admission.statistics()
        assert (s.in_flight, s.forwarding) == (0, 1)
        async with admission.slot():  # the freed slot runs other work meanwhile
            assert admission.in_flight == 1
        async with slot.local():  # the answer failed over to this node: the slot is taken back
            assert (admission.in_flight, admission.forwarding) == (1, 0)
    assert admission.idle and admission.statistics().service_time is not None
