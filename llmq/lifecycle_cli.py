"""`llmq workers` and `llmq models load|unload|reload`: the model lifecycle of running workers,
through the API's admin endpoints (an admin key in LLMQ_API_KEY)."""

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from llmq.api_client import DEFAULT_URL, ApiKey, BaseUrl, api_client, checked

console = Console()
Wait = Annotated[float, typer.Option(help="Seconds to wait for it to finish (0: do not wait)")]


def list_workers(base_url: BaseUrl = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """The live workers: device, the models each serves and has loaded, memory, jobs running."""
    with api_client(base_url, api_key) as http:
        workers = checked(http.get("/v1/admin/workers"))["data"]
    table = Table("worker", "device", "loaded / max", "models (state, running)", "memory", "uptime")
    for worker in workers:
        models = ", ".join(f"{m['model']} ({m['state']}, {m['running']})" for m in worker["models"])
        table.add_row(
            worker["name"],
            worker["device"],
            f"{len(worker['models_loaded'])} / {worker['max_loaded_models']}",
            models,
            f"{worker['memory_bytes'] / 2**20:.1f} MiB",
            f"{worker['uptime_s']:.0f} s",
        )
    console.print(table)


def load_model(
    model: str,
    worker: Annotated[str, typer.Option(help="The worker's name (llmq workers lists them)")],
    wait: Wait = 60,
    base_url: BaseUrl = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Load MODEL on a worker that serves it (its least recently used model makes room)."""
    path = f"/v1/admin/workers/{worker}/models/{model}/load"
    _report(_post(base_url, api_key, path, {"wait": wait}, wait))


def unload_model(
    model: str,
    worker: Annotated[str, typer.Option(help="The worker's name (llmq workers lists them)")],
    force: Annotated[
        bool, typer.Option(help="Hand its running jobs back to the queue instead of waiting")
    ] = False,
    wait: Wait = 60,
    base_url: BaseUrl = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Unload MODEL from a worker once its running jobs end (--force: at once, its jobs
    handed back to the queue)."""
    path = f"/v1/admin/workers/{worker}/models/{model}/unload"
    _report(_post(base_url, api_key, path, {"wait": wait, "force": force}, wait))


def reload_model(
    model: str,
    wait: Wait = 120,
    base_url: BaseUrl = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Load MODEL's entry as models.yaml has it now on every worker serving it (new weights:
    a new revision or new files), each once its running jobs end; queued jobs wait."""
    answer = _post(base_url, api_key, f"/v1/admin/models/{model}/reload", {"wait": wait}, wait)
    for outcome in answer["workers"] or []:
        _report(outcome)
    if not answer["workers"]:
        console.print(f"no live worker serves {model}; workers load the new entry when they start")


def _post(base_url: str, api_key: str | None, path: str, params: dict, wait: float) -> dict:
    with api_client(base_url, api_key, timeout=wait + 30) as http:
        return checked(http.post(path, params=params))


def _report(outcome: dict) -> None:
    where = f"{outcome['model']} on {outcome['worker']}"
    if outcome["error"]:
        console.print(f"[red]{outcome['action']} of {where} failed: {outcome['error']}[/red]")
        raise typer.Exit(1)
    if not outcome["done"]:
        console.print(f"{outcome['action']} of {where} still under way ({outcome['state']})")
        return
    console.print(f"{outcome['action']} of {where}: done ({outcome['state']})")
