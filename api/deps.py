"""FastAPI dependencies, as Annotated aliases."""

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from api.auth import Caller, authenticate, require_admin
from api.live_workers import LiveQueues
from api.middleware import request_id_of
from api.prompts import PromptCounter
from db.session import get_sessionmaker
from llmq.registry import Registry
from llmq.settings import Settings


# The accessors are async because they do no I/O: FastAPI runs a sync dependency in its thread
# pool, a hop per dependency on every request.
async def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    with get_sessionmaker(request.app.state.settings.database_url)() as session:
        yield session


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
