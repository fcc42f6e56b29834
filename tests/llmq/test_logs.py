"""Log lines stay whole when threads write structlog and standard-library lines at once."""

import json
import subprocess
import sys

# Run apart from pytest, whose own handlers would take the standard-library lines.
WRITERS = """
import logging, threading
import structlog
from llmq.logs import configure_logging

configure_logging("INFO", json=True)

def ours(n):
    log = structlog.get_logger()
    for i in range(400):
        log.info("job finished", writer=n, i=i)

def theirs(n):
    log = logging.getLogger("celery.app.trace")
    for i in range(400):
        log.info("Task succeeded %s %s", n, i)

threads = [threading.Thread(target=f, args=(n,)) for n in range(4) for f in (ours, theirs)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
"""


def test_lines_from_many_threads_are_each_one_json_document():
    done = subprocess.run(
        [sys.executable, "-c", WRITERS], capture_output=True, text=True, timeout=60, check=True
    )
    lines = done.stderr.splitlines()
    assert len(lines) == 2 * 4 * 400
    events = [json.loads(line)["event"] for line in lines]  # raises on a torn line
    assert events.count("job finished") == 4 * 400
