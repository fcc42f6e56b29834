"""Shared fixtures: a real Postgres database, a real Redis database, a real Celery worker
subprocess holding the real tiny model, and the API app in-process.

The servers come from LLMQ_DATABASE_URL / LLMQ_REDIS_URL (their defaults otherwise); the suite
uses its own database (`llmq_test_<pid>`, dropped at the end) and Redis database (15) on them.
"""

import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from tests.factories import ADMIN_KEY, free_port  # reads no settings

ROOT = Path(__file__).resolve().parent.parent
STORIES = ROOT / "models" / "stories260K"  # the pretrained model shipped with llmq
TEST_DATA_DIR = Path(tempfile.mkdtemp(prefix="llmq-test-"))


def _test_urls() -> tuple[str, str]:
    server = make_url(
        os.environ.get("LLMQ_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/llmq")
    )
    redis_base = os.environ.get("LLMQ_REDIS_URL", "redis://127.0.0.1:6379/0").rsplit("/", 1)[0]
    # A database per run, so that two runs against one server never meet.
    name = f"llmq_test_{os.getpid()}"
    # Two runs on one machine pick different Redis databases (LLMQ_TEST_REDIS_DB) to never meet.
    redis_db = os.environ.get("LLMQ_TEST_REDIS_DB", "15")
    return server.set(database=name).render_as_string(False), f"{redis_base}/{redis_db}"


DATABASE_URL, REDIS_URL = _test_urls()
# Remote models (tests/workers/remote) reach their upstream, a second llmq, through a link on
# this port; the models file gives it to them.
UPSTREAM_LINK_PORT = free_port()
MODELS_FILE = TEST_DATA_DIR / "models.yaml"
MODELS_FILE.write_text(
    (ROOT / "tests" / "models.test.yaml").read_text()
    + (ROOT / "tests" / "models.remote.yaml").read_text().format(port=UPSTREAM_LINK_PORT)
    + (ROOT / "tests" / "models.lifecycle.yaml").read_text().format(data_dir=TEST_DATA_DIR)
    + (ROOT / "tests" / "models.pretrained.yaml").read_text().format(stories=STORIES)
)
# Set before any llmq module reads settings (celeryconfig reads them at import).
os.environ.update(
    LLMQ_DATABASE_URL=DATABASE_URL,
    LLMQ_REDIS_URL=REDIS_URL,
    LLMQ_MODELS_FILE=str(MODELS_FILE),
    LLMQ_DATA_DIR=str(TEST_DATA_DIR),
    LLMQ_LOG_JSON="false",
    LLMQ_WORKERS_CACHE_S="0.5",
    # Test workers serve no metrics unless a test gives one a port: they would share 9100.
    LLMQ_WORKER_METRICS_PORT="0",
    # The reconciler's sweep interval and lost-worker limit are the production defaults, so
    # the fault tests measure what an operator gets; only the requeue timer is short.
    LLMQ_REQUEUE_AFTER_S="2",
    # The suite's admin key: stored by the API at start-up, sent by every client (AUTH).
    LLMQ_BOOTSTRAP_ADMIN_KEY=ADMIN_KEY,
    LLMQ_API_KEY=ADMIN_KEY,  # what `llmq eval` sends
    # One key drives the whole suite: no default limits. Limit tests set their keys' own.
    LLMQ_RATE_LIMIT_PER_MINUTE="0",
    LLMQ_MAX_CONCURRENT_JOBS="0",
    LLMQ_BATCH_INTERVAL_S="0.3",
    # The key remote models send their upstream (models.remote.yaml's api_key_env).
    LLMQ_TEST_UPSTREAM_KEY=ADMIN_KEY,
)

from tests.factories import (  # noqa: E402
    AUTH,
    create_database,
    drop_database,
    migrate,
    start_api,
    start_worker,
    stop_worker,
    wait_for_queue,
)


@pytest.fixture(scope="session", autouse=True)
def remove_test_data_dir():
    yield
    shutil.rmtree(TEST_DATA_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def database_url():
    create_database(DATABASE_URL, replace=True)
    migrate(DATABASE_URL, "head")
    yield DATABASE_URL
    from db.session import get_engine

    get_engine(DATABASE_URL).dispose()
    drop_database(DATABASE_URL)


@pytest.fixture(scope="session")
def redis_url() -> str:
    from redis import Redis

    Redis.from_url(REDIS_URL).flushdb()
    return REDIS_URL


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    from llmq.tiny_model import ensure_tiny_model

    return ensure_tiny_model(TEST_DATA_DIR / "models" / "tiny-llama")


@pytest.fixture(scope="session")
def worker(database_url, redis_url, tiny_model_path):
    """A real `llmq worker` subprocess for tiny-llama on the cpu queue."""
    process = start_worker("tiny-llama")
    try:
        wait_for_queue("llmq.tiny-llama.cpu", process)
        yield process
    finally:
        stop_worker(process)


@pytest.fixture(scope="session")
def app(database_url, redis_url, tiny_model_path):
    from api.main import create_app
    from llmq.settings import get_settings

    get_settings.cache_clear()
    return create_app(get_settings())


@pytest.fixture(scope="session")
def client(app):
    from fastapi.testclient import TestClient

    with TestClient(app, headers=AUTH) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def api_server(database_url, redis_url, tiny_model_path, worker):
    """The API under uvicorn in its own process, for streaming and client-library tests."""
    process, base_url = start_api()
    try:
        yield base_url
    finally:
        stop_worker(process)


@pytest.fixture
def live_client(client, worker, app):
    """The API client once the app has seen the worker's queue."""
    deadline = time.monotonic() + 30
    while "llmq.tiny-llama.cpu" not in app.state.live_queues.refresh():
        assert time.monotonic() < deadline, "the API never saw the worker's queue"
        time.sleep(0.2)
    return client


@pytest.fixture(scope="session")
def s3_endpoint():
    """An S3-compatible server (moto, a subprocess) for object-store models, with the AWS_*
    variables set to its test credentials for this process and the ones it starts."""
    from tests.s3_server import CREDENTIALS, start_moto

    with pytest.MonkeyPatch.context() as patch:
        for name, value in CREDENTIALS.items():
            patch.setenv(name, value)
        for name in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
            patch.setenv(name, str(TEST_DATA_DIR / "no-aws-config"))
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
            patch.delenv(name, raising=False)
        process, endpoint = start_moto(TEST_DATA_DIR / "moto.log")
        try:
            yield endpoint
        finally:
            stop_worker(process)


@pytest.fixture
def s3_model(s3_endpoint) -> str:
    """stories260K uploaded to a bucket of its own; its URL."""
    from tests.s3_server import upload_folder

    bucket = f"models-{uuid.uuid4().hex[:12]}"
    upload_folder(s3_endpoint, bucket, "stories260K", STORIES)
    return f"s3://{bucket}/stories260K"


@pytest.fixture
def s3_proxy(s3_endpoint):
    """A proxy in front of the S3 server that records requests and injects faults."""
    from tests.s3_server import RecordingProxy

    proxy = RecordingProxy(s3_endpoint)
    yield proxy
    proxy.close()
