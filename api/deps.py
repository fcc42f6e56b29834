"""FastAPI dependencies, as Annotated aliases."""

from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import Depends, Request
from sqlalchemy.orm import Session

from api.fleet.live_workers import LiveQueues
from api.http.auth import Caller, authenticate, require_admin
from api.http.limits import DatabaseSlots, Slot
from api.http.middleware import request_id_of
from api.intake.prompts import PromptCounter
from db.session import get_sessionmaker
from llmq.registry import Registry
from llmq.settings import Settings


# The accessors are async because they do no I/O: FastAPI runs a sync dependency in its thread
# pool, a hop per dependency on every request.
async def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


class RequestSession(Session):
    """A request's session: closing it gives the request's database slot back, so a handler
    that goes on without the database (a long stream) closes it early and frees the slot."""

    slot: Slot | None = None

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self.slot is not None:
                self.slot.release()


def database_slots(request: Request) -> DatabaseSlots:
    """The process's DatabaseSlots, made with the app's settings when first needed."""
    state = request.app.state
    slots = getattr(state, "database_slots", None)
    if slots is None:  # on the event loop: no other task can be making it meanwhile
        settings = state.settings
        slots = state.database_slots = DatabaseSlots(
            settings.db_request_slots, settings.db_wait_s, settings.db_waiting_max
        )
    return slots


async def get_session(request: Request) -> AsyncIterator[Session]:
    """A session once the request has its turn at the database (503 if it would wait too long).
    Async, so that the wait holds no thread."""
    slot = await database_slots(request).acquire()
    factory = get_sessionmaker(request.app.state.settings.database_url)
    session = RequestSession(**factory.kw)
    session.slot = slot
    try:
        yield session
    finally:
        # Shielded: a client that went away must not leak the slot or the connection.
        with anyio.CancelScope(shield=True):
            if session.in_transaction():  # the rollback talks to Postgres: off the event loop
                # Its own limiter: closing must not wait for a thread behind requests that wait
                # for this very connection.
                await anyio.to_thread.run_sync(session.close, limiter=anyio.CapacityLimiter(1))
            else:
                session.close()


async def get_registry_dep(request: Request) -> Registry:
    return request.app.state.registry


async def get_prompt_counter(request: Request) -> PromptCounter:
    return request.app.state.prompt_counter


async def get_live_queues(request: Request) -> LiveQueues:
    return request.app.state.live_queues


async def get_request_id(request: Request) -> str | None:
    return request_id_of(request)


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
SessionDep = Annotated[Session, Depends(get_session)]
RegistryDep = Annotated[Registry, Depends(get_registry_dep)]
PromptCounterDep = Annotated[PromptCounter, Depends(get_prompt_counter)]
LiveQueuesDep = Annotated[LiveQueues, Depends(get_live_queues)]
RequestIdDep = Annotated[str | None, Depends(get_request_id)]
# The caller behind the request's API key, counted against its rate limit; AdminDep: admins only.
ApiKeyDep = Annotated[Caller, Depends(authenticate)]
AdminDep = Annotated[Caller, Depends(require_admin)]
