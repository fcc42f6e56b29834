"""A remote model's upstream failing: stopped with 200 jobs queued, cut mid-stream, answering
500 or 429 for a while, hanging, answering garbage. No accepted job is lost or stored twice, the
breaker opens and closes again (shown in the API's metrics), every job succeeds once the
upstream is back, and the front keeps serving local models meanwhile."""

import os
import signal
import statistics
import threading
import time
from collections import Counter

import structlog
from redis import Redis

from llmq.events import events_key
from tests.api.test_streams import read_events, texts
from tests.factories import read_samples, sample, submit, wait_for_job
from tests.faults import assert_each_succeeded_once, statuses, wait_until
from tests.workers.remote.conftest import MODEL

log = structlog.get_logger(__name__)
REMOTE_JOB = {"model": MODEL, "max_tokens": 8, "ignore_eos": True, "cache": False}


def breaker_gauge(client) -> float:
    samples = read_samples(client.get("/metrics").text)
    return sample(samples, "llmq_upstream_circuit_breaker_state", model=MODEL)


class BreakerWatch:
    """Polls the API's breaker gauge in the background: the states it went through."""

    def __init__(self, client) -> None:
        self.client = client
        self.seen: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            value = breaker_gauge(self.client)
            if not self.seen or self.seen[-1] != value:
                self.seen.append(value)
            time.sleep(0.1)

    def stop(self) -> list[float]:
        self._stop.set()
        self._thread.join(5)
        return self.seen


def local_latencies(client, seconds: float) -> list[float]:
    """One-at-a-time jobs on the local model for `seconds`: each one's submit → result."""
    latencies = []
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        started = time.monotonic()
        job = submit(client, model="tiny-llama", prompt="Hi", max_tokens=4, cache=False)
        assert wait_for_job(client, job["id"])["status"] == "succeeded"
        latencies.append(time.monotonic() - started)
    return latencies


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) > 1 else values[0]


def test_upstream_stopped_30s_with_200_jobs_queued(live_client, healthy_upstream, database_url):
    client, link = live_client, healthy_upstream.link
    watch = BreakerWatch(client)
    link.cut()
    ids = [submit(client, prompt=f"story {i}", **REMOTE_JOB)["id"] for i in range(200)]
    wait_until(lambda: breaker_gauge(client) == 2, 30, "the breaker to open")
    during = local_latencies(client, 30)
    counts = Counter(statuses(database_url, ids).values())
    assert "failed" not in counts, f"jobs wait for the upstream: {counts}"
    assert counts["queued"] >= 180, f"only {counts['queued']} of 200 jobs stayed queued: {counts}"
    link.restore()
    assert_each_succeeded_once(database_url, ids)
    wait_until(lambda: breaker_gauge(client) == 0, 10, "the breaker to close")
    seen = watch.stop()
    assert seen[0] == 0 and 2 in seen and seen[-1] == 0, seen
    log.info(
        "local jobs during the outage",
        n=len(during),
        p50=statistics.median(during),
        p99=p99(during),
    )
    assert p99(during) < 2.0, f"local p99 {p99(during):.2f}s during the outage"


def test_upstream_cut_mid_stream_resumes_the_same_text(api_server, client, healthy_upstream):
    long_job = {**REMOTE_JOB, "max_tokens": 300}
    ids = [submit(client, prompt=f"tale {i}", **long_job)["id"] for i in range(4)]
    read_events(api_server, ids[0], limit=3)  # streaming has begun
    healthy_upstream.link.cut()
    healthy_upstream.link.restore()
    for job_id, i in zip(ids, range(4), strict=True):
        done = wait_for_job(client, job_id, timeout=120)
        assert done["status"] == "succeeded", done
        asked = healthy_upstream.complete(prompt=f"tale {i}", max_tokens=300, ignore_eos=True)
        assert done["result"]["text"] == asked["choices"][0]["text"]
        assert texts(read_events(api_server, job_id)) == done["result"]["text"]


