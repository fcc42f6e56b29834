"""Per-job fixed cost of llmq's job path: one-token jobs end to end, beside a trivial Celery task
through the same Redis and the seed-style server (one generate per request), in one run.

    python -m bench.jobpath [--repeats 3] [--clients 64] [--jobs 1000] [--only jobs,seed] [--quick]

Systems, each given --jobs one-token jobs with distinct prompts (LLMQ_CACHE=off):
  jobs         POST /v1/jobs?wait=60: one request that ends with the job (--jobs-wait poll:
               POST /v1/jobs, then GET /v1/jobs/{id}?wait=60; --jobs-wait events: then
               GET /v1/jobs/{id}/events, the SSE stream)
  completions  POST /v1/completions, max_tokens 1: answered when its job is done
  batch        one Batch API batch of --jobs lines, timed from its creation to `completed`
  score        an MMLU run of --jobs 0-shot questions written here (no ../shared data), one
               scoring job each (four continuations), timed from its creation to `succeeded`
  celery       reference: a Celery task that returns its argument, on the stack's Redis (broker
               and result backend), a worker of --clients threads, callers that send and wait
  seed         reference: bench/baseline_server.py, POST /generate with max_tokens 1

HTTP clients each hold one keep-alive connection of a hand-written HTTP/1.1 client. Columns:
jobs/s over the measured window; p50/p99 ms where a client waits for each job; "÷ celery" and
"÷ seed", the ratio to that reference; CPU ms per job from /proc: api (llmq's API or the seed
server), worker (llmq's or Celery's), postgres (the postmaster, its auxiliary processes and the
benchmark database's backends), redis (redis-server), client (this process); PG commits and
PG sessions (pg_stat_database.xact_commit and sessions of the benchmark's database: Postgres
connections opened) and Redis cmds (INFO total_commands_processed) per job. Each figure is the
median over the repeats.

Approximations: a Postgres backend that exits during a window counts whatever database it
served (the postmaster's reaped children), and one that starts and still runs at the end counts
only if it serves the benchmark's database; a backend reports its commits at most once a
second, so a window read 1.2 s after it ends may miss about its last second and get the one
before it instead; the Redis figures are the whole server's, other users' commands included.
"""

import argparse
import asyncio
import csv
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import httpx
import psutil
import psycopg
from celery import Celery
from redis import Redis
from rich.console import Console
from rich.table import Table
from sqlalchemy.engine import make_url

from bench.models import benchmark_models
from bench.raw_http import Connection
from bench.run import fmt, percentile
from bench.servers import free_port, wait_for
from bench.stack import ROOT, baseline_server, bench_urls, llmq_stack
from llmq.evals.datasets import MMLU_HEADER
from llmq.tiny_model import ensure_tiny_model

console = Console(width=180)
DATABASE = "llmq_bench_jobpath"
REDIS_DB = 12  # tests use 15, the other benchmarks 13
ECHO_TASK, ECHO_QUEUE = "bench.echo", "bench.jobpath.echo"
SUBJECT = "abstract_algebra"
SETTLE_S = 1.2  # a Postgres backend reports its statistics at most once a second
STACK_SYSTEMS = ("jobs", "completions", "batch", "score")
SYSTEMS = (*STACK_SYSTEMS, "celery", "seed")
GROUPS = ("api", "worker", "postgres", "redis", "client")
CLIENT_BACKEND = re.compile(r"\d+\.\d+\.\d+\.\d+\(\d+\)|\[local\]")

Timed = Callable[[], list[float]]  # runs a window's jobs, gives each waited-for job's latency
Prepare = Callable[[range], Timed]  # uploads or writes what the window needs, untimed
Seconds = Callable[[], dict[int, float]]  # a process group's CPU seconds so far, by pid
OneJob = Callable[["Connection", int], Awaitable[None]]


@dataclass(frozen=True)
class Run:
    """One measured window."""

    jobs: int
    wall_s: float
    latencies: list[float]
    cpu_ms: dict[str, float]  # by process group
    counted: "Counters"  # during the window

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.wall_s


