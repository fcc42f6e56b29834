"""Storing the results of jobs that finish together (a micro-batch ending at one decode step):
each Celery thread in its own transaction (the baseline) against the worker's result writer,
which commits every result waiting in one transaction.

    python -m bench.results [--jobs 64] [--repeats 7]

Prints the wall time from the moment all threads hold their result until all are stored,
median of the repeats, and the ratio.
"""

import argparse
import statistics
import threading
import time
import uuid

from rich.console import Console
from rich.table import Table

from bench.stack import bench_urls
from db.admin import create_database, migrate
from db.queries import jobs as job_queries
from db.session import session_scope
from llmq.price_book import get_price_book
from workers.result_writer import ResultWriter, store_results

WORKER = "bench-results@host"
OUTCOME = job_queries.Outcome("once upon a time " * 16, "length", 12, 64, 3.0, 900.0)


def running_jobs(database_url: str, count: int) -> list[uuid.UUID]:
    new = job_queries.NewJob(
        kind="generate", model="bench", queue="llmq.bench.cpu", input={"prompt": "x"}, params={}
    )
    with session_scope(database_url) as session:
        jobs = [job_queries.create_job(session, new) for _ in range(count)]
        for job in jobs:
            job.status, job.worker = "running", WORKER
        return [job.id for job in jobs]


def timed(job_ids: list[uuid.UUID], store) -> float:
    """Milliseconds until every thread has stored its job, from a common start."""
    start = threading.Barrier(len(job_ids) + 1)

    def one(job_id: uuid.UUID) -> None:
        start.wait()
        store(job_id)

    threads = [threading.Thread(target=one, args=(job_id,)) for job_id in job_ids]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    return (time.perf_counter() - began) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    database_url = bench_urls()[0]
    create_database(database_url, replace=True)
    migrate(database_url)
    writer = ResultWriter(database_url, WORKER)
    writer.start()
    systems = {
        "each thread, own transaction": lambda job_id: store_results(
            database_url, WORKER, get_price_book().price, None, [(job_id, OUTCOME)]
        ),
        "result writer": lambda job_id: writer.store(job_id, OUTCOME),
    }
    times: dict[str, list[float]] = {name: [] for name in systems}
    try:
        for _ in range(args.repeats):  # alternated, so that both see the same conditions
            for name, store in systems.items():
                times[name].append(timed(running_jobs(database_url, args.jobs), store))
    finally:
        writer.stop()
    table = Table(title=f"{args.jobs} results stored at once, median of {args.repeats}")
    for column in ["path", "ms", "runs (ms)", "÷ baseline"]:
        table.add_column(column, justify="right")
    baseline = statistics.median(times["each thread, own transaction"])
    for name, values in times.items():
        median = statistics.median(values)
        runs = ", ".join(f"{v:.0f}" for v in values)
        table.add_row(name, f"{median:.1f}", runs, f"{baseline / median:.2f}×")
    Console().print(table)


if __name__ == "__main__":
    main()
