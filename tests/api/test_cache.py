"""The completion cache end to end: a deterministic request that was answered before is answered
again from Postgres without a run; anything that could change the text makes it run."""

import json
import uuid

import pytest
from sqlalchemy import select, text

from db.session import session_scope
from db.tables import CompletionCache, Job, JobResult, Usage
from llmq.settings import get_settings
from tests.factories import read_samples, sample, submit, wait_for_job


def unique_prompt(label: str) -> str:
    """A prompt no other test sends, so that the cache starts empty for it."""
    return f"{label} {uuid.uuid4().hex[:8]}"


def run_once(client, **body) -> dict:
    """Submit a job that must run, and wait for its result."""
    job = submit(client, **body)
    assert job["status"] == "queued" and job["cache_hit"] is False
    return wait_for_job(client, job["id"])


def cache_counters(client, model: str = "tiny-llama") -> tuple[float, float]:
    samples = read_samples(client.get("/metrics").text)
    return (
        sample(samples, "llmq_cache_hits_total", model=model),
        sample(samples, "llmq_cache_misses_total", model=model),
    )


def jobs_with_prompt(database_url: str, prompt: str) -> list[Job]:
    with session_scope(database_url) as session:
        return list(
            session.scalars(
                select(Job).where(Job.input["prompt"].astext == prompt).order_by(Job.created_at)
            )
        )


def test_repeated_greedy_job_is_answered_from_cache(live_client, database_url):
    prompt = unique_prompt("Lily went to the park")
    first = run_once(live_client, prompt=prompt, max_tokens=8)
    hits, misses = cache_counters(live_client)

    response = live_client.post(
        "/v1/jobs", json={"model": "tiny-llama", "prompt": prompt, "max_tokens": 8}
    )

    assert response.status_code == 202
    hit = response.json()
    assert hit["status"] == "succeeded" and hit["cache_hit"] is True
    assert hit["result"]["text"] == first["result"]["text"]
    assert hit["result"]["finish_reason"] == first["result"]["finish_reason"]
    assert hit["result"]["usage"] == first["result"]["usage"]
    assert hit["attempts"] == 0 and hit["started_at"] is None and hit["finished_at"] is not None
    assert live_client.get(f"/v1/jobs/{hit['id']}").json() == hit
    assert cache_counters(live_client) == (hits + 1, misses)
    with session_scope(database_url) as session:
        job = session.get(Job, uuid.UUID(hit["id"]))
        assert job.worker is None and job.enqueued_at is None
        assert session.get(JobResult, job.id).text == first["result"]["text"]
        usage = session.scalars(select(Usage).where(Usage.job_id == job.id)).one()
        assert usage.cached is True
        assert usage.completion_tokens == first["result"]["usage"]["completion_tokens"]
        entry = session.scalars(
            select(CompletionCache)
            .where(CompletionCache.model == "tiny-llama")
            .order_by(CompletionCache.last_hit_at.desc().nulls_last())
            .limit(1)
        ).one()
        assert entry.hits == 1 and entry.last_hit_at is not None
        assert entry.text == first["result"]["text"]


def test_first_request_is_a_miss_that_runs(live_client, database_url):
    prompt = unique_prompt("A new prompt")
    hits, misses = cache_counters(live_client)

    done = run_once(live_client, prompt=prompt, max_tokens=6)

    assert done["status"] == "succeeded" and done["attempts"] == 1
    assert cache_counters(live_client) == (hits, misses + 1)
    (job,) = jobs_with_prompt(database_url, prompt)
    assert job.cache_key is not None and job.cache_hit is False


def test_cache_false_runs_the_job_again(live_client, database_url):
    prompt = unique_prompt("Tom had a red ball")
    run_once(live_client, prompt=prompt, max_tokens=8)

    again = run_once(live_client, prompt=prompt, max_tokens=8, cache=False)

    assert again["status"] == "succeeded" and again["cache_hit"] is False
    assert again["attempts"] == 1
    opted_out = jobs_with_prompt(database_url, prompt)[-1]
    assert opted_out.cache_key is None and opted_out.worker is not None
    assert live_client.post(
        "/v1/jobs", json={"model": "tiny-llama", "prompt": prompt, "max_tokens": 8}
    ).json()["cache_hit"], "the entry is still there for others"


