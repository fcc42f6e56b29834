"""MkDocs hook: the API reference is generated from the FastAPI app, never retyped.

At build time it imports `api.main:app` and
- writes the app's OpenAPI document to the site as `openapi.json` (the document a running API
  serves at `/openapi.json`);
- replaces the marker in `reference/api.md` with a table of every operation, grouped by tag,
  with the first sentence of its docstring.

Creating the app connects to nothing (Postgres and Redis are reached from its lifespan, which a
build never starts), but importing it needs llmq's dependencies, torch excepted: build with
`make docs`, which runs MkDocs from the project's virtualenv. Without them the build fails.
"""

import json
import re
import sys
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

SCHEMA_FILE = "openapi.json"
MARKER = "<!-- openapi-operations -->"
METHODS = ("get", "post", "put", "patch", "delete")
# A tag's heading where capitalising its first letter is not enough.
TAG_TITLES = {"openai": "OpenAI-compatible"}

_document: dict | None = None


def on_config(config):
    # The repository root, so that `api` imports from this checkout whatever the cwd.
    root = str(Path(config.config_file_path).resolve().parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    global _document
    _document = None  # `mkdocs serve` rebuilds: read the app again
    return config


def openapi_document() -> dict:
    global _document
    if _document is None:
        try:
            from api.main import app
        except ImportError as exc:
            raise PluginError(
                f"docs/hooks/openapi.py: cannot import api.main ({exc}). The API reference is "
                "generated from the app: build the docs with `make docs`, which runs MkDocs "
                "from the project's virtualenv (.venv)."
            ) from exc
        _document = app.openapi()
    return _document


def on_files(files, config):
    text = json.dumps(openapi_document(), indent=2, ensure_ascii=False) + "\n"
    files.append(File.generated(config, SCHEMA_FILE, content=text))
    return files


def on_page_markdown(markdown, page, config, files):
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, operations_markdown(openapi_document()))


def first_sentence(operation: dict) -> str:
    """The docstring's first sentence, on one line; the generated summary if it has none."""
    paragraph = (operation.get("description") or "").strip().split("\n\n")[0]
    text = " ".join(paragraph.split())
    if not text:
        return operation.get("summary", "")
    sentence = re.split(r"(?<=\.)\s", text, maxsplit=1)[0]
    return sentence.replace("|", "\\|")


def operations_markdown(document: dict) -> str:
    groups: dict[str, list[str]] = {}
    for path, item in document["paths"].items():
        for method in METHODS:
            operation = item.get(method)
            if operation is None:
                continue
            tag = (operation.get("tags") or ["other"])[0]
            row = f"| `{method.upper()}` | `{path}` | {first_sentence(operation)} |"
            groups.setdefault(tag, []).append(row)
    sections = []
    for tag, rows in groups.items():
        table = "\n".join(["| method | path | what it does |", "| --- | --- | --- |", *rows])
        title = TAG_TITLES.get(tag, tag[:1].upper() + tag[1:])
        sections.append(f"### {title}\n\n{table}\n")
    return "\n".join(sections)
