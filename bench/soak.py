"""Soak: many jobs from many clients while faults strike, then proof that every accepted job
succeeded exactly once and that no request answered with an error left a job behind.

    python -m bench.soak [--faults mixed|kill-every] [--jobs 10000] [--clients 64] [--workers 2]

`--faults mixed` (the default) strikes three faults in turn while the clients submit, each once
the previous one is recovered from (the killed worker's jobs have succeeded elsewhere; every lost
message is in the broker again) and `--fault-gap` seconds have passed:
1. the worker holding the most running jobs is SIGKILLed, and a replacement started;
2. Redis is killed and started again empty (it keeps no data): every queued message is lost;
3. Postgres is stopped (a fast shutdown: open transactions roll back, connections close) for
   `--postgres-outage` seconds (20), then started again.
Each fault's recovery is measured as `bench.recovery` measures it, with the reconciler at its
production defaults. With fewer jobs, the later faults may strike after the last submit; the
table says so ("while submitting").

`--faults kill-every` is the older soak: a random worker SIGKILLed every `--kill-every` seconds
(a replacement started each time) and Redis restarted once, with the reconciler tightened (1 s
sweeps, 5 s requeue and worker-loss thresholds, 20 attempts a job).

The soak runs its own redis-server and its own Postgres server (the `pgserver` package's
binaries, on a port of its own), so stopping them disturbs nothing else, and a built-in tiny
model.

Each request names itself: its `Idempotency-Key` is `soak-<client>-<job>-<generation>` and its
prompt `soak <client>-<job>-<generation>`, so that every job row leads back to the requests that
could have created it. A client sends job <job> until it is accepted (202, or 200: the key's
job, stored by an earlier try):
- after an error answer (503, 5xx), the API promises that nothing was stored: the client waits
  Retry-After and tries again under the next generation, a new key;
- after a try that got no answer (a timeout, a broken connection), the job may or may not have
  been stored: the client tries again with the same key until it gets an answer, so that a job
  stored by the lost try is returned (200), not stored twice (the documented retry contract).
  A later error answer for that key does not prove the lost try stored nothing, so the key is
  kept until it is accepted.
At the end, the job rows must be exactly the accepted ones (a row under a key that was only
ever answered with errors is a job left behind by an error answer), and every accepted job must
have succeeded with one result row and one usage row.
"""

import argparse
import asyncio
import random
import shutil
import statistics
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table
from sqlalchemy import create_engine, text

from bench.recovery import JobProbe, time_each_success, tolerant
from bench.servers import PrivatePostgres, PrivateRedis, free_port, wait_for
from bench.stack import llmq_stack, stack_env, start_worker

console = Console(width=120)
MODEL = {
    "id": "soak",
    "source": "builtin:tiny-llama",
    "devices": ["cpu"],
    "max_batch_size": 32,
    "context_length": 128,
}
QUEUE = "llmq.soak.cpu"
DATABASE = "llmq_soak"
# Workers serve no metrics here: several on one host would want the same port.
COMMON_SETTINGS = {"LLMQ_WORKER_METRICS_PORT": "0"}
# kill-every: the delivery guarantees tightened, so that its many kills are repaired in seconds.
TIGHT_SETTINGS = {
    "LLMQ_RECONCILE_INTERVAL_S": "1",
    "LLMQ_REQUEUE_AFTER_S": "5",
    "LLMQ_WORKER_LOST_AFTER_S": "5",
    # A job may meet several killed workers here; the soak checks exactly-once, not the cap.
    "LLMQ_MAX_JOB_ATTEMPTS": "20",
}
ACCEPTED = (200, 202)


@dataclass
class Requests:
    """Every try of every request, by idempotency key."""

    tries: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    accepted: dict[str, str] = field(default_factory=dict)  # key -> job id
    answers: Counter = field(default_factory=Counter)  # HTTP status -> count
    errors: Counter = field(default_factory=Counter)  # no answer: exception name -> count
    accepted_at: list[float] = field(default_factory=list)  # monotonic
    refused: dict[str, int] = field(default_factory=dict)  # key -> unexpected 4xx status