def test_upstream_answering_500_opens_and_closes_the_breaker(
    client, healthy_upstream, database_url
):
    link = healthy_upstream.link
    watch = BreakerWatch(client)
    link.fail_with = (500, {})
    ids = [submit(client, prompt=f"five hundred {i}", **REMOTE_JOB)["id"] for i in range(10)]
    wait_until(lambda: breaker_gauge(client) == 2, 30, "the breaker to open")
    time.sleep(3)  # a probe or two meet the 500s too
    link.fail_with = None
    assert_each_succeeded_once(database_url, ids)
    wait_until(lambda: breaker_gauge(client) == 0, 10, "the breaker to close")
    assert 2 in watch.stop()
    assert len(link.error_times) >= 3


def test_upstream_429_is_retried_no_sooner_than_retry_after(client, healthy_upstream):
    link = healthy_upstream.link
    link.fail_with = (429, {"Retry-After": "2"})
    job = submit(client, prompt="rate limited", **REMOTE_JOB)
    wait_until(lambda: len(link.error_times) >= 2, 20, "a retry")
    link.fail_with = None
    assert wait_for_job(client, job["id"], timeout=30)["status"] == "succeeded"
    gaps = [b - a for a, b in zip(link.error_times, link.error_times[1:], strict=False)]
    assert gaps and min(gaps) >= 1.9, gaps


def test_upstream_hanging_past_its_timeout(client, healthy_upstream, redis_url):
    link = healthy_upstream.link
    link.hang = True
    waiting = submit(client, prompt="patient", **REMOTE_JOB)
    impatient = submit(client, prompt="impatient", timeout_s=5, **REMOTE_JOB)
    failed = wait_for_job(client, impatient["id"], timeout=30)
    assert failed["status"] == "failed", failed
    assert failed["error"]["category"] == "upstream_unavailable"
    assert "deadline" in failed["error"]["message"]
    link.hang = False
    assert wait_for_job(client, waiting["id"], timeout=60)["status"] == "succeeded"


def test_upstream_answering_garbage_fails_that_job_alone(client, healthy_upstream):
    link = healthy_upstream.link
    link.fail_with = (200, {})  # a JSON body where an event stream belongs
    bad = submit(client, prompt="garbage", **REMOTE_JOB)
    failed = wait_for_job(client, bad["id"], timeout=30)
    link.fail_with = None
    assert failed["status"] == "failed"
    assert failed["error"]["category"] == "upstream_error"
    assert "not an event stream" in failed["error"]["message"]
    good = submit(client, prompt="fine", **REMOTE_JOB)
    assert wait_for_job(client, good["id"], timeout=30)["status"] == "succeeded"


def test_cancelling_a_job_closes_its_upstream_request(client, healthy_upstream, redis_url):
    job = submit(client, prompt="endless", **{**REMOTE_JOB, "max_tokens": 480})
    redis = Redis.from_url(redis_url)
    wait_until(lambda: redis.xlen(events_key(job["id"])) > 2, 30, "tokens to stream")
    # The upstream's job may not end on its own meanwhile: its worker is frozen.
    os.kill(healthy_upstream.worker.pid, signal.SIGSTOP)
    try:
        assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
        upstream = healthy_upstream.client()
        jobs = upstream.get("/v1/jobs", params={"limit": 5}).json()["data"]
        theirs = next(j for j in jobs if j["prompt"] == "endless")
        assert theirs["status"] == "running"
        # The front closed its request; the upstream saw it go and cancelled its own job.
        wait_until(
            lambda: upstream.get(f"/v1/jobs/{theirs['id']}").json()["status"] == "cancelled",
            15,
            "the upstream's job to be cancelled",
        )
    finally:
        os.kill(healthy_upstream.worker.pid, signal.SIGCONT)
    assert wait_for_job(client, job["id"], until=("cancelled",))["status"] == "cancelled"
