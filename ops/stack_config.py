"""What the stack runs, from the settings: the steps before it starts, its processes' commands,
the queues its worker may consume, and the Flower password and admin key it hands them."""

import secrets
import subprocess

from llmq.registry import get_registry
from llmq.settings import Settings
from ops.console import ROOT, say

# The development stack's admin key, kept under LLMQ_DATA_DIR so that it outlives a restart.
DEV_KEY_FILE = "dev-admin-key"


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
