"""The banner `run` prints once the stack is up: its addresses, credentials and a first job."""

import shlex

from llmq.settings import Settings
from ops.console import BIN, typed
from ops.probes import redacted
from ops.services import Services

CURL_EXAMPLE = (
    'curl -s {api}/v1/jobs -H "Authorization: Bearer $LLMQ_API_KEY" '
    "-H 'Content-Type: application/json' "
    """-d '{{"model": "{model}", "prompt": "Once upon a time", "max_tokens": 16}}'"""
)


def local_address(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


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