def expect(ok: bool, answer: object) -> None:
    if not ok:
        raise RuntimeError(f"unexpected answer: {str(answer)[:400]}")


def one_token(model: str | None, number: int) -> dict:
    body = {"prompt": f"story {number} about a cat", "max_tokens": 1, "ignore_eos": True}
    return body | ({"model": model, "temperature": 0} if model else {})


def post_one(path: str, model: str | None, wait: str | None = None) -> OneJob:
    """POST one job; with `wait`, wait for it: "submit" in the POST itself (?wait=60), "poll"
    with one long-polling GET after it, "events" on its event stream after it."""
    suffix = {"poll": "?wait=60", "events": "/events"}.get(wait or "")
    post_path = f"{path}?wait=60" if wait == "submit" else path

    async def one(connection: Connection, number: int) -> None:
        body = json.dumps(one_token(model, number)).encode()
        status, answer = await connection.request("POST", post_path, body)
        expect(status == (202 if wait else 200), answer)
        if wait == "submit":
            expect(b'"status":"succeeded"' in answer, answer)
        elif wait:
            job_id = json.loads(answer)["id"]
            status, answer = await connection.request("GET", f"{path}/{job_id}{suffix}")
            expect(status == 200 and b'"status":"succeeded"' in answer, answer)

    return one


def http_clients(base: str, clients: int, one_job: OneJob) -> Prepare:
    """Each client, on its own connection, takes the next job number until none is left."""

    async def run(numbers: range) -> list[float]:
        pending, latencies = iter(numbers), []

        async def client() -> None:
            connection = await Connection.open(base)
            try:
                for number in pending:
                    started = time.perf_counter()
                    await one_job(connection, number)
                    latencies.append(time.perf_counter() - started)
            finally:
                connection.close()

        await asyncio.gather(*(client() for _ in range(clients)))
        return latencies

    return lambda numbers: lambda: asyncio.run(run(numbers))


def create_and_wait(base: str, path: str, body: dict, final: set[str]) -> dict:
    """POST `body` to `path`, then read what it made until its status is one of `final`."""
    with httpx.Client(base_url=base) as http:  # one client: a new one builds an SSL context
        created = http.post(path, json=body)
        expect(created.status_code in (200, 202), created.text)
        state, url = created.json(), f"{path}/{created.json()['id']}"
        wait_for(lambda: state.update(http.get(url).json()) or state["status"] in final, 900, 0.1)
    return state


def batch(base: str, model: str) -> Prepare:
    def prepare(numbers: range) -> Timed:
        lines = [
            {"custom_id": str(n), "method": "POST", "url": "/v1/completions"}
            | {"body": one_token(model, n)}
            for n in numbers
        ]
        content = "\n".join(json.dumps(line) for line in lines).encode()
        upload = httpx.post(
            f"{base}/v1/files", files={"file": ("lines.jsonl", content)}, data={"purpose": "batch"}
        ).json()
        body = {"input_file_id": upload["id"], "endpoint": "/v1/completions"}

        def run() -> list[float]:
            done = create_and_wait(base, "/v1/batches", body, {"completed", "failed"})
            expect(done["request_counts"]["completed"] == len(numbers), done)
            return []

        return run

    return prepare


def evaluation(base: str, model: str, data_dir: Path) -> Prepare:
    def prepare(numbers: range) -> Timed:
        # Questions made up here, so the benchmark needs no ../shared data; a new folder per
        # window, or the run would reuse the last one's results.
        folder = data_dir / f"mmlu-{numbers.start}"
        rows = [[f"What is {n} plus one?", n + 1, n, n + 2, n - 1, 0] for n in numbers]
        for split, part in (("dev", rows[:5]), ("test", rows)):
            (folder / split).mkdir(parents=True, exist_ok=True)
            with (folder / split / f"{SUBJECT}_{split}.csv").open("w", newline="") as handle:
                csv.writer(handle).writerows([MMLU_HEADER, *part])
        body = {"benchmark": "mmlu", "model": model, "num_fewshot": 0, "subjects": [SUBJECT]}
        body["dataset"] = folder.name

        def run() -> list[float]:
            done = create_and_wait(base, "/v1/evals", body, {"succeeded", "failed"})
            expect(done["progress"]["done"] == len(numbers) and done["status"] == "succeeded", done)
            return []

        return run

    return prepare


