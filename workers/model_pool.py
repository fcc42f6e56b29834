"""The models a worker serves, and which of them are loaded: at most `max_loaded` at once, the
least recently used evicted when another is needed, never while a job of it runs.

Each Celery message leases its model for as long as its jobs run (`lease`). A lease for a model
that is not loaded loads it, in the leasing thread, while the loaded models go on serving. When
every place is taken, the least recently used model stops taking new leases and is evicted once
its last one ends; a lease that cannot get its model within `wait_s` gives up (None), and its
message goes back to the queue, where another worker may take it: a worker never sits on
messages of a model it cannot load soon.

The operator's commands (workers/control.py) go through the same states: `load`, `unload`
(waits for the model's running jobs; `force` hands them back to the queue instead) and
`reload` (drains, then loads the model's entry as models.yaml has it now).
"""

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

import structlog

from llmq.registry import ModelSpec
from workers import metrics as worker_metrics

log = structlog.get_logger(__name__)


class Runtime(Protocol):
    """What the pool needs of a loaded model (workers.runtime.WorkerRuntime)."""

    def stop(self) -> None: ...

    def hand_back(self) -> None: ...

    def memory_bytes(self) -> int: ...


class ModelState(StrEnum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    DRAINING = "draining"  # takes no new leases; evicted, unloaded or reloaded once idle
    UNLOADING = "unloading"


@dataclass
class _Slot:
    spec: ModelSpec
    state: ModelState = ModelState.UNLOADED
    runtime: Runtime | None = None
    leases: int = 0
    last_used: float = 0.0  # time.monotonic() of its last lease
    loaded_at: float = 0.0
    load_seconds: float = 0.0  # how long its last load took
    loads: int = 0
    unloads: int = 0
    failures: int = 0  # loads that failed
    # Why it drains: "evict" (another model needs its place), "unload" or "reload".
    draining_for: str | None = None
    error: str | None = None  # why its last load failed
    retry_at: float = 0.0  # after a failed load, leases do not try again before this


class ModelUnavailable(Exception):
    """The model cannot be loaded (its load failed, or it is not one this worker serves)."""


@dataclass
class ModelPool:
    specs: dict[str, ModelSpec]
    max_loaded: int
    start_runtime: Callable[[ModelSpec], Runtime]
    wait_s: float = 2.0  # how long a lease waits for its model before its message goes back
    # A busy model is not drained for another before it has served this long, nor before twice
    # as long as its load took: under an even mix, the worker then spends at most a third of
    # its time loading.
    min_residency_s: float = 2.0
    load_retry_s: float = 30.0  # after a failed load, before a lease tries again
    clock: Callable[[], float] = time.monotonic
    _slots: dict[str, _Slot] = field(init=False)
    _cond: threading.Condition = field(init=False, default_factory=threading.Condition)
    _waiting: int = field(init=False, default=0)  # leases waiting for a place

    def __post_init__(self) -> None:
        if self.max_loaded < 1:
            raise ValueError("max_loaded must be at least 1")
        self._slots = {model: _Slot(spec) for model, spec in self.specs.items()}

    # -- leases (one per Celery message) ----------------------------------------------------

    @contextmanager
    def lease(self, model: str) -> Iterator[Runtime | None]:
        """The model's runtime while the block runs; None when it cannot be had within wait_s
        (the caller gives its message back). ModelUnavailable if its load fails."""
        runtime = self._acquire(model, self.clock() + self.wait_s)
        try:
            yield runtime
        finally:
            if runtime is not None:
                self._release(model)

    def _acquire(self, model: str, deadline: float) -> Runtime | None:
        slot = self._slot(model)
        with self._cond:
            if not self._wait_until_loaded(slot, deadline):
                return None
            slot.leases += 1
            return slot.runtime

    def _wait_until_loaded(self, slot: _Slot, deadline: float) -> bool:
        """Load the model (making room) or wait while it loads or drains; False at the
        deadline (unless it is loading). Called with the lock held."""
        self._waiting += 1
        try:
            while True:
                if slot.state is ModelState.LOADED:
                    slot.last_used = self.clock()
                    return True
                if (
                    slot.state is ModelState.UNLOADED
                    and self.clock() >= slot.retry_at
                    and self._make_room(slot)
                ):
                    self._load_locked(slot)
                    continue
                self._evict_idle_drained()
                remaining = deadline - self.clock()
                # A model that is loading will serve soon: its jobs wait for it.
                if remaining <= 0 and slot.state is not ModelState.LOADING:
                    return False
                self._cond.wait(min(max(remaining, 0.05), 0.5))
        finally:
            self._waiting -= 1
            if self._waiting == 0:
                self._stop_evicting()

    def _release(self, model: str) -> None:
        slot = self._slots[model]
        with self._cond:
            slot.leases -= 1
            slot.last_used = self.clock()
            if slot.leases == 0:
                self._cond.notify_all()

    # -- the operator's commands ------------------------------------------------------------

    def load(self, model: str, timeout_s: float = 600.0) -> None:
        """Load the model now, evicting the least recently used one if need be (a busy one
        once its running jobs have ended)."""
        slot = self._slot(model)
        with self._cond:
            slot.retry_at = 0.0  # the operator asks: try again now, even after a failure
            if not self._wait_until_loaded(slot, self.clock() + timeout_s):
                raise TimeoutError(f"{model} could not be loaded within {timeout_s:.0f}s")

    def unload(self, model: str, force: bool = False, timeout_s: float = 600.0) -> bool:
        """Unload the model once its running jobs have ended; with `force`, at once, its jobs
        handed back to the queue. False if it was not loaded."""
        return self._drain(model, "unload", force, timeout_s)

    def reload(self, model: str, spec: ModelSpec, timeout_s: float = 600.0) -> None:
        """Drain the model, then load `spec` (its entry as models.yaml has it now): new weights
        without a restart. A model that is not loaded takes the new entry for its next load."""
        with self._cond:
            slot = self._slot(model)
            if slot.state is ModelState.UNLOADED:
                slot.spec = spec
                return
        self._drain(model, "reload", False, timeout_s, new_spec=spec)

    def _drain(
        self,
        model: str,
        reason: str,
        force: bool,
        timeout_s: float,
        new_spec: ModelSpec | None = None,
    ) -> bool:
        slot = self._slot(model)
        deadline = self.clock() + timeout_s
        with self._cond:
            while slot.state is ModelState.LOADING or slot.state is ModelState.UNLOADING:
                self._cond.wait(0.5)
            if slot.state is ModelState.UNLOADED:
                return False
            slot.state, slot.draining_for = ModelState.DRAINING, reason
            runtime = slot.runtime
        if force and runtime is not None:
            runtime.hand_back()  # its jobs end at once and go back to the queue
        with self._cond:
            while slot.leases > 0:
                remaining = deadline - self.clock()
                if remaining <= 0:
                    slot.state, slot.draining_for = ModelState.LOADED, None
                    self._cond.notify_all()
                    raise TimeoutError(
                        f"{model} still runs jobs after {timeout_s:.0f}s; it stays loaded"
                    )
                self._cond.wait(min(remaining, 0.5))
            self._unload_locked(slot, evicted=False)
            if new_spec is not None:
                slot.spec = new_spec
                self._load_locked(slot)
        return True

    # -- what the worker reports ------------------------------------------------------------

    def describe(self) -> list[dict]:
        """Each model this worker serves: its state, leases (messages running) and memory."""
        with self._cond:
            return [
                {
                    "model": model,
                    "state": slot.state.value,
                    "running": slot.leases,
                    "memory_bytes": slot.runtime.memory_bytes() if slot.runtime else 0,
                    "loads": slot.loads,
                    "unloads": slot.unloads,
                    "failures": slot.failures,
                    "revision": slot.spec.revision,
                    "error": slot.error,
                }
                for model, slot in self._slots.items()
            ]

    def loaded(self) -> list[str]:
        with self._cond:
            return [m for m, s in self._slots.items() if s.state is ModelState.LOADED]

    def stop(self) -> None:
        """Stop every loaded model (the worker is shutting down)."""
        with self._cond:
            slots = [s for s in self._slots.values() if s.runtime is not None]
        for slot in slots:
            assert slot.runtime is not None
            slot.runtime.stop()

    # -- inside the lock --------------------------------------------------------------------

    def _slot(self, model: str) -> _Slot:
        slot = self._slots.get(model)
        if slot is None:
            raise ModelUnavailable(f"this worker does not serve {model!r}")
        return slot

    def _occupied(self) -> int:
        return sum(s.state is not ModelState.UNLOADED for s in self._slots.values())

    def _make_room(self, slot: _Slot) -> bool:
        """True when the model may load now; else, frees a place for it: the least recently
        used idle model is evicted at once, or a busy one drains for eviction."""
        if self._occupied() < self.max_loaded:
            return True
        loaded = [s for s in self._slots.values() if s.state is ModelState.LOADED and s is not slot]
        idle = [s for s in loaded if s.leases == 0]
        if idle:
            self._unload_locked(min(idle, key=lambda s: s.last_used), evicted=True)
            return self._occupied() < self.max_loaded
        if not any(s.draining_for == "evict" for s in self._slots.values()):
            settled = [s for s in loaded if self.clock() - s.loaded_at >= self._residency(s)]
            if settled:
                victim = min(settled, key=lambda s: s.last_used)
                victim.state, victim.draining_for = ModelState.DRAINING, "evict"
                log.info("model draining for eviction", model=victim.spec.id, leases=victim.leases)
        return False

    def _residency(self, slot: _Slot) -> float:
        return max(self.min_residency_s, 2 * slot.load_seconds)

    def _evict_idle_drained(self) -> None:
        for slot in self._slots.values():
            if slot.draining_for == "evict" and slot.leases == 0:
                self._unload_locked(slot, evicted=True)

    def _stop_evicting(self) -> None:
        """No lease waits for a place any more: a model draining for eviction takes leases
        again."""
        for slot in self._slots.values():
            if slot.draining_for == "evict":
                slot.state, slot.draining_for = ModelState.LOADED, None
                self._cond.notify_all()

    def _load_locked(self, slot: _Slot) -> None:
        """Load the model with the lock released, so the loaded models go on serving."""
        slot.state, slot.error = ModelState.LOADING, None
        self._cond.release()
        started = self.clock()
        try:
            runtime = self.start_runtime(slot.spec)
        except Exception as exc:
            log.exception("model load failed", model=slot.spec.id)
            with_error = f"{type(exc).__name__}: {exc}"
            self._cond.acquire()
            slot.state, slot.error = ModelState.UNLOADED, with_error
            slot.failures += 1
            slot.retry_at = self.clock() + self.load_retry_s
            self._cond.notify_all()
            raise ModelUnavailable(f"{slot.spec.id} could not be loaded: {with_error}") from exc
        self._cond.acquire()
        slot.runtime, slot.state, slot.draining_for = runtime, ModelState.LOADED, None
        slot.loaded_at = slot.last_used = self.clock()
        slot.load_seconds = self.clock() - started
        slot.loads += 1
        log.info("model ready", model=slot.spec.id, seconds=round(slot.load_seconds, 2))
        self._report_loaded()
        self._cond.notify_all()

    def _unload_locked(self, slot: _Slot, evicted: bool) -> None:
        runtime, slot.state = slot.runtime, ModelState.UNLOADING
        self._cond.release()
        started = self.clock()
        try:
            if runtime is not None:
                runtime.stop()
        finally:
            self._cond.acquire()
            slot.runtime, slot.state, slot.draining_for = None, ModelState.UNLOADED, None
            slot.unloads += 1
            if evicted:
                worker_metrics.model_evicted(slot.spec.id)
            seconds = round(self.clock() - started, 2)
            log.info("model unloaded", model=slot.spec.id, evicted=evicted, seconds=seconds)
            self._report_loaded()
            self._cond.notify_all()

    def _report_loaded(self) -> None:
        worker_metrics.models_loaded(
            sum(s.state is ModelState.LOADED for s in self._slots.values())
        )
