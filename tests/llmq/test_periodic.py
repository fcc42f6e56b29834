"""A periodic task ticks at its interval while it has work, at its idle interval once a tick
found none, and at once when woken."""

import threading
import time

from llmq.periodic import PeriodicTask


class Ticks:
    def __init__(self, has_work: bool) -> None:
        self.has_work = has_work
        self.count = 0
        self.ticked = threading.Event()

    def __call__(self) -> bool:
        self.count += 1
        self.ticked.set()
        return self.has_work


def wait_for_ticks(ticks: Ticks, count: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while ticks.count < count and time.monotonic() < deadline:
        time.sleep(0.005)
    assert ticks.count >= count


def test_an_idle_task_waits_its_idle_interval_until_woken():
    ticks = Ticks(has_work=False)
    task = PeriodicTask("test-idle", 0.01, ticks, at_start=True, idle_interval_s=60)
    task.start()
    try:
        wait_for_ticks(ticks, 1)
        time.sleep(0.3)  # thirty intervals: an idle task does not tick
        assert ticks.count == 1
        ticks.has_work = True
        task.wake()
        wait_for_ticks(ticks, 2)
        wait_for_ticks(ticks, 10)  # with work, at its interval again
    finally:
        task.stop()


def test_a_task_without_an_idle_interval_keeps_its_interval():
    ticks = Ticks(has_work=False)
    task = PeriodicTask("test-steady", 0.01, ticks, at_start=True)
    task.start()
    try:
        wait_for_ticks(ticks, 10)
    finally:
        task.stop()
