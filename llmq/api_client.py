"""How the CLI's client commands reach a running llmq API: its URL and an API key, from the
options or LLMQ_API_URL / LLMQ_API_KEY; an error answer becomes the command's error."""

from typing import Annotated

import httpx
import typer

BaseUrl = Annotated[str, typer.Option(envvar="LLMQ_API_URL")]
ApiKey = Annotated[str | None, typer.Option(envvar="LLMQ_API_KEY")]
DEFAULT_URL = "http://127.0.0.1:8000"


def api_client(base_url: str, api_key: str | None, timeout: float = 300) -> httpx.Client:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)


def checked(response: httpx.Response) -> dict:
    """The answer's JSON body; an error answer ends the command with its message."""
    if response.is_error:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text
        raise typer.BadParameter(f"{response.status_code}: {message}")
    return response.json()
