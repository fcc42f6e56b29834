"""The FastAPI application: `uvicorn api.main:app`."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from fastapi import Depends, FastAPI

from api.background.batch_driver import BatchDriver
from api.background.eval_driver import EvalDriver
from api.background.reconciler import Reconciler
from api.fleet.live_workers import LiveQueues
from api.fleet.upstreams import UpstreamBreakers
from api.http.auth import Authenticator, authenticate
from api.http.errors import ERROR_RESPONSES, install_error_handlers
from api.http.limits import RateLimiter, RateLimitHeaders
from api.http.middleware import RequestContextMiddleware
from api.http.query_params import single_query_values
from api.http.request_size import RequestSizeLimit
from api.intake.batch_input import MAX_FILE_BYTES
from api.intake.enqueue import producer
from api.intake.prompts import PromptCounter
from api.intake.store_groups import StoreGroups
from api.metrics import scrape_registry
from api.results.events import JobEventReader, postgres_loader
from api.results.final_events import FinalEventListener
from api.results.job_channels import JobChannels
from api.routes import (
    admin,
    batches,
    evals,
    files,
    health,
    jobs,
    me,
    metrics,
    models,
    openai,
    schemas,
    stats,
    streams,
    workers,
)
from llmq.heap import settle
from llmq.logs import configure_logging
from llmq.publisher import TokenPublisher
from llmq.registry import load_registry
from llmq.settings import Settings, get_settings
from llmq.tracing import app_telemetry, configure_tracing


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.authenticator.ensure_bootstrap_key()
        app.state.rate_limiter = RateLimiter(settings.redis_url)
        app.state.live_queues.start()
        reconciler = app.state.reconciler = Reconciler(settings, app.state.live_queues)
        reconciler.start()
        app.state.eval_driver.start()
        app.state.batch_driver.start()
        store_groups = app.state.store_groups = StoreGroups(
            settings.database_url, app.state.prompt_counter, app.state.live_queues
        )
        store_groups.start()
        redis = aioredis.Redis.from_url(settings.redis_url, max_connections=1000)
        finals = FinalEventListener(redis)
        finals.start()
        channels = JobChannels(settings.redis_url)
        channels.start()
        await finals.wait_listening(timeout=1.0)  # Redis may be away: requests then poll
        await channels.wait_listening(timeout=1.0)  # or stream from Postgres
        loader = postgres_loader(settings.database_url)
        app.state.event_reader = JobEventReader(redis, loader, finals, channels)
        settle(settings.gc_young_threshold)  # start-up is done: see llmq/heap.py
        yield
        await finals.stop()
        await channels.stop()
        app.state.live_queues.stop()
        reconciler.stop()
        app.state.eval_driver.stop()
        app.state.batch_driver.stop()
        store_groups.stop()
        await redis.aclose()
        await app.state.rate_limiter.close()

    app = FastAPI(
        title="llmq",
        version="0.1.0",
        description="Queue-backed LLM inference: submit jobs, poll or stream their results.",
        lifespan=lifespan,
        dependencies=[Depends(single_query_values)],
        telemetry=app_telemetry(),
    )
    configure_tracing("llmq-api")  # before logging: traced lines carry their trace ids
    configure_logging(settings.log_level, settings.log_json)
    app.state.settings = settings
    app.state.registry = load_registry(settings.models_file)
    app.state.prompt_counter = PromptCounter(settings.data_dir)
    app.state.live_queues = LiveQueues(producer(), interval_s=settings.workers_cache_s)
    app.state.publisher = TokenPublisher(settings.redis_url)
    app.state.upstream_breakers = UpstreamBreakers(app.state.registry, settings.redis_url)
    app.state.authenticator = Authenticator(settings)
    app.state.eval_driver = EvalDriver(
        settings, app.state.registry, app.state.prompt_counter, app.state.live_queues
    )
    app.state.batch_driver = BatchDriver(
        app.state, settings.batch_interval_s, settings.background_idle_interval_s
    )
    app.state.scrape_registry = scrape_registry(
        app.state.registry,
        app.state.live_queues,
        settings.redis_url,
        settings.database_url,
        app.state.upstream_breakers,
    )
    install_error_handlers(app)
    app.add_middleware(RateLimitHeaders)
    app.add_middleware(
        RequestSizeLimit,
        max_bytes=settings.max_request_bytes,
        # Batch input files are large by design; the upload route enforces their own limit.
        larger_limits={"/v1/files": MAX_FILE_BYTES + 1024 * 1024},
    )
    # Outermost of these: every answer gets an id. FastAPI's telemetry wraps even that, so the
    # request's span is current in every middleware.
    app.add_middleware(RequestContextMiddleware)
    for module in (health, metrics):  # probes and Prometheus stay open, as do the docs
        app.include_router(module.router, responses=ERROR_RESPONSES)
    keyed = (
        jobs,
        streams,
        models,
        openai,
        schemas,
        files,
        batches,
        stats,
        evals,
        me,
        admin,
        workers,
    )
    for module in keyed:  # every route of these needs an API key
        app.include_router(
            module.router, responses=ERROR_RESPONSES, dependencies=[Depends(authenticate)]
        )
    return app


app = create_app()
