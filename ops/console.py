"""Where the development stack works from, and how it reports: progress lines on stderr and
paths as the user would type them."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the environment's console scripts: alembic, llmq, uvicorn


def say(message: str) -> None:
    """Progress goes to stderr, so that stdout stays clean for `eval "$(... services)"`."""
    print(f"devstack: {message}", file=sys.stderr, flush=True)


def typed(path: Path) -> str:
    """A path as typed from the current directory."""
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)
