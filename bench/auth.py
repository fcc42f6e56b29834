"""The cost of API keys and limits on the submit path: POST /v1/jobs with auth off, with a key
and no limits (auth alone), with a key and a rate limit (one Redis round trip), and with a key
whose every limit is checked (that, and one Postgres round trip for its jobs at once and its
monthly tokens). The limits are high enough never to be reached.

`python -m bench.auth` builds two apps in one process, one with LLMQ_AUTH=off and one with auth
on, on one database and one Redis of their own, and calls them in process (ASGI), so that the
only difference between the ways is auth: no HTTP server, no other process, no model (no worker
runs; the jobs stay queued). Requests go one at a time; the four ways take turns within each
run, and the queued jobs are cancelled after each run, so that a key's count of jobs in flight
stays small, as its limit keeps it. Figures are the medians over `--runs` runs of each run's
percentiles, in milliseconds.
"""

import argparse
import asyncio
import logging
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import yaml
from redis import Redis
from rich.console import Console
from rich.table import Table
from sqlalchemy import update

from api.main import create_app
from bench.samples import Samples
from bench.stack import bench_urls
from db.admin import create_database, migrate
from db.queries.keys import generate_key
from db.session import session_scope
from db.tables import Job
from llmq.settings import Settings

MODEL = "tiny"
DATABASE = "llmq_bench_auth"  # its own database and Redis, to run beside another benchmark
REDIS_DB = 11
BODY = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4}
NO_LIMITS = {"rate_limit_per_minute": 0, "max_concurrent_jobs": 0, "monthly_token_quota": 0}
# Limits that are checked on every request but never reached.
HIGH_LIMITS = {
    "rate_limit_per_minute": 10**9,
    "max_concurrent_jobs": 10**9,
    "monthly_token_quota": 10**15,
}
console = Console()


async def submit_times(http: httpx.AsyncClient, count: int) -> list[float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        (await http.post("/v1/jobs", json=BODY)).raise_for_status()
        times.append(time.perf_counter() - started)
    return times


def cancel_queued(database_url: str) -> None:
    with session_scope(database_url) as session:
        session.execute(update(Job).where(Job.status == "queued").values(status="cancelled"))


def bench_settings(workdir: Path, **overrides) -> Settings:
    models_file = workdir / "models.bench.yaml"
    spec = {"id": MODEL, "source": "builtin:tiny-llama", "devices": ["cpu"], "context_length": 128}
    models_file.write_text(yaml.safe_dump({"models": [spec]}))
    database_url, redis_url = bench_urls(DATABASE)
    return Settings(
        database_url=database_url,
        redis_url=f"{redis_url.rsplit('/', 1)[0]}/{REDIS_DB}",
        models_file=models_file,
        data_dir=workdir,
        log_level="WARNING",
        **overrides,
    )


async def measure(workdir: Path, runs: int, requests: int) -> dict[str, Samples]:
    admin_key = generate_key()
    on = bench_settings(workdir, auth=True, bootstrap_admin_key=admin_key)
    off = bench_settings(workdir, auth=False)
    create_database(on.database_url, replace=True)
    migrate(on.database_url)
    Redis.from_url(on.redis_url).flushdb()
    async with AsyncExitStack() as stack:

        async def serve(settings: Settings) -> httpx.ASGITransport:
            app = create_app(settings)
            await stack.enter_async_context(app.router.lifespan_context(app))
            return httpx.ASGITransport(app=app)

        async def client(transport: httpx.ASGITransport, key: str | None) -> httpx.AsyncClient:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            return await stack.enter_async_context(
                httpx.AsyncClient(transport=transport, base_url="http://bench", headers=headers)
            )

        with_auth = await serve(on)
        admin = await client(with_auth, admin_key)

        async def key_with(limits: dict) -> str:
            created = await admin.post("/v1/admin/keys", json={"name": "bench", **limits})
            return created.raise_for_status().json()["key"]

        rate_only = NO_LIMITS | {"rate_limit_per_minute": HIGH_LIMITS["rate_limit_per_minute"]}
        ways = {
            "auth off": await client(await serve(off), None),
            "key, no limits": await client(with_auth, await key_with(NO_LIMITS)),
            "key, rate limit (Redis)": await client(with_auth, await key_with(rate_only)),
            "key, every limit (Redis, Postgres)": await client(
                with_auth, await key_with(HIGH_LIMITS)
            ),
        }
        for http in ways.values():  # warm-up: connections, caches, the prompt tokenizer
            await submit_times(http, 50)
        results = {name: Samples() for name in ways}
        for _ in range(runs):
            for name, http in ways.items():
                results[name].runs.append(await submit_times(http, requests))
            cancel_queued(on.database_url)
    return results


def print_table(results: dict[str, Samples], runs: int, requests: int) -> None:
    table = Table(
        title=f"POST /v1/jobs in process, one at a time (ms; medians of {runs} runs × "
        f"{requests} requests)"
    )
    for column in ("submit path", "p50", "p90", "p50 − off", "p50 / off"):
        table.add_column(column, justify="left" if column == "submit path" else "right")
    base = results["auth off"].percentile(50)
    for name, samples in results.items():
        p50 = samples.percentile(50)
        table.add_row(
            name,
            f"{p50:.2f}",
            f"{samples.percentile(90):.2f}",
            f"{p50 - base:+.2f}",
            f"{p50 / base:.2f}×",
        )
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--requests", type=int, default=300, help="per way, per run")
    args = parser.parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    with tempfile.TemporaryDirectory(prefix="llmq-bench-auth-") as workdir:
        results = asyncio.run(measure(Path(workdir), args.runs, args.requests))
    print_table(results, args.runs, args.requests)


if __name__ == "__main__":
    main()
