"""Recovery times: how long llmq takes to get every job done again after Redis was away, and
after a worker was killed.

    python -m bench.recovery [--runs 3] [--outage 20] [--jobs 200] [--clients 16]

(a) Redis outage: `--jobs` jobs (64 tokens each, never from the completion cache, distinct
    prompts) from `--clients` clients to two workers; once every job is accepted and the
    workers hold running ones, the benchmark's own redis-server is killed for `--outage`
    seconds and started again empty: every queued message is lost. Measured from Redis's
    return: until no queued job is missing from the broker (every lost message sent again),
    and until every job has succeeded. Every job must succeed exactly once (one result row, one
    usage row), and both workers must survive (their processes never exit).
(b) Worker SIGKILL: one of two workers is killed with SIGKILL while it holds running jobs; no
    replacement is started. Measured from the kill: until none of its running jobs is still
    marked running on it (released by the API's reconciler), until half of them and all of them
    have succeeded on the other worker, and until every job submitted has succeeded (which
    includes the jobs the killed worker had taken from the queue but not started).

Each is run `--runs` times on a fresh stack (its own Postgres database on the benchmark's
server, its own redis-server), with the reconciler's production defaults
(LLMQ_RECONCILE_INTERVAL_S, LLMQ_WORKER_LOST_AFTER_S, LLMQ_REQUEUE_AFTER_S unset). The table
shows the median and the range. This module also holds the probes that `bench.soak` uses for
its faults; the private servers are in bench/servers.py.
"""

import argparse
import asyncio
import json
import shutil
import signal
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from redis import Redis
from redis.exceptions import RedisError
from rich.console import Console
from rich.table import Table
from sqlalchemy import bindparam, create_engine, text
from sqlalchemy.exc import OperationalError

from api.fleet.queues import message_job_ids, priority_lists
from bench.servers import PrivateRedis, free_port, wait_for
from bench.stack import bench_urls, llmq_stack
from db.admin import drop_database

console = Console(width=120)
MODEL = {
    "id": "recovery",
    "source": "builtin:tiny-llama",
    "devices": ["cpu"],
    "max_batch_size": 8,
    "context_length": 512,
}
QUEUE = "llmq.recovery.cpu"
DATABASE = "llmq_recovery"  # on the benchmark's Postgres server; dropped at the end
# Workers serve no metrics here: two on one host would want the same port.
SETTINGS = {"LLMQ_WORKER_METRICS_PORT": "0"}
# kombu's Redis transport keeps each delivered, unacknowledged message in this hash.
UNACKED_KEY = "unacked"


