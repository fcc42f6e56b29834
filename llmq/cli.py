"""The `llmq` command line: run a worker, prepare models."""

import json
import os
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from llmq.batch_cli import batch_app
from llmq.evals.cli import eval_command
from llmq.keys_cli import keys_app
from llmq.lifecycle_cli import list_workers, load_model, reload_model, unload_model
from llmq.registry import get_registry
from llmq.settings import get_settings
from workers.threads import apply_thread_defaults

app = typer.Typer(help="llmq: a queue-backed job system for LLM inference.", no_args_is_help=True)
models_app = typer.Typer(help="The models in models.yaml.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(batch_app, name="batch")
app.add_typer(keys_app, name="keys")
app.command("eval")(eval_command)
app.command("workers")(list_workers)
models_app.command("load")(load_model)
models_app.command("unload")(unload_model)
models_app.command("reload")(reload_model)
console = Console()


@app.command()
def worker(
    model: Annotated[
        list[str] | None,
        typer.Option(
            help="Model id from models.yaml; repeat for several (default: LLMQ_WORKER_MODEL)"
        ),
    ] = None,
    all_models: bool = typer.Option(
        False, "--all-models", help="Serve every model of models.yaml that runs on the device"
    ),
    max_loaded_models: int = typer.Option(
        0, help="Models loaded at once, the least recently used evicted (default: all)"
    ),
    device: str = typer.Option("auto", help="auto, cpu, cuda or mps"),
    concurrency: int = typer.Option(0, help="Jobs held at once (default: from max_batch_size)"),
    loglevel: str = typer.Option("INFO"),
    metrics_port: int = typer.Option(
        None, help="Port of its Prometheus /metrics; 0: none (default: LLMQ_WORKER_METRICS_PORT)"
    ),
) -> None:
    """Start a Celery worker that serves one model or several, each on its
    llmq.<model>.<device> queue, loading them as their jobs come."""
    apply_thread_defaults()  # before torch loads
    settings = get_settings()
    registry = get_registry()
    if all_models:
        resolved = _local_device(device)
        specs = [s for s in registry.models if not s.is_remote and resolved in s.devices]
    else:
        specs = [_known_model(registry, m) for m in (model or [settings.worker_model])]
        remote = [s for s in specs if s.is_remote]
        if remote and len(specs) > 1:
            raise typer.BadParameter(
                f"{remote[0].id} is a remote model: its worker serves it alone"
            )
        # A remote model's worker sends its jobs upstream: no device, no torch.
        resolved = "remote" if remote else _local_device(device)
    if not specs:
        raise typer.BadParameter(f"no model of {settings.models_file} runs on {resolved}")
    ids = list(dict.fromkeys(spec.id for spec in specs))
    # The worker process reads its identity from settings, like every other knob.
    os.environ["LLMQ_WORKER_MODEL"] = ids[0]
    os.environ["LLMQ_WORKER_MODELS"] = json.dumps(ids)
    os.environ["LLMQ_WORKER_DEVICE"] = resolved
    if max_loaded_models:
        os.environ["LLMQ_WORKER_MAX_LOADED_MODELS"] = str(max_loaded_models)
    if metrics_port is not None:
        os.environ["LLMQ_WORKER_METRICS_PORT"] = str(metrics_port)
    get_settings.cache_clear()

    from workers.app import app as celery_app

    # Threads share the loaded models (ModelSpec.worker_threads says how many and why).
    threads = concurrency or max(spec.worker_threads for spec in specs)
    name = ids[0] if len(ids) == 1 else f"{len(ids)}-models"
    celery_app.worker_main(
        [
            "worker",
            "--pool=threads",
            f"--concurrency={threads}",
            f"--queues={','.join(spec.queue(resolved) for spec in specs)}",
            f"--hostname={name}.{resolved}.{os.getpid()}@%h",
            "--task-events",
            "--without-mingle",
            f"--loglevel={loglevel}",
        ]
    )


def _known_model(registry, model: str):
    spec = registry.get(model)
    if spec is None:
        raise typer.BadParameter(f"unknown model {model!r}; known: {', '.join(registry.ids)}")
    return spec


def _local_device(device: str) -> str:
    from workers.host import detect_device

    return detect_device(device)


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
