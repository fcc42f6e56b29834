"""Liveness and readiness."""


def test_healthz_is_ok(client):
    assert client.get("/healthz").json() == {"status": "ok"}


def test_readyz_reports_postgres_redis_and_migrations(client):
    response = client.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json()["checks"] == {
        "postgres": "ok",
        "migrations": "ok",
        "redis": "ok",
        "redis_eviction": "ok",
    }


def test_readyz_is_503_when_redis_may_evict_keys(client, redis_url):
    from redis import Redis

    redis = Redis.from_url(redis_url)
    before = redis.config_get("maxmemory-policy")["maxmemory-policy"]
    redis.config_set("maxmemory-policy", "allkeys-lru")
    try:
        response = client.get("/readyz")
    finally:
        redis.config_set("maxmemory-policy", before)
    assert response.status_code == 503
    assert "set it to noeviction" in response.json()["checks"]["redis_eviction"]


def test_readyz_is_503_when_redis_is_unreachable(database_url, tiny_model_path):
    from fastapi.testclient import TestClient

    from api.main import create_app
    from llmq.settings import Settings

    app = create_app(Settings(database_url=database_url, redis_url="redis://127.0.0.1:1/0"))
    response = TestClient(app).get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["redis"].startswith("unavailable")
    assert response.headers["Retry-After"]


def test_openapi_docs_are_served(client):
    assert client.get("/docs").status_code == 200
    assert "/v1/jobs" in client.get("/openapi.json").json()["paths"]
