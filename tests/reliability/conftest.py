"""Fixtures of the fault-injection tests."""

import os
import signal
import subprocess

import pytest

from tests.factories import start_worker, stop_worker, wait_for_queue
from tests.faults import MODEL, QUEUE


@pytest.fixture
def fault_workers(database_url, redis_url, tiny_model_path):
    """Starts workers of tiny-faults on demand and makes sure none outlives the test."""
    started: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        process = start_worker(MODEL)
        started.append(process)
        wait_for_queue(QUEUE, process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)
            stop_worker(process)