class JobProbe:
    """What Postgres and the broker say about the jobs, read from outside the stack."""

    def __init__(self, database_url: str, redis_url: str) -> None:
        self.engine = create_engine(database_url, pool_size=2, pool_pre_ping=True)
        self.redis = Redis.from_url(redis_url, socket_timeout=5)

    def close(self) -> None:
        self.engine.dispose()
        self.redis.close()

    def ids(self, where: str, **params) -> set[str]:
        with self.engine.connect() as conn:
            query = text(f"SELECT id FROM jobs WHERE {where}")  # noqa: S608 (fixed fragments)
            return {str(row[0]) for row in conn.execute(query, params)}

    def statuses(self, ids: set[str] | None = None) -> Counter:
        with self.engine.connect() as conn:
            if ids is None:
                rows = conn.execute(text("SELECT status, count(*) FROM jobs GROUP BY status"))
            else:
                query = text(
                    "SELECT status, count(*) FROM jobs WHERE id::text IN :ids GROUP BY status"
                ).bindparams(bindparam("ids", expanding=True))
                rows = conn.execute(query, {"ids": sorted(ids) or [""]})
            return Counter(dict(rows.all()))

    def running_on(self, pid: int) -> set[str]:
        """The jobs marked running on the worker process `pid` (its hostname ends .<pid>@)."""
        return self.ids("status = 'running' AND worker LIKE :name", name=f"%.{pid}@%")

    def unfinished(self, ids: set[str]) -> set[str]:
        """Those of `ids` that have not succeeded (yet)."""
        with self.engine.connect() as conn:
            query = text(
                "SELECT id FROM jobs WHERE id = ANY(CAST(:ids AS uuid[])) AND status <> 'succeeded'"
            )
            return {str(row[0]) for row in conn.execute(query, {"ids": sorted(ids)})}

    def missing_from_broker(self, ids: set[str], queues: set[str]) -> set[str]:
        """Those of `ids` still queued in Postgres with no message in the broker: neither
        waiting in a queue nor delivered to a worker."""
        queued = ids & self.ids("status = 'queued'")
        if not queued:
            return set()
        present: set[str] = set()
        raw = [
            m for q in queues for key in priority_lists(q) for m in self.redis.lrange(key, 0, -1)
        ]
        raw += [value for value in self.redis.hvals(UNACKED_KEY)]
        for message in raw:
            try:
                decoded = json.loads(message)
                # A list's entry is the message; the unacked hash holds [message, ...].
                envelope = decoded[0] if isinstance(decoded, list) else decoded
                headers = envelope["headers"]
                present.update(message_job_ids(headers))
            except (ValueError, KeyError, TypeError, IndexError):
                continue
        return queued - present

    def exactly_once(self, ids: set[str]) -> dict[str, int]:
        """Counts that must all be zero: jobs not succeeded, jobs without exactly one result
        row or exactly one usage row."""
        with self.engine.connect() as conn:
            counts = {}
            for table in ("job_results", "usage"):
                query = text(
                    f"SELECT j.id, count(t.job_id) FROM jobs j LEFT JOIN {table} t "  # noqa: S608
                    "ON t.job_id = j.id WHERE j.id::text IN :ids GROUP BY j.id"
                ).bindparams(bindparam("ids", expanding=True))
                per_job = dict(conn.execute(query, {"ids": sorted(ids)}).all())
                counts[f"jobs without exactly one {table} row"] = sum(
                    1 for n in per_job.values() if n != 1
                ) + (len(ids) - len(per_job))
        counts["jobs not succeeded"] = len(self.unfinished(ids))
        return counts

    def redelivered(self, ids: set[str]) -> int:
        return len(ids & self.ids("attempts > 1"))


