"""One thread writes what many threads hand over, many items per transaction (group commit).

The jobs of a micro-batch are delivered together and often finish at the same decode step;
each Celery thread then wanted a transaction of its own, one after another; the API's requests
that arrive together did the same with their jobs. A group commit takes every item that is
waiting and writes them in one transaction of a few statements; each waiter gets its own
item's answer. A group that fails is written again item by item, so that an item Postgres
refuses fails alone, unless its error would meet every item alone as well (`group_errors`:
Postgres away). An item whose waiter gave up (a cancelled future) is written all the same.
"""

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import structlog

log = structlog.get_logger(__name__)

Item = TypeVar("Item")
Answer = TypeVar("Answer")

# Items per transaction: bounds a transaction's length when thousands arrive at once.
MAX_ITEMS_PER_COMMIT = 256


@dataclass
class _Waiting(Generic[Item, Answer]):
    item: Item
    future: "Future[Answer]" = field(default_factory=Future)


class GroupCommit(Generic[Item, Answer]):
    """`write(items)` stores a group in one transaction and returns one answer per item."""

    def __init__(
        self,
        name: str,
        write: Callable[[list[Item]], list[Answer]],
        group_errors: tuple[type[Exception], ...] = (),
    ) -> None:
        self._write_group = write
        self._group_errors = group_errors
        self._inbox: queue.Queue[_Waiting | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._stopped = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Writes what is waiting, then ends."""
        self._stopped.set()
        self._inbox.put(None)
        self._thread.join(timeout)

    def submit(self, item: Item) -> Answer:
        """Blocks until the item's group is committed; raises what writing it alone raised."""
        return self.submit_async(item).result()

    def submit_async(self, item: Item) -> "Future[Answer]":
        """The item's answer once its group is committed."""
        if self._stopped.is_set():
            raise RuntimeError(f"{self._thread.name} has stopped")
        waiting: _Waiting[Item, Answer] = _Waiting(item)
        self._inbox.put(waiting)
        return waiting.future

    def _run(self) -> None:
        while True:
            first = self._inbox.get()
            if first is None:
                return
            group = [first]
            while len(group) < MAX_ITEMS_PER_COMMIT:
                try:
                    more = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._inbox.put(None)  # end after this group
                    break
                group.append(more)
            self._write(group)

    def _write(self, group: list[_Waiting]) -> None:
        try:
            answers = self._write_group([waiting.item for waiting in group])
        except Exception as exc:
            if len(group) == 1 or isinstance(exc, self._group_errors):
                for waiting in group:
                    _settle(waiting.future.set_exception, exc)
            else:
                name = self._thread.name
                log.warning("a group failed to commit; writing each alone", writer=name)
                for waiting in group:
                    self._write([waiting])
            return
        for waiting, answer in zip(group, answers, strict=True):
            _settle(waiting.future.set_result, answer)


def _settle(setter: Callable[[object], None], outcome: object) -> None:
    """Answer a waiter, unless it cancelled its future (its item is written all the same)."""
    with suppress(InvalidStateError):
        setter(outcome)