async def client(base: str, number: int, jobs: int, requests: Requests) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        for job in range(jobs):
            generation, answer_lost = 0, False
            while True:
                name = f"{number}-{job}-{generation}"
                key = f"soak-{name}"
                body = {"model": MODEL["id"], "prompt": f"soak {name}", "max_tokens": 8}
                body |= {"ignore_eos": True, "cache": False}
                try:
                    response = await http.post(
                        "/v1/jobs", json=body, headers={"Idempotency-Key": key}
                    )
                except httpx.HTTPError as exc:
                    requests.errors[type(exc).__name__] += 1
                    requests.tries[key].append(type(exc).__name__)
                    answer_lost = True
                    await asyncio.sleep(0.5)
                    continue
                status = response.status_code
                requests.answers[status] += 1
                requests.tries[key].append(str(status))
                if status in ACCEPTED:
                    requests.accepted[key] = response.json()["id"]
                    requests.accepted_at.append(time.monotonic())
                    break
                if status < 500 and status != 429:
                    requests.refused[key] = status
                    break
                if not answer_lost:
                    generation += 1
                await asyncio.sleep(float(response.headers.get("Retry-After", "1")))


async def submit_all(base: str, total: int, clients: int, requests: Requests) -> None:
    shares = [total // clients + (i < total % clients) for i in range(clients)]
    await asyncio.gather(*(client(base, i, n, requests) for i, n in enumerate(shares)))


@dataclass
class Fault:
    name: str
    struck_at_s: float  # since the first submit
    while_submitting: bool
    times: dict[str, float] = field(default_factory=dict)
    facts: dict[str, object] = field(default_factory=dict)


@dataclass
class Chaos:
    """What the fault thread works on, and what it records."""

    base: str
    workers: list
    env: dict
    workdir: Path
    redis: PrivateRedis
    postgres: PrivatePostgres
    probe: JobProbe
    requests: Requests
    started: float
    submitted: threading.Event
    stop: threading.Event
    timeout_s: float
    log: Counter = field(default_factory=Counter)
    faults: list[Fault] = field(default_factory=list)
    watchers: list[threading.Thread] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def watch(self, fault: Fault, metric: str, ids: set[str], since: float) -> None:
        """Time until every one of `ids` has succeeded, on a thread of its own: a backlog
        draining behind a fault does not hold the next fault back."""
        unfinished = tolerant(lambda: self.probe.unfinished(ids), ids)

        def run() -> None:
            try:
                wait_for(lambda: not unfinished(), self.timeout_s, every_s=0.5)
                fault.times[metric] = time.monotonic() - since
            except TimeoutError:
                self.errors.append(f"{fault.name}: not {metric} within {self.timeout_s:.0f} s")

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.watchers.append(thread)

    def fault(self, name: str) -> Fault:
        fault = Fault(name, time.monotonic() - self.started, not self.submitted.is_set())
        self.faults.append(fault)
        return fault

    def kill_and_replace(self, index: int) -> int:
        victim = self.workers[index]
        victim.kill()
        victim.wait()
        self.workers[index] = start_worker(MODEL["id"], self.env, self.workdir)
        self.log["workers killed"] += 1
        return victim.pid


class Progress:
    """Prints how many are left every few seconds while a fault is recovered from."""

    def __init__(self, what: str, every_s: float = 5.0) -> None:
        self.what, self.every_s = what, every_s
        self.started = self.printed = time.monotonic()

    def __call__(self, left: set) -> set:
        if left and time.monotonic() - self.printed >= self.every_s:
            self.printed = time.monotonic()
            console.print(f"  {time.monotonic() - self.started:.0f} s: {len(left)} {self.what}")
        return left


def mixed_faults(chaos: Chaos, first_after_s: float, gap_s: float, outage_s: float) -> None:
    """Worker SIGKILL, then Redis restarted empty, then Postgres stopped for `outage_s`."""
    try:
        if chaos.stop.wait(first_after_s):
            return
        _worker_kill(chaos)
        if chaos.stop.wait(gap_s):
            return
        _redis_restart(chaos)
        if chaos.stop.wait(gap_s):
            return
        _postgres_outage(chaos, outage_s)
    except Exception as exc:  # reported with the figures; the soak then fails
        chaos.errors.append(f"{type(exc).__name__}: {exc}")


def _worker_kill(chaos: Chaos) -> None:
    probe = chaos.probe
    wait_for(lambda: any(probe.running_on(w.pid) for w in chaos.workers), chaos.timeout_s)
    held_by = [len(probe.running_on(w.pid)) for w in chaos.workers]
    index = held_by.index(max(held_by))
    fault = chaos.fault("worker SIGKILLed (a replacement started)")
    killed = time.monotonic()
    pid = chaos.kill_and_replace(index)
    held = probe.running_on(pid)
    fault.facts["its running jobs"] = len(held)
    wait_for(lambda: not held & probe.running_on(pid), chaos.timeout_s, every_s=0.1)
    fault.times["its jobs released"] = time.monotonic() - killed
    each = time_each_success(probe, held, killed, chaos.timeout_s)
    fault.times["half of its jobs succeeded elsewhere"] = statistics.median(each)
    fault.times["all its jobs succeeded elsewhere"] = max(each)


def _redis_restart(chaos: Chaos) -> None:
    probe = chaos.probe
    fault = chaos.fault("Redis restarted empty")
    chaos.redis.restart()
    returned = time.monotonic()
    chaos.log["redis restarts"] += 1
    lost = probe.ids("status = 'queued'")
    open_jobs = lost | probe.ids("status = 'running'")
    fault.facts["queued jobs whose message was lost"] = len(lost)
    fault.facts["jobs open at the restart"] = len(open_jobs)
    missing = tolerant(lambda: probe.missing_from_broker(lost, {QUEUE}), lost)
    progress = Progress("lost messages not sent again yet")
    chaos.watch(fault, "every job open at the restart succeeded", open_jobs, returned)
    fault.times["every lost message sent again"] = wait_for(
        lambda: not progress(missing()), chaos.timeout_s, every_s=0.25
    )


def _postgres_outage(chaos: Chaos, outage_s: float) -> None:
    probe = chaos.probe
    open_jobs = probe.ids("status IN ('queued', 'running')")
    fault = chaos.fault(f"Postgres stopped for {outage_s:.0f} s")
    answers_before = Counter(chaos.requests.answers)
    chaos.postgres.stop()
    time.sleep(outage_s)
    chaos.postgres.start()
    returned = time.monotonic()
    chaos.log["postgres restarts"] += 1
    fault.facts["jobs open at the stop"] = len(open_jobs)
    fault.facts["answers during the outage"] = dict(chaos.requests.answers - answers_before)
    chaos.watch(fault, "every job open at the stop succeeded", open_jobs, returned)
    fault.times["/readyz answers 200"] = wait_for(
        lambda: _ready(chaos.base), chaos.timeout_s, every_s=0.1
    )
    # The clients wait Retry-After (5 s) after each 503: this includes that wait.
    wait_for(
        lambda: chaos.requests.accepted_at[-1] > returned or chaos.submitted.is_set(),
        chaos.timeout_s,
        every_s=0.05,
    )
    if chaos.requests.accepted_at[-1] > returned:
        accepted = min(t for t in chaos.requests.accepted_at[-1000:] if t > returned)
        fault.times["a client's job accepted again"] = accepted - returned


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def kill_every(chaos: Chaos, every_s: float, restart_at_s: float) -> None:
    """Kill a random worker every `every_s` and start a replacement; restart Redis once."""
    restarted = False
    while not chaos.stop.wait(every_s / 2):
        if not restarted and time.monotonic() - chaos.started > restart_at_s:
            chaos.redis.restart()
            restarted = True
            chaos.log["redis restarts"] += 1
        if chaos.stop.wait(every_s / 2):
            return
        chaos.kill_and_replace(random.randrange(len(chaos.workers)))


def verify(database_url: str, requests: Requests) -> tuple[dict[str, int], list[str]]:
    """The counts, and the failures (with the tries behind each) to report."""
    engine = create_engine(database_url)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT id, idempotency_key, status, attempts FROM jobs")).all()
        results = Counter(
            dict(conn.execute(text("SELECT job_id, count(*) FROM job_results GROUP BY 1")).all())
        )
        usage = Counter(
            dict(conn.execute(text("SELECT job_id, count(*) FROM usage GROUP BY 1")).all())
        )
    engine.dispose()
    accepted = requests.accepted
    stored = {row.idempotency_key: str(row.id) for row in rows}
    status = {str(row.id): row.status for row in rows}
    accepted_ids = set(accepted.values())
    left_behind = [key for key in stored if key not in accepted]
    swapped = [key for key, job in accepted.items() if stored.get(key) not in (None, job)]
    lost = accepted_ids - set(stored.values())
    once = {str(job) for job, n in results.items() if n == 1}
    billed_once = {str(job) for job, n in usage.items() if n == 1}
    retried = [k for k, t in requests.tries.items() if any(not x.isdigit() for x in t)]
    counts = {
        "jobs accepted (202 or 200)": len(accepted),
        "distinct job ids accepted": len(accepted_ids),
        "job rows in Postgres": len(rows),
        **{f"job rows {s}": n for s, n in sorted(Counter(status.values()).items())},
        "accepted jobs succeeded": sum(status.get(j) == "succeeded" for j in accepted_ids),
        "accepted jobs with exactly one result row": len(accepted_ids & once),
        "accepted jobs with exactly one usage row": len(accepted_ids & billed_once),
        "result rows": sum(results.values()),
        "usage rows": sum(usage.values()),
        "jobs run more than once (redelivered)": sum(row.attempts > 1 for row in rows),
        "most attempts of one job": max((row.attempts for row in rows), default=0),
        "keys whose try got no answer, retried under the same key": len(retried),
        "  of which the job came back 200 (stored by the lost try)": sum(
            "200" in requests.tries[key] for key in retried
        ),
        "job rows left by requests answered with errors only": len(left_behind),
        "accepted keys whose row holds another job": len(swapped),
        "accepted jobs missing from Postgres": len(lost),
        "requests refused with a 4xx": len(requests.refused),
    }
    failures = [
        f"job {stored[key]} left behind under {key}; its tries: {requests.tries.get(key)}"
        for key in left_behind[:20]
    ]
    failures += [f"{key}: accepted {accepted[key]}, stored {stored[key]}" for key in swapped[:20]]
    failures += [f"accepted job {job} is not in Postgres" for job in sorted(lost)[:20]]
    failures += [f"{key} refused {code}" for key, code in list(requests.refused.items())[:20]]
    return counts, failures


def wait_until_settled(probe: JobProbe, timeout_s: float, every_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        open_jobs = len(probe.ids("status IN ('queued', 'running')"))
        if open_jobs == 0:
            return
        console.print(f"  {open_jobs} jobs still queued or running")
        time.sleep(every_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faults", choices=["mixed", "kill-every"], default="mixed")
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--first-fault-after", type=float, default=10.0, help="mixed: seconds")
    parser.add_argument("--fault-gap", type=float, default=5.0, help="mixed: seconds")
    parser.add_argument("--postgres-outage", type=float, default=20.0, help="mixed: seconds")
    parser.add_argument("--fault-timeout", type=float, default=600.0, help="mixed: seconds")
    parser.add_argument("--kill-every", type=float, default=5.0, help="kill-every: seconds")
    parser.add_argument("--redis-restart-after", type=float, default=20.0, help="kill-every")
    parser.add_argument("--chaos-for", type=float, default=90.0, help="kill-every: seconds")
    parser.add_argument("--settle-timeout", type=float, default=900.0)
    parser.add_argument("--port", type=int, default=8771, help="the API's port")
    parser.add_argument("--keep", action="store_true", help="keep the logs and data on success")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="llmq-soak-"))
    redis = PrivateRedis(free_port(), workdir)
    postgres = PrivatePostgres(free_port(), workdir)
    postgres.init()
    postgres.start()
    redis.start()
    database_url = postgres.url(DATABASE)
    settings = COMMON_SETTINGS | (TIGHT_SETTINGS if args.faults == "kill-every" else {})
    env = stack_env(workdir, [MODEL], database_url, redis.url) | settings
    requests = Requests()
    failures: list[str] = []
    try:
        with llmq_stack(
            [MODEL],
            workdir,
            [MODEL["id"]] * args.workers,
            port=args.port,
            redis_url=redis.url,
            database_url=database_url,
            api_log=workdir / "api.log",
            **settings,
        ) as (base, processes):
            probe = JobProbe(database_url, redis.url)
            chaos = Chaos(
                base=base,
                workers=processes[1:],
                env=env,
                workdir=workdir,
                redis=redis,
                postgres=postgres,
                probe=probe,
                requests=requests,
                started=time.monotonic(),
                submitted=threading.Event(),
                stop=threading.Event(),
                timeout_s=args.fault_timeout,
            )
            if args.faults == "mixed":
                target, fault_args = (
                    mixed_faults,
                    (
                        args.first_fault_after,
                        args.fault_gap,
                        args.postgres_outage,
                    ),
                )
            else:
                target, fault_args = kill_every, (args.kill_every, args.redis_restart_after)
            thread = threading.Thread(target=target, args=(chaos, *fault_args), daemon=True)
            thread.start()
            asyncio.run(submit_all(base, args.jobs, args.clients, requests))
            chaos.submitted.set()
            submitted_s = time.monotonic() - chaos.started
            console.print(f"submitted {len(requests.accepted)} jobs in {submitted_s:.0f} s")
            if args.faults == "kill-every":
                thread.join(max(0.0, args.chaos_for - submitted_s))
                chaos.stop.set()
            thread.join()
            for watcher in chaos.watchers:
                watcher.join()
            wait_until_settled(probe, args.settle_timeout)
            elapsed = time.monotonic() - chaos.started
            processes[1:] = chaos.workers  # the stack stops the replacements too
            died = [w.pid for w in chaos.workers if w.poll() is not None]
            counts, failures = verify(database_url, requests)
            counts |= {f"Postgres log: ERROR {m}": n for m, n in postgres.log_errors().items()}
            probe.close()
    finally:
        redis.stop()
        if postgres.running():
            postgres.stop()

    failures += [f"a fault did not recover: {error}" for error in chaos.errors]
    if died:
        failures.append(f"workers not killed by the soak exited: pids {died}")
    print_figures(args, counts, chaos, requests, submitted_s, elapsed)
    ok = (
        not failures
        and counts["jobs accepted (202 or 200)"] == args.jobs
        and counts["job rows in Postgres"] == args.jobs
        and counts["accepted jobs succeeded"] == args.jobs
        and counts["accepted jobs with exactly one result row"] == args.jobs
        and counts["accepted jobs with exactly one usage row"] == args.jobs
        and counts["result rows"] == counts["usage rows"] == args.jobs
        and set(requests.answers) <= {*ACCEPTED, 503}
    )
    for failure in failures:
        console.print(f"[red]FAILED[/red] {failure}")
    if ok:
        console.print("[green]PASS[/green]")
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    else:
        console.print(f"[red]FAIL[/red]: logs and the Postgres data are kept in {workdir}")
    raise SystemExit(0 if ok else 1)


def print_figures(args, counts, chaos: Chaos, requests: Requests, submitted_s, elapsed) -> None:
    title = f"llmq soak ({args.faults}): {args.jobs} jobs, {args.clients} clients"
    table = Table("soak", "count", title=title)
    for name, value in {**counts, **chaos.log}.items():
        table.add_row(name, str(value))
    for status, count in sorted(requests.answers.items()):
        table.add_row(f"API answers {status}", str(count))
    for name, count in sorted(requests.errors.items()):
        table.add_row(f"tries without an answer: {name}", str(count))
    table.add_row("submitting (s)", f"{submitted_s:.0f}")
    table.add_row("wall time (s)", f"{elapsed:.0f}")
    table.add_row("jobs accepted per second", f"{len(requests.accepted) / submitted_s:.0f}")
    console.print(table)
    if not chaos.faults:
        return
    faults = Table("fault", "struck at", "while submitting", "recovery", "seconds", "facts")
    for fault in chaos.faults:
        facts = "; ".join(f"{k}: {v}" for k, v in fault.facts.items())
        for i, (metric, seconds) in enumerate(fault.times.items() or [("not measured", 0.0)]):
            faults.add_row(
                fault.name if i == 0 else "",
                f"{fault.struck_at_s:.0f} s" if i == 0 else "",
                ("yes" if fault.while_submitting else "NO") if i == 0 else "",
                metric,
                f"{seconds:.1f}",
                facts if i == 0 else "",
            )
    console.print(faults)


if __name__ == "__main__":
    main()