def time_each_success(probe: JobProbe, ids: set[str], since: float, timeout_s: float) -> list:
    """Seconds from `since` until each of `ids` was seen succeeded (polled every 0.1 s)."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout_s
    while len(seen) < len(ids):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(ids) - len(seen)} jobs not succeeded in {timeout_s:.0f} s")
        now = time.monotonic()
        for job in ids - probe.unfinished(ids) - set(seen):
            seen[job] = now - since
        time.sleep(0.1)
    return sorted(seen.values())


def tolerant(read: Callable[[], object], fallback: object) -> Callable[[], object]:
    """`read`, answering `fallback` while Postgres or Redis is away."""

    def call():
        try:
            return read()
        except (OperationalError, RedisError):
            return fallback

    return call


async def submit_jobs(base: str, prompts: list[str], clients: int, max_tokens: int) -> list[str]:
    """Submit one job per prompt from `clients` concurrent clients; the accepted ids."""
    accepted: list[str] = []

    async def client(share: list[str]) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            for prompt in share:
                body = {"model": MODEL["id"], "prompt": prompt, "max_tokens": max_tokens}
                body |= {"ignore_eos": True, "cache": False}
                while True:
                    response = await http.post("/v1/jobs", json=body)
                    if response.status_code == 202:
                        accepted.append(response.json()["id"])
                        break
                    if response.status_code != 503:
                        response.raise_for_status()
                    await asyncio.sleep(float(response.headers.get("Retry-After", "1")))

    await asyncio.gather(*(client(prompts[i::clients]) for i in range(clients)))
    return accepted


@dataclass
class RunResult:
    times: dict[str, float] = field(default_factory=dict)
    facts: dict[str, object] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def two_workers(args, workdir: Path, redis: "PrivateRedis"):
    """The stack both measurements run: the API and two workers on the private Redis."""
    return llmq_stack(
        [MODEL],
        workdir,
        [MODEL["id"]] * 2,
        port=args.port,
        redis_url=redis.url,
        database=DATABASE,
        api_log=workdir / "api.log",
        **SETTINGS,
    )


def redis_outage_run(args, run: int, workdir: Path) -> RunResult:
    """Run (a) once: Redis away for `args.outage` seconds with every job in flight."""
    result = RunResult()
    redis = PrivateRedis(free_port(), workdir)
    redis.start()
    try:
        with two_workers(args, workdir, redis) as (base, processes):
            workers = processes[1:]
            probe = JobProbe(bench_urls(DATABASE)[0], redis.url)
            prompts = [f"recovery {run} {i}" for i in range(args.jobs)]
            ids = set(asyncio.run(submit_jobs(base, prompts, args.clients, args.max_tokens)))
            wait_for(lambda: probe.statuses(ids)["running"] > 0, 60, every_s=0.05)
            at_stop = probe.statuses(ids)
            redis.stop()
            time.sleep(args.outage)
            at_return = probe.statuses(ids)
            redis.start()
            returned = time.monotonic()
            lost = probe.ids("status = 'queued'") & ids
            result.facts |= {
                "at the stop: running / queued / succeeded": _triple(at_stop),
                "at the return: running / queued / succeeded": _triple(at_return),
                "queued jobs whose message was lost": len(lost),
            }
            missing = tolerant(lambda: probe.missing_from_broker(lost, {QUEUE}), lost)
            unfinished = tolerant(lambda: probe.unfinished(ids), ids)
            resent_at = drained_at = None
            deadline = returned + args.timeout
            while drained_at is None and time.monotonic() < deadline:
                now = time.monotonic()
                if resent_at is None and not missing():
                    resent_at = now
                if not unfinished():
                    drained_at = now
                    resent_at = resent_at or now
                time.sleep(0.1)
            if resent_at is not None:
                result.times["every lost message sent again"] = resent_at - returned
            if drained_at is None:
                result.failures.append(f"jobs unfinished after {args.timeout:.0f} s")
            else:
                result.times["every job succeeded"] = drained_at - returned
            _check_once(probe, ids, args.jobs, result)
            exited = [w.pid for w in workers if w.poll() is not None]
            result.facts["workers that exited"] = len(exited)
            if exited:
                result.failures.append(f"workers exited: pids {exited}; see {workdir}")
            probe.close()
    finally:
        redis.stop()
    return result


def worker_kill_run(args, run: int, workdir: Path) -> RunResult:
    """Run (b) once: one of two workers SIGKILLed while it holds running jobs."""
    result = RunResult()
    redis = PrivateRedis(free_port(), workdir)
    redis.start()
    try:
        with two_workers(args, workdir, redis) as (base, processes):
            victim, survivor = processes[1], processes[2]
            probe = JobProbe(bench_urls(DATABASE)[0], redis.url)
            prompts = [f"kill {run} {i}" for i in range(args.kill_jobs)]
            ids = set(asyncio.run(submit_jobs(base, prompts, args.clients, args.kill_tokens)))
            wait_for(lambda: len(probe.running_on(victim.pid)) >= 2, 60, every_s=0.05)
            victim.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            victim.wait()
            held = probe.running_on(victim.pid)
            result.facts["jobs running on the killed worker"] = len(held)
            if not held:
                result.failures.append("the worker held no running job when it was killed")
                probe.close()
                return result
            wait_for(lambda: not (held & probe.running_on(victim.pid)), args.timeout, 0.1)
            result.times["its jobs released"] = time.monotonic() - killed
            each = time_each_success(probe, held, killed, args.timeout)
            result.times["half of its jobs succeeded elsewhere"] = statistics.median(each)
            result.times["all its jobs succeeded elsewhere"] = max(each)
            wait_for(lambda: not probe.unfinished(ids), args.timeout, every_s=0.1)
            # Jobs the killed worker had taken from the queue but not started count here.
            result.times["every job submitted succeeded"] = time.monotonic() - killed
            elsewhere = probe.ids("worker LIKE :name", name=f"%.{survivor.pid}@%")
            if held - elsewhere:
                result.failures.append(f"{len(held - elsewhere)} of its jobs not on the survivor")
            wait_for(lambda: not probe.unfinished(ids), args.timeout)
            _check_once(probe, ids, args.kill_jobs, result)
            if survivor.poll() is not None:
                result.failures.append("the surviving worker exited")
            probe.close()
    finally:
        redis.stop()
    return result


def _triple(counts: Counter) -> str:
    return f"{counts['running']} / {counts['queued']} / {counts['succeeded']}"


def _check_once(probe: JobProbe, ids: set[str], expected: int, result: RunResult) -> None:
    counts = probe.exactly_once(ids)
    result.facts["jobs run more than once (redelivered)"] = probe.redelivered(ids)
    if len(ids) != expected:
        result.failures.append(f"{len(ids)} distinct jobs accepted of {expected}")
    for name, value in counts.items():
        if value:
            result.failures.append(f"{name}: {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--outage", type=float, default=20.0, help="seconds Redis is away")
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--kill-jobs", type=int, default=32, help="jobs in flight at the kill")
    parser.add_argument("--kill-tokens", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per wait")
    parser.add_argument("--port", type=int, default=8772, help="the API's port")
    parser.add_argument("--only", choices=["redis", "kill"], help="run one measurement only")
    args = parser.parse_args()

    runs: dict[str, list[RunResult]] = {"redis": [], "kill": []}
    for name, measure in (("redis", redis_outage_run), ("kill", worker_kill_run)):
        if args.only not in (None, name):
            continue
        for run in range(args.runs):
            workdir = Path(tempfile.mkdtemp(prefix=f"llmq-recovery-{name}-"))
            started = time.monotonic()
            result = measure(args, run, workdir)
            runs[name].append(result)
            console.print(
                f"{name} run {run + 1}: {time.monotonic() - started:.0f} s wall; "
                f"{_fmt(result.times)}; {result.facts}"
            )
            for failure in result.failures:
                console.print(f"  [red]FAILED[/red] {failure}")
            if not result.failures:
                shutil.rmtree(workdir, ignore_errors=True)
    drop_database(bench_urls(DATABASE)[0])
    print_table(args, runs)
    raise SystemExit(1 if any(r.failures for rs in runs.values() for r in rs) else 0)


def _fmt(times: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.1f} s" for name, value in times.items())


def print_table(args, runs: dict[str, list[RunResult]]) -> None:
    title = f"llmq recovery: medians of {args.runs} runs, reconciler at production defaults"
    table = Table("fault, measured from", "until", "median", "range", "runs passed", title=title)
    labels = {
        "redis": f"Redis away {args.outage:.0f} s with {args.jobs} jobs in flight, from its return",
        "kill": "1 of 2 workers SIGKILLed holding running jobs, from the kill",
    }
    for name, results in runs.items():
        if not results:
            continue
        for metric in results[0].times:
            values = [r.times[metric] for r in results if metric in r.times]
            table.add_row(
                labels[name],
                metric,
                f"{statistics.median(values):.1f} s",
                f"{min(values):.1f}–{max(values):.1f} s",
                f"{sum(not r.failures for r in results)} of {len(results)}",
            )
    console.print(table)


if __name__ == "__main__":
    main()
