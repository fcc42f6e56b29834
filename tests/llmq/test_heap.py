import gc

import pytest

from llmq.heap import settle


@pytest.fixture
def collector():
    """The collector's settings as they were, restored after the test."""
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_settle_freezes_what_is_alive_and_raises_the_young_threshold(collector):
    gc.unfreeze()
    middle, old = gc.get_threshold()[1:]
    settle(12_345)
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == (12_345, middle, old)
    # What comes after start-up is collected as before, only less often.
    cycle: list = []
    cycle.append(cycle)
    del cycle
    assert gc.collect() >= 1


def test_zero_leaves_the_collector_as_it_was(collector):
    gc.unfreeze()
    before = gc.get_threshold()
    settle(0)
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == before
