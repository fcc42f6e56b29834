"""The `llmq` command line: run a worker, prepare models."""

import os

import typer
from rich.console import Console
from rich.table import Table

from llmq.batch_cli import batch_app
from llmq.evals.cli import eval_command
from llmq.keys_cli import keys_app
from llmq.registry import get_registry
from llmq.settings import get_settings
from workers.threads import apply_thread_defaults

app = typer.Typer(help="llmq: a queue-backed job system for LLM inference.", no_args_is_help=True)
models_app = typer.Typer(help="The models in models.yaml.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(batch_app, name="batch")
app.add_typer(keys_app, name="keys")
app.command("eval")(eval_command)
console = Console()


@app.command()
def worker(
    model: str = typer.Option(None, help="Model id from models.yaml (default: LLMQ_WORKER_MODEL)"),
    device: str = typer.Option("auto", help="auto, cpu, cuda or mps"),
    concurrency: int = typer.Option(0, help="Jobs held at once (default: from max_batch_size)"),
    loglevel: str = typer.Option("INFO"),
    metrics_port: int = typer.Option(
        None, help="Port of its Prometheus /metrics; 0: none (default: LLMQ_WORKER_METRICS_PORT)"
    ),
) -> None:
    """Start a Celery worker that holds one model and drains its llmq.<model>.<device> queue."""
    apply_thread_defaults()  # before torch loads
    settings = get_settings()
    model = model or settings.worker_model
    spec = get_registry().get(model)
    if spec is None:
        raise typer.BadParameter(f"unknown model {model!r}; known: {', '.join(get_registry().ids)}")
    if spec.is_remote:  # sends its jobs upstream: no device, no torch
        resolved = "remote"
    else:
        from workers.host import detect_device

        resolved = detect_device(device)
    # The worker process reads its identity from settings, like every other knob.
    os.environ["LLMQ_WORKER_MODEL"] = spec.id
    os.environ["LLMQ_WORKER_DEVICE"] = resolved
    if metrics_port is not None:
        os.environ["LLMQ_WORKER_METRICS_PORT"] = str(metrics_port)
    get_settings.cache_clear()

    from workers.app import app as celery_app

    # Threads share the one loaded model (ModelSpec.worker_threads says how many and why).
    threads = concurrency or spec.worker_threads
    celery_app.worker_main(
        [
            "worker",
            "--pool=threads",
            f"--concurrency={threads}",
            f"--queues={spec.queue(resolved)}",
            f"--hostname={spec.id}.{resolved}.{os.getpid()}@%h",
            "--task-events",
            "--without-mingle",
            f"--loglevel={loglevel}",
        ]
    )


@app.command()
def flower(
    port: int = typer.Option(None, help="Port to listen on (default: LLMQ_FLOWER_PORT)"),
    address: str = typer.Option(None, help="Address to listen on (default: LLMQ_API_HOST)"),
) -> None:
    """Start Flower on the workers' broker, behind basic auth (LLMQ_FLOWER_USER/PASSWORD)."""
    settings = get_settings()
    if settings.flower_password is None:
        typer.echo(
            "llmq flower: set LLMQ_FLOWER_PASSWORD; Flower serves only behind basic auth", err=True
        )
        raise typer.Exit(2)
    # Flower reads FLOWER_* variables as options, which keeps the password out of `ps`.
    password = settings.flower_password.get_secret_value()
    os.environ["FLOWER_BASIC_AUTH"] = f"{settings.flower_user}:{password}"
    from workers.app import app as celery_app

    celery_app.start(
        [
            "flower",
            f"--port={port or settings.flower_port}",
            f"--address={address or settings.api_host}",
        ]
    )


@models_app.command("prepare")
def prepare_models() -> None:
    """Write built-in models (tiny-llama) to the data directory if they are not there yet."""
    from llmq.tiny_model import ensure_tiny_model

    settings = get_settings()
    for spec in get_registry().models:
        local = spec.local_path(settings.data_dir)
        if spec.is_builtin and local is not None:
            ensure_tiny_model(local)
            console.print(f"{spec.id}: ready at {local}")


@models_app.command("list")
def list_models() -> None:
    """Show the configured models and their queues."""
    table = Table("id", "source", "queues", "context", "max batch")
    for spec in get_registry().models:
        queues = ", ".join(spec.queue(d) for d in spec.devices)
        table.add_row(
            spec.id, spec.source, queues, str(spec.context_length), str(spec.max_batch_size)
        )
    console.print(table)


if __name__ == "__main__":
    app()
