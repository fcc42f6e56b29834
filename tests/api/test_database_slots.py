"""The API process's turns at the database (api/http/limits.DatabaseSlots): a free slot is
taken at once, a request waits in turn for one that is released on the event loop or from a
thread, and one that would wait too long, or behind too many, is answered 503."""

import asyncio
import threading

import pytest

from api.http.limits import DatabaseSlots
from llmq.errors import ServerBusy


def run(coroutine):
    return asyncio.run(coroutine)


def test_free_slots_are_taken_at_once_and_count_down():
    async def scenario():
        slots = DatabaseSlots(slots=2, wait_s=5, waiting_max=10)
        first, second = await slots.acquire(), await slots.acquire()
        semaphore = slots._semaphore()
        assert semaphore.value == 0
        first.release()
        first.release()  # a second release of the same slot counts for nothing
        assert semaphore.value == 1
        second.release()
        assert semaphore.value == 2

    run(scenario())


def test_waiting_requests_get_released_slots_in_turn():
    async def scenario():
        slots = DatabaseSlots(slots=1, wait_s=5, waiting_max=10)
        held = await slots.acquire()
        order: list[str] = []

        async def request(name: str) -> None:
            slot = await slots.acquire()
            order.append(name)
            await asyncio.sleep(0.01)
            slot.release()

        waiting = [asyncio.create_task(request(name)) for name in ("first", "second")]
        await asyncio.sleep(0.05)
        # Released from a worker thread, as a request's session does when it closes there.
        assert order == []
        releaser = threading.Thread(target=held.release)
        releaser.start()
        releaser.join()
        # A newcomer while others wait queues behind them, free slot or not.
        late = asyncio.create_task(request("late"))
        await asyncio.gather(*waiting, late)
        assert order == ["first", "second", "late"]

    run(scenario())


def test_a_request_that_would_wait_too_long_is_answered_busy():
    async def scenario():
        slots = DatabaseSlots(slots=1, wait_s=0.1, waiting_max=10)
        held = await slots.acquire()
        with pytest.raises(ServerBusy, match="1 requests are using the database"):
            await slots.acquire()
        held.release()
        (await slots.acquire()).release()  # the timed-out wait left nothing behind

    run(scenario())


def test_a_request_behind_too_many_waiting_is_answered_busy_at_once():
    async def scenario():
        slots = DatabaseSlots(slots=1, wait_s=5, waiting_max=1)
        held = await slots.acquire()
        waiter = asyncio.create_task(slots.acquire())
        await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        began = loop.time()
        with pytest.raises(ServerBusy, match="1 more are waiting"):
            await slots.acquire()
        assert loop.time() - began < 1  # not after its wait_s of 5 s
        held.release()
        (await waiter).release()

    run(scenario())
