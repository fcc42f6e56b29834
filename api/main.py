"""The FastAPI application: `uvicorn api.main:app`."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.enqueue import producer
from api.errors import install_error_handlers
from api.live_workers import LiveQueues
from api.prompts import PromptCounter
from api.routes import health, jobs, models
from llmq.logs import configure_logging
from llmq.registry import load_registry
from llmq.settings import Settings, get_settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.live_queues.start()
        yield
        app.state.live_queues.stop()

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
    install_error_handlers(app)
    for module in (health, jobs, models):
        app.include_router(module.router)
    return app


app = create_app()
