"""FastAPI dependencies, as Annotated aliases."""

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from api.live_workers import LiveQueues
from api.middleware import request_id_of
from api.prompts import PromptCounter
from db.session import get_sessionmaker
from llmq.registry import Registry
from llmq.settings import Settings


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    with get_sessionmaker(request.app.state.settings.database_url)() as session:
        yield session


def get_registry_dep(request: Request) -> Registry:
    return request.app.state.registry


def get_prompt_counter(request: Request) -> PromptCounter:
    return request.app.state.prompt_counter


def get_live_queues(request: Request) -> LiveQueues:
    return request.app.state.live_queues


def get_request_id(request: Request) -> str | None:
    return request_id_of(request)


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
SessionDep = Annotated[Session, Depends(get_session)]
RegistryDep = Annotated[Registry, Depends(get_registry_dep)]
PromptCounterDep = Annotated[PromptCounter, Depends(get_prompt_counter)]
LiveQueuesDep = Annotated[LiveQueues, Depends(get_live_queues)]
RequestIdDep = Annotated[str | None, Depends(get_request_id)]