def test_cache_must_be_a_boolean(client):
    response = client.post("/v1/jobs", json={"model": "tiny-llama", "prompt": "x", "cache": "no"})
    assert response.status_code == 400
    assert "cache" in response.json()["error"]["message"]


def test_cache_off_in_settings_runs_every_job(live_client, database_url, monkeypatch):
    monkeypatch.setattr(get_settings(), "cache", False)
    prompt = unique_prompt("The sun was shining")
    hits, misses = cache_counters(live_client)

    first = run_once(live_client, prompt=prompt, max_tokens=5)
    second = run_once(live_client, prompt=prompt, max_tokens=5)

    assert first["result"]["text"] == second["result"]["text"]
    assert cache_counters(live_client) == (hits, misses), "the cache is not even looked up"
    assert [job.cache_key for job in jobs_with_prompt(database_url, prompt)] == [None, None]


def test_expired_entry_is_computed_again_and_refreshed(live_client, database_url):
    prompt = unique_prompt("Once there was a cat")
    first = run_once(live_client, prompt=prompt, max_tokens=6)
    (job,) = jobs_with_prompt(database_url, prompt)
    pieces = job.input["fingerprint"]
    ttl_s = get_settings().cache_ttl_s
    with session_scope(database_url) as session:
        session.execute(
            text(
                "UPDATE completion_cache SET created_at = now() - make_interval(secs => :age) "
                "WHERE prompt_hash = :prompt_hash"
            ),
            {"age": ttl_s + 60, "prompt_hash": pieces["prompt_hash"]},
        )

    again = run_once(live_client, prompt=prompt, max_tokens=6)

    assert again["result"]["text"] == first["result"]["text"]
    with session_scope(database_url) as session:
        fresh = session.scalar(
            select(text("now() - created_at < interval '1 hour'"))
            .select_from(CompletionCache)
            .where(CompletionCache.prompt_hash == pieces["prompt_hash"])
        )
    assert fresh, "the new result replaced the expired entry"
    assert submit(live_client, prompt=prompt, max_tokens=6)["cache_hit"] is True


def test_entries_never_expire_with_ttl_zero(live_client, database_url, monkeypatch):
    prompt = unique_prompt("An old story")
    run_once(live_client, prompt=prompt, max_tokens=4)
    with session_scope(database_url) as session:
        session.execute(
            text("UPDATE completion_cache SET created_at = now() - interval '400 days'")
        )
    monkeypatch.setattr(get_settings(), "cache_ttl_s", 0)

    assert submit(live_client, prompt=prompt, max_tokens=4)["cache_hit"] is True


@pytest.mark.parametrize(
    "change",
    [
        {"max_tokens": 7},
        {"stop": ["e"]},
        {"ignore_eos": True},
        {"model": "tiny-coalesce"},
    ],
    ids=["max_tokens", "stop", "ignore_eos", "model"],
)
def test_any_change_that_shapes_the_text_misses(live_client, database_url, change):
    prompt = unique_prompt("The dog was not happy")
    run_once(live_client, prompt=prompt, max_tokens=6)

    changed = submit(live_client, prompt=prompt, **({"max_tokens": 6} | change))

    assert changed["cache_hit"] is False and changed["status"] == "queued"
    first, second = jobs_with_prompt(database_url, prompt)
    assert first.cache_key != second.cache_key


def test_sampled_request_without_seed_is_never_cached(live_client, database_url):
    prompt = unique_prompt("Birds were singing")
    body = {"prompt": prompt, "max_tokens": 6, "temperature": 0.8}
    run_once(live_client, **body)
    again = run_once(live_client, **body)

    assert again["attempts"] == 1
    assert [job.cache_key for job in jobs_with_prompt(database_url, prompt)] == [None, None]