def echo_app(redis_url: str) -> Celery:
    """The reference: a task with nothing to do, on the stack's Redis with default settings."""
    app = Celery("bench.jobpath", broker=redis_url, backend=redis_url)

    @app.task(name=ECHO_TASK)
    def echo(number: int) -> int:
        return number

    return app


def call_tasks(app: Celery, callers: int) -> Prepare:
    """`callers` threads, each sending the echo task and waiting for its result, in turn."""

    def run(numbers: range) -> list[float]:
        pending, latencies = iter(numbers), []

        def caller() -> None:
            for number in pending:
                started = time.perf_counter()
                result = app.send_task(ECHO_TASK, args=[number], queue=ECHO_QUEUE)
                expect(result.get(timeout=120) == number, result)
                latencies.append(time.perf_counter() - started)

        with ThreadPoolExecutor(callers) as pool:
            for future in [pool.submit(caller) for _ in range(callers)]:
                future.result()
        return latencies

    return lambda numbers: lambda: run(numbers)


def own_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def reaped_seconds(process: psutil.Process) -> dict[int, float]:
    """The CPU seconds of a process's children that have exited and been reaped, under its
    negated pid."""
    times = process.cpu_times()
    return {-process.pid: times.children_user + times.children_system}


def tree_seconds(root: psutil.Process) -> Seconds:
    """A process, its live descendants, and under its negated pid the children it has reaped."""

    def seconds() -> dict[int, float]:
        found = reaped_seconds(root)
        for process in [root, *root.children(recursive=True)]:
            with suppress(psutil.Error):  # it exited meanwhile
                found[process.pid] = own_seconds(process)
        return found

    return seconds


class Counters(NamedTuple):
    """Server counters: Postgres's for the benchmark's database, Redis's for the whole server."""

    commits: int
    sessions: int  # connections opened (pg_stat_database.sessions)
    redis_commands: int

    def __sub__(self, earlier: "Counters") -> "Counters":
        return Counters(*(now - then for now, then in zip(self, earlier, strict=True)))


class Probes:
    """What a window is measured by: Postgres's and Redis's counters, and the CPU of the servers
    every system shares."""

    def __init__(self, database_url: str, redis_url: str) -> None:
        server = make_url(database_url).set(drivername="postgresql")
        self.database = server.database
        # Read from another database, so reading adds no commits to the benchmark's.
        stats_url = server.set(database="postgres").render_as_string(False)
        self.stats = psycopg.connect(stats_url, autocommit=True)
        backend = self.stats.execute("SELECT pg_backend_pid()").fetchone()[0]
        self.postmaster = psutil.Process(backend).parent()
        self.redis = Redis.from_url(redis_url)
        self.redis_server = psutil.Process(self.redis.info("server")["process_id"])

    def counters(self) -> Counters:
        query = "SELECT xact_commit, sessions FROM pg_stat_database WHERE datname = %s"
        commits, sessions = self.stats.execute(query, (self.database,)).fetchone() or (0, 0)
        commands = self.redis.info("stats")["total_commands_processed"]
        return Counters(commits, sessions, commands)

    def postgres_seconds(self) -> dict[int, float]:
        """The postmaster, its auxiliary processes and this database's backends, not those of
        other databases (tests and other benchmarks share the server); and, under the
        postmaster's negated pid, the backends that have exited (a connection opened and closed
        within the window costs Postgres a backend's start)."""
        postmaster = self.postmaster
        found = {postmaster.pid: own_seconds(postmaster), **reaped_seconds(postmaster)}
        for process in self.postmaster.children():
            with suppress(psutil.Error):
                title = " ".join(process.cmdline())
                if not CLIENT_BACKEND.search(title) or f" {self.database} " in title:
                    found[process.pid] = own_seconds(process)
        return found

    def groups(self) -> dict[str, Seconds]:
        me = psutil.Process()
        return {
            "postgres": self.postgres_seconds,
            "redis": lambda: {self.redis_server.pid: own_seconds(self.redis_server)},
            "client": lambda: {me.pid: own_seconds(me)},
        }


