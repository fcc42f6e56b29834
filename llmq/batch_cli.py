"""`llmq batch submit requests.jsonl --wait`: upload a file of requests to a running llmq API,
start a batch, follow its progress, and write the output file."""

import time
from pathlib import Path
from typing import Annotated

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from llmq.api_client import DEFAULT_URL, ApiKey, BaseUrl, api_client, checked

batch_app = typer.Typer(help="The OpenAI-style Batch API of a running llmq.", no_args_is_help=True)
console = Console()
ENDED = ("completed", "failed", "expired", "cancelled")


@batch_app.command("submit")
def submit(
    requests: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="A JSONL file of requests")
    ],
    endpoint: Annotated[str, typer.Option(help="The lines' url")] = "/v1/chat/completions",
    wait: Annotated[bool, typer.Option(help="Follow the batch and write its output")] = False,
    output: Annotated[
        Path | None, typer.Option(help="Where to write the output (default: <input>.out.jsonl)")
    ] = None,
    base_url: BaseUrl = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Upload REQUESTS, start a batch, and with --wait follow it and download its results."""
    with api_client(base_url, api_key) as http:
        with requests.open("rb") as handle:
            uploaded = checked(
                http.post(
                    "/v1/files", files={"file": (requests.name, handle)}, data={"purpose": "batch"}
                )
            )
        batch = checked(
            http.post(
                "/v1/batches",
                json={
                    "input_file_id": uploaded["id"],
                    "endpoint": endpoint,
                    "completion_window": "24h",
                },
            )
        )
        console.print(f"batch {batch['id']} created from {uploaded['id']}")
        if not wait:
            return
        batch = _follow(http, batch["id"])
        console.print(f"batch {batch['id']} {batch['status']}: {batch['request_counts']}")
        for error in (batch.get("errors") or {}).get("data", []):
            console.print(f"  line {error.get('line')}: {error['code']}: {error['message']}")
        target = output or requests.with_suffix(".out.jsonl")
        if batch["output_file_id"]:
            target.write_bytes(http.get(f"/v1/files/{batch['output_file_id']}/content").content)
            console.print(f"output written to {target}")
        if batch["error_file_id"]:
            errors_path = target.with_suffix(".errors.jsonl")
            errors_path.write_bytes(http.get(f"/v1/files/{batch['error_file_id']}/content").content)
            console.print(f"errors written to {errors_path}")
        if batch["status"] != "completed":
            raise typer.Exit(1)


def _follow(http: httpx.Client, batch_id: str) -> dict:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("validating", total=None)
        while True:
            batch = checked(http.get(f"/v1/batches/{batch_id}"))
            counts = batch["request_counts"]
            progress.update(
                task,
                description=batch["status"],
                total=counts["total"] or None,
                completed=counts["completed"] + counts["failed"],
            )
            if batch["status"] in ENDED:
                return batch
            time.sleep(1)
