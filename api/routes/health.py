"""Liveness and readiness probes."""

from alembic.config import Config
from alembic.script import ScriptDirectory
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from redis import Redis
from redis.exceptions import ResponseError
from sqlalchemy import text

from api.deps import SettingsDep
from db.session import get_engine
from llmq.settings import PROJECT_ROOT

router = APIRouter(tags=["health"])


def migration_head() -> str | None:
    return ScriptDirectory.from_config(Config(str(PROJECT_ROOT / "alembic.ini"))).get_current_head()


def eviction_check(redis: Redis) -> str:
    """Redis must never evict: an evicted queue or unacknowledged-message key loses jobs."""
    try:
        policy = redis.config_get("maxmemory-policy").get("maxmemory-policy")
    except ResponseError:
        return "ok"  # CONFIG is disabled (managed Redis): the operator vouches for the policy
    if policy == "noeviction":
        return "ok"
    return f"maxmemory-policy is {policy}; set it to noeviction or queued jobs can be lost"


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(settings: SettingsDep, request: Request) -> JSONResponse:
    """Postgres and Redis answer and the schema is at the newest migration. Remote models'
    upstream breakers are shown beside the checks: an upstream's outage fails that model's jobs,
    not the API's readiness."""
    checks: dict[str, str] = {}
    try:
        with get_engine(settings.database_url).connect() as conn:
            current = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        head = migration_head()
        checks["postgres"] = "ok"
        checks["migrations"] = "ok" if current == head else f"at {current}, head is {head}"
    except Exception as exc:
        checks["postgres"] = f"unavailable: {type(exc).__name__}"
        checks["migrations"] = "unknown"
    try:
        redis = Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
        redis.ping()
        checks["redis"] = "ok"
        checks["redis_eviction"] = eviction_check(redis)
    except Exception as exc:
        checks["redis"] = f"unavailable: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    body: dict = {"status": "ready" if ready else "not ready", "checks": checks}
    if breakers := request.app.state.upstream_breakers.states():
        body["upstream_circuit_breakers"] = breakers
    return JSONResponse(
        body,
        status_code=200 if ready else 503,
        headers=None if ready else {"Retry-After": "5"},
    )
