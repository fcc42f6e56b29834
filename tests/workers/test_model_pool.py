"""workers/model_pool.py's decisions with stand-in runtimes (what a model's runtime does is
tested with real models in test_lifecycle.py): which model is evicted and when, what waits,
what gives up, and that no model is ever evicted while a lease of it runs."""

import threading
import time

import pytest

from llmq.registry import ModelSpec
from workers.model_pool import ModelPool, ModelUnavailable


class Loaded:
    """A stand-in for a model's runtime: it records how it ends."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.stopped = threading.Event()
        self.handed_back = False

    def stop(self) -> None:
        self.stopped.set()

    def hand_back(self) -> None:
        self.handed_back = True

    def memory_bytes(self) -> int:
        return 1000


class Starter:
    """Starts stand-in runtimes, counting loads; `fail` names models whose load raises."""

    def __init__(self, delay_s: float = 0.0, fail: set[str] | None = None) -> None:
        self.delay_s = delay_s
        self.fail = fail or set()
        self.loads: list[str] = []
        self.live: dict[str, Loaded] = {}

    def __call__(self, spec: ModelSpec) -> Loaded:
        time.sleep(self.delay_s)
        if spec.id in self.fail:
            raise RuntimeError("weights unreadable")
        self.loads.append(spec.id)
        runtime = self.live[spec.id] = Loaded(spec)
        return runtime


def pool_of(models: str, max_loaded: int, starter: Starter, **options) -> ModelPool:
    specs = {m: ModelSpec(id=m, source="builtin:tiny-llama") for m in models.split(",")}
    options.setdefault("min_residency_s", 0.0)
    return ModelPool(specs, max_loaded, starter, **options)


def test_lease_loads_the_model_and_evicts_the_least_recently_used_idle_one():
    starter = Starter()
    pool = pool_of("a,b,c", 2, starter)
    for model in ("a", "b", "a"):
        with pool.lease(model) as runtime:
            assert runtime.spec.id == model
    with pool.lease("c") as runtime:
        assert runtime.spec.id == "c"
    assert starter.loads == ["a", "b", "c"]
    assert starter.live["b"].stopped.is_set()  # b was used longest ago
    assert sorted(pool.loaded()) == ["a", "c"]
    described = {m["model"]: m for m in pool.describe()}
    assert described["b"]["state"] == "unloaded" and described["a"]["memory_bytes"] == 1000


def test_a_busy_model_is_evicted_only_after_its_last_lease_ends():
    starter = Starter()
    pool = pool_of("a,b", 1, starter, wait_s=5.0)
    got_b = threading.Event()
    with pool.lease("a"):

        def lease_b() -> None:
            with pool.lease("b") as runtime:
                assert runtime is not None
                got_b.set()

        waiter = threading.Thread(target=lease_b)
        waiter.start()
        time.sleep(0.8)  # past a's residency (twice its load), and the waiter's next look
        assert not starter.live["a"].stopped.is_set()  # a's job is never cut
        assert not got_b.is_set()
        # While b waits, a takes no new lease: it drains for eviction.
        assert {m["model"]: m["state"] for m in pool.describe()}["a"] == "draining"
    waiter.join(5)
    assert got_b.is_set() and starter.live["a"].stopped.is_set()


def test_a_lease_that_cannot_get_its_model_in_time_gives_up_and_the_drain_stops():
    starter = Starter()
    pool = pool_of("a,b", 1, starter, wait_s=0.3)
    with pool.lease("a"):
        started = time.monotonic()
        with pool.lease("b") as runtime:
            assert runtime is None
        assert time.monotonic() - started >= 0.3
        # Nobody waits for a's place any more: it serves again.
        with pool.lease("a") as again:
            assert again is not None
    assert starter.loads == ["a"]


def test_a_recently_loaded_model_is_not_drained_for_another():
    starter = Starter()
    pool = pool_of("a,b", 1, starter, wait_s=0.3, min_residency_s=60.0)
    with pool.lease("a"):
        with pool.lease("b") as runtime:
            assert runtime is None
        assert {m["model"]: m["state"] for m in pool.describe()}["a"] == "loaded"


def test_other_models_serve_while_one_loads():
    starter = Starter(delay_s=0.5)
    pool = pool_of("a,b", 2, starter)
    pool.load("a")
    loading = threading.Thread(target=pool.load, args=("b",))
    loading.start()
    time.sleep(0.1)
    started = time.monotonic()
    with pool.lease("a") as runtime:
        assert runtime is not None
    assert time.monotonic() - started < 0.2
    loading.join(5)


def test_a_failed_load_raises_and_is_not_tried_again_at_once():
    starter = Starter(fail={"b"})
    pool = pool_of("a,b", 1, starter, wait_s=0.2, load_retry_s=60.0)
    with pytest.raises(ModelUnavailable, match="weights unreadable"):
        with pool.lease("b"):
            pass
    with pool.lease("b") as runtime:  # within load_retry_s: the message goes back at once
        assert runtime is None
    described = {m["model"]: m for m in pool.describe()}["b"]
    assert described["error"].endswith("weights unreadable") and described["failures"] == 1


def test_unload_waits_for_leases_and_force_hands_their_jobs_back():
    starter = Starter()
    pool = pool_of("a", 1, starter)
    done = threading.Event()
    with pool.lease("a"):
        unloading = threading.Thread(target=lambda: (pool.unload("a"), done.set()))
        unloading.start()
        time.sleep(0.3)
        assert not done.is_set() and not starter.live["a"].stopped.is_set()
    unloading.join(5)
    assert done.is_set() and starter.live["a"].stopped.is_set()

    pool.load("a")
    with pool.lease("a"):
        forcing = threading.Thread(target=pool.unload, args=("a",), kwargs={"force": True})
        forcing.start()
        time.sleep(0.2)
        assert starter.live["a"].handed_back
    forcing.join(5)
    assert pool.loaded() == []


def test_reload_drains_and_loads_the_new_entry():
    starter = Starter()
    pool = pool_of("a", 1, starter)
    pool.load("a")
    first = starter.live["a"]
    pool.reload("a", ModelSpec(id="a", source="builtin:tiny-llama", revision="v2"))
    assert first.stopped.is_set()
    assert starter.live["a"].spec.revision == "v2" and starter.loads == ["a", "a"]
    assert pool.describe()[0]["revision"] == "v2"


def test_a_model_the_worker_does_not_serve_is_refused():
    pool = pool_of("a", 1, Starter())
    with pytest.raises(ModelUnavailable, match="does not serve 'z'"):
        with pool.lease("z"):
            pass


def test_a_lease_waits_past_its_wait_for_a_model_that_is_loading():
    starter = Starter(delay_s=0.6)
    pool = pool_of("a", 1, starter, wait_s=0.1)
    loading = threading.Thread(target=pool.load, args=("a",))
    loading.start()
    time.sleep(0.1)
    with pool.lease("a") as runtime:  # its model loads: it waits for it, not for wait_s only
        assert runtime is not None
    loading.join(5)
    assert starter.loads == ["a"]


def test_a_busy_model_serves_twice_its_load_time_before_it_drains_for_another():
    starter = Starter(delay_s=0.4)
    pool = pool_of("a,b", 1, starter, wait_s=0.3, min_residency_s=0.0)

    def state_of_a_while_b_waits() -> str:
        waiter = threading.Thread(target=lambda: pool.lease("b").__enter__())
        waiter.start()
        time.sleep(0.15)
        state = {m["model"]: m["state"] for m in pool.describe()}["a"]
        waiter.join(5)
        return state

    with pool.lease("a"):
        assert state_of_a_while_b_waits() == "loaded"  # 0.4 s load: a keeps its place 0.8 s
        time.sleep(0.6)
        assert state_of_a_while_b_waits() == "draining"
