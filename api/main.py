"""The FastAPI application: `uvicorn api.main:app`."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from fastapi import FastAPI

from api.enqueue import producer
from api.errors import install_error_handlers
from api.events import JobEventReader, postgres_loader
from api.live_workers import LiveQueues
from api.prompts import PromptCounter
from api.routes import health, jobs, models, openai, streams
from llmq.logs import configure_logging
from llmq.publisher import TokenPublisher
from llmq.registry import load_registry
from llmq.settings import Settings, get_settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.live_queues.start()
        redis = aioredis.Redis.from_url(settings.redis_url, max_connections=1000)
        app.state.event_reader = JobEventReader(redis, postgres_loader(settings.database_url))
        yield
        app.state.live_queues.stop()
        await redis.aclose()

    app = FastAPI(
        title="llmq",
        version="0.1.0",
        description="Queue-backed LLM inference: submit jobs, poll or stream their results.",
        lifespan=lifespan,
    )
    configure_logging(settings.log_level, settings.log_json)
    app.state.settings = settings
    app.state.registry = load_registry(settings.models_file)
    app.state.prompt_counter = PromptCounter(settings.data_dir)
    app.state.live_queues = LiveQueues(producer(), interval_s=settings.workers_cache_s)
    app.state.publisher = TokenPublisher(settings.redis_url)
    install_error_handlers(app)
    for module in (health, jobs, streams, models, openai):
        app.include_router(module.router)
    return app


app = create_app()
