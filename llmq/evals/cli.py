"""`llmq eval`: start a run through the API, follow it with a live progress bar, then print the
scores and write the report. The run lives on the server: stopping the command leaves it going.
"""

import time
from pathlib import Path

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from llmq.evals.report import scores_table, write_report
from llmq.settings import get_settings

console = Console()
FINAL = ("succeeded", "failed", "cancelled")


def eval_command(
    benchmark: str = typer.Argument(..., help="gsm8k or mmlu"),
    model: str = typer.Option(..., "--model", help="Model id from models.yaml"),
    num_fewshot: int = typer.Option(None, "--num-fewshot", help="Default: lm-eval's (5, 0)"),
    limit: int = typer.Option(None, help="Only the first N items of each task"),
    subjects: str = typer.Option(None, help="Comma-separated MMLU subjects (default all)"),
    dataset: str = typer.Option(
        None, help="A folder's path inside the server's data dir, or the benchmark's hub id"
    ),
    api: str = typer.Option(None, help="API base URL (default from LLMQ_API_HOST/PORT)"),
    output: str = typer.Option("eval-reports", help="Folder for the JSON and PNG report"),
    api_key: str = typer.Option(None, "--api-key", envvar="LLMQ_API_KEY", help="An API key"),
) -> None:
    """Run GSM8K or MMLU on a served model, scored as lm-evaluation-harness scores them."""
    settings = get_settings()
    base = api or f"http://{settings.api_host}:{settings.api_port}"
    body = {"benchmark": benchmark, "model": model}
    optional = {"num_fewshot": num_fewshot, "limit": limit, "dataset": dataset}
    body |= {key: value for key, value in optional.items() if value is not None}
    if subjects:
        body["subjects"] = [s.strip() for s in subjects.split(",") if s.strip()]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=base, timeout=30, headers=headers) as client:
        response = client.post("/v1/evals", json=body)
        if response.status_code != 202:
            console.print(f"[red]{response.json()['error']['message']}[/red]")
            raise typer.Exit(1)
        run = response.json()
        console.print(
            f"run {run['id']}: {benchmark} on {model}; it goes on if this command stops "
            f"(cancel: POST {base}/v1/evals/{run['id']}/cancel)"
        )
        run = follow(client, run)
    if run["status"] != "succeeded":
        console.print(f"[red]run {run['status']}: {run.get('error') or ''}[/red]")
    if run.get("scores"):  # a run with failed items still shows what the others scored
        console.print(scores_table(run))
        for path in write_report(run, Path(output)):
            console.print(f"wrote {path}")
    if run["status"] != "succeeded":
        raise typer.Exit(1)


def follow(client: httpx.Client, run: dict) -> dict:
    """Poll the run, showing items done, items/s and ETA, until it ends."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} items/s · ETA {task.fields[eta]} · {task.fields[score]}"),
    )
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task(run["status"], total=None, rate="-", eta="-", score="")
        while True:
            p = run["progress"]
            headline = next(iter(((run.get("scores") or {}).get("metrics") or {}).items()), None)
            progress.update(
                bar,
                description=run["status"],
                total=p["total"] or None,
                completed=p["done"],
                rate=f"{p['items_per_s']:.1f}" if p["items_per_s"] else "-",
                eta=_duration(p["eta_s"]),
                score=f"{headline[0]} {headline[1]['value']:.4f}" if headline else "",
            )
            if run["status"] in FINAL:
                return run
            time.sleep(0.5)
            run = client.get(f"/v1/evals/{run['id']}").json()


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"