def measure(probes: Probes, groups: dict[str, Seconds], jobs: int, run: Timed) -> Run:
    time.sleep(SETTLE_S)  # what came before reaches pg_stat_database first
    before = probes.counters()
    cpu = {group: seconds() for group, seconds in groups.items()}
    started = time.perf_counter()
    latencies = run()
    wall_s = time.perf_counter() - started
    used = {  # by pid, so that a process that started during the window counts from zero
        group: 1000 * sum(s - cpu[group].get(pid, 0.0) for pid, s in seconds().items())
        for group, seconds in groups.items()
    }
    time.sleep(SETTLE_S)
    return Run(jobs, wall_s, latencies, used, probes.counters() - before)


def warm_and_repeat(system: str, prepare: Prepare, groups, probes: Probes, args) -> list[Run]:
    """A warm-up of one job per client, then --repeats windows, every prompt a new one."""
    first = SYSTEMS.index(system) * 10_000_000
    prepare(range(first, first + args.clients))()
    runs = []
    for repeat in range(args.repeats):
        start = first + args.clients + repeat * args.jobs
        runs.append(measure(probes, groups, args.jobs, prepare(range(start, start + args.jobs))))
        console.print(f"{system} {repeat + 1}/{args.repeats}: {runs[-1].jobs_per_s:,.1f} jobs/s")
    return runs


def bench_stack(args, model: str, model_dir: Path, workdir: Path, redis_url: str, probes, results):
    spec = {"id": model, "source": str(model_dir), "devices": ["cpu"], "context_length": 512}
    data_dir = workdir / "evals"
    stack = llmq_stack(
        [spec | {"max_batch_size": args.clients}],
        workdir,
        [model],
        port=free_port(),
        redis_url=redis_url,
        database=DATABASE,
        LLMQ_CACHE="off",  # every job runs; distinct prompts would miss it anyway
        LLMQ_EVAL_DATA_DIR=str(data_dir),
    )
    with stack as (base, processes):
        api, worker = (psutil.Process(p.pid) for p in processes)
        groups = {"api": tree_seconds(api), "worker": tree_seconds(worker), **probes.groups()}
        prepares = {
            "jobs": http_clients(base, args.clients, post_one("/v1/jobs", model, args.jobs_wait)),
            "completions": http_clients(base, args.clients, post_one("/v1/completions", model)),
            "batch": batch(base, model),
            "score": evaluation(base, model, data_dir),
        }
        for system in (s for s in STACK_SYSTEMS if s in args.only):
            results[system] = warm_and_repeat(system, prepares[system], groups, probes, args)


def bench_celery(args, workdir: Path, redis_url: str, probes, results) -> None:
    log = open(workdir / "celery.log", "ab")  # noqa: SIM115
    command = [sys.executable, "-m", "bench.jobpath", "--serve-celery", redis_url]
    worker = subprocess.Popen(
        [*command, "--clients", str(args.clients)], cwd=ROOT, stdout=log, stderr=log
    )
    try:
        groups = {"worker": tree_seconds(psutil.Process(worker.pid)), **probes.groups()}
        prepare = call_tasks(echo_app(redis_url), args.clients)
        results["celery"] = warm_and_repeat("celery", prepare, groups, probes, args)
    finally:
        worker.terminate()
        worker.wait(30)


def serve_celery(redis_url: str, threads: int) -> None:
    options = [f"--concurrency={threads}", f"--queues={ECHO_QUEUE}", "--loglevel=WARNING"]
    echo_app(redis_url).worker_main(["worker", "--pool=threads", "--without-mingle", *options])


def bench_seed(args, model_dir: Path, probes, results) -> None:
    with baseline_server(model_dir, port=free_port()) as base:
        server = next(
            p for p in psutil.Process().children() if "bench.baseline_server" in p.cmdline()
        )
        groups = {"api": tree_seconds(server), **probes.groups()}
        prepare = http_clients(base, args.clients, post_one("/generate", None))
        results["seed"] = warm_and_repeat("seed", prepare, groups, probes, args)