def test_seeded_sampled_request_is_cached(live_client):
    prompt = unique_prompt("Birds were singing")
    body = {"prompt": prompt, "max_tokens": 6, "temperature": 0.8, "seed": 7}
    first = run_once(live_client, **body)

    hit = submit(live_client, **body)
    other_seed = submit(live_client, **(body | {"seed": 8}))

    assert hit["cache_hit"] is True and hit["result"]["text"] == first["result"]["text"]
    assert other_seed["cache_hit"] is False


def sse_events(body: str) -> list[tuple[str, dict]]:
    """(event type, data) of each event of an SSE body."""
    events, kind = [], None
    for line in body.splitlines():
        if line.startswith("event: "):
            kind = line[len("event: ") :]
        elif line.startswith("data: ") and kind is not None:
            events.append((kind, json.loads(line[len("data: ") :])))
            kind = None
    return events


def test_cache_hit_streams_its_text_and_done(live_client):
    prompt = unique_prompt("A queue holds jobs")
    first = run_once(live_client, prompt=prompt, max_tokens=8)
    hit = submit(live_client, prompt=prompt, max_tokens=8)

    body = live_client.get(f"/v1/jobs/{hit['id']}/events").text

    events = sse_events(body)
    assert [kind for kind, _ in events] == ["token", "done"]
    assert events[0][1]["text"] == events[1][1]["text"] == first["result"]["text"]
    assert events[1][1]["status"] == "succeeded"


def completion(client, prompt: str, **extra) -> dict:
    body = {"model": "tiny-llama", "prompt": prompt, "max_tokens": 8, "temperature": 0} | extra
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_openai_completion_is_answered_from_cache(live_client, database_url):
    prompt = unique_prompt("Workers run many jobs")
    first = completion(live_client, prompt)

    again = completion(live_client, prompt)

    assert again["choices"][0]["text"] == first["choices"][0]["text"]
    assert again["usage"] == first["usage"]
    assert [job.cache_hit for job in jobs_with_prompt(database_url, prompt)] == [False, True]


def test_openai_completion_opts_out_with_cache_false(live_client, database_url):
    prompt = unique_prompt("Workers run many jobs")
    completion(live_client, prompt)

    completion(live_client, prompt, cache=False)

    assert [job.cache_hit for job in jobs_with_prompt(database_url, prompt)] == [False, False]


def test_openai_streamed_cache_hit_sends_the_text_then_done(live_client):
    prompt = unique_prompt("Tom and his mom")
    first = completion(live_client, prompt)

    response = live_client.post(
        "/v1/completions",
        json={
            "model": "tiny-llama",
            "prompt": prompt,
            "max_tokens": 8,
            "temperature": 0,
            "stream": True,
        },
    )

    lines = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == first["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == first["choices"][0]["finish_reason"]


def test_chat_completion_is_cached_on_its_rendered_prompt(live_client, database_url):
    content = unique_prompt("Hi there")
    body = {
        "model": "tiny-llama",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 6,
        "temperature": 0,
    }
    first = live_client.post("/v1/chat/completions", json=body).json()

    again = live_client.post("/v1/chat/completions", json=body).json()

    assert again["choices"][0]["message"] == first["choices"][0]["message"]
    rendered = f"<|user|>\n{content}</s>\n<|assistant|>\n"
    assert [job.cache_hit for job in jobs_with_prompt(database_url, rendered)] == [False, True]


def test_greedy_choices_of_one_request_share_one_run(live_client, database_url):
    prompt = unique_prompt("Lily and Tom")

    response = completion(live_client, prompt, n=3, ignore_eos=True)

    assert len({choice["text"] for choice in response["choices"]}) == 1
    first, *others = jobs_with_prompt(database_url, prompt)
    assert first.follows_job_id is None and first.worker is not None
    assert [job.follows_job_id for job in others] == [first.id, first.id]
    assert response["usage"]["completion_tokens"] == 3 * 8