def median(runs: list[Run], figure: Callable[[Run], float]) -> str:
    return fmt(statistics.median(figure(r) for r in runs))


def ratios(results: dict[str, list[Run]], system: str, figure: Callable[[Run], float]) -> list:
    mine = statistics.median(figure(r) for r in results[system])
    return [
        f"{mine / statistics.median(figure(r) for r in results[ref]):.2f}×"
        if ref in results
        else "–"
        for ref in ("celery", "seed")
    ]


def total_ms(run: Run) -> float:
    return sum(run.cpu_ms.values()) / run.jobs


def report(results: dict[str, list[Run]], args) -> None:
    title = f"{args.clients} clients, {args.jobs} one-token jobs a run, median of {args.repeats}"
    speed = Table("system", "jobs/s", "p50 ms", "p99 ms", "÷ celery", "÷ seed", title=title)
    cost = Table(
        *("system", *GROUPS, "total", "÷ celery", "÷ seed", "PG commits", "PG sessions"),
        "Redis cmds",
        title=f"Per job: CPU ms by process, Postgres commits and sessions opened, Redis commands; "
        f"{title}",
    )
    for system, runs in results.items():
        latency = [
            median(runs, lambda r, q=q: 1000 * percentile(r.latencies, q))
            if runs[0].latencies
            else "–"
            for q in (50, 99)
        ]
        speed_ratios = ratios(results, system, lambda r: r.jobs_per_s)
        speed.add_row(system, median(runs, lambda r: r.jobs_per_s), *latency, *speed_ratios)
        cpu = [
            median(runs, lambda r, g=g: r.cpu_ms[g] / r.jobs) if g in runs[0].cpu_ms else "–"
            for g in GROUPS
        ]
        counts = [
            median(runs, lambda r, c=c: getattr(r.counted, c) / r.jobs) for c in Counters._fields
        ]
        cost.add_row(
            system, *cpu, median(runs, total_ms), *ratios(results, system, total_ms), *counts
        )
    for table in (speed, cost):
        for column in table.columns:
            column.justify = "right"
        console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--jobs", type=int, default=1000, help="jobs in each measured run")
    parser.add_argument("--only", default=",".join(SYSTEMS), help="a comma list of the systems")
    parser.add_argument("--quick", action="store_true", help="one run of 300 jobs each")
    parser.add_argument(
        "--jobs-wait",
        choices=("submit", "poll", "events"),
        default="submit",
        help="how the jobs system waits: in the POST (?wait=60), a long-polling GET after it, "
        "or the SSE stream",
    )
    parser.add_argument("--serve-celery", metavar="REDIS_URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    redis_url = f"{bench_urls(DATABASE)[1].rsplit('/', 1)[0]}/{REDIS_DB}"
    if args.serve_celery:  # the reference's worker, started by bench_celery
        return serve_celery(args.serve_celery, args.clients)
    if args.quick:
        args.repeats, args.jobs = 1, 300
    args.only = args.only.split(",")
    if unknown := set(args.only) - set(SYSTEMS):
        parser.error(f"unknown systems {sorted(unknown)}; known: {', '.join(SYSTEMS)}")
    workdir = Path(tempfile.mkdtemp(prefix="llmq-jobpath-"))
    model, model_dir = next(benchmark_models("stories260K", workdir, console.print), (None, None))
    if model_dir is None:  # ../shared lacks it: the built-in random model has the same job path
        model, model_dir = "tiny-llama", ensure_tiny_model(workdir / "tiny-llama")
    probes = Probes(bench_urls(DATABASE)[0], redis_url)
    results: dict[str, list[Run]] = {}
    started = time.monotonic()
    if set(STACK_SYSTEMS) & set(args.only):
        bench_stack(args, model, model_dir, workdir, redis_url, probes, results)
    if "celery" in args.only:
        bench_celery(args, workdir, redis_url, probes, results)
    if "seed" in args.only:
        bench_seed(args, model_dir, probes, results)
    report({s: results[s] for s in SYSTEMS if s in results}, args)
    console.print(f"took {time.monotonic() - started:.0f} s; logs in {workdir}")


if __name__ == "__main__":
    main()
