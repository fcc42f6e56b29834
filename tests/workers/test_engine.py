"""The batching engine on the real tiny model: batch composition never changes a job's output."""

import random
import threading
import time
import uuid

import pytest

from llmq.protocol import FinishReason, SamplingParams

PROMPTS = [
    "Once upon a time",
    "The dog",
    "A queue holds jobs until a worker is ready and then",
    "x",
    "Lily liked to play in the park with her friend Tom, and every day they",
    "Hello 🙂 漢字",
    "0 1 2 3",
]


@pytest.fixture
def make_engine(host):
    from workers.engine import GenerationEngine

    engines = []

    def make(**options):
        options = {"max_batch_size": 16, "max_batch_tokens": 100_000, "max_wait_ms": 5} | options
        engine = GenerationEngine(host, **options)
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()


def request(host, prompt, **params):
    from workers.engine import GenerationRequest

    params.setdefault("max_tokens", 12)
    return GenerationRequest(uuid.uuid4(), host.encode(prompt), SamplingParams(**params))


def run_all(engine, requests, stagger_s: float = 0.0):
    futures = []
    for req in requests:
        futures.append(engine.submit(req))
        if stagger_s:
            time.sleep(stagger_s)
    return [f.result(timeout=60) for f in futures]


def test_greedy_text_is_the_same_alone_and_in_any_batch(host, make_engine):
    engine = make_engine()
    alone = {p: run_all(engine, [request(host, p, ignore_eos=True)])[0].text for p in PROMPTS}
    rng = random.Random(7)
    for mix in range(6):
        chosen = rng.sample(PROMPTS, rng.randint(2, len(PROMPTS)))
        outputs = run_all(
            engine,
            [request(host, p, ignore_eos=True) for p in chosen],
            stagger_s=0.003 * (mix % 3),  # some mixes join a batch already decoding
        )
        assert [o.text for o in outputs] == [alone[p] for p in chosen], f"mix {mix}: {chosen}"


def test_greedy_output_matches_across_different_max_tokens_neighbours(host, make_engine):
    engine = make_engine()
    target = run_all(engine, [request(host, "The dog", max_tokens=20, ignore_eos=True)])[0]
    neighbours = [
        request(host, p, max_tokens=n, ignore_eos=True)
        for p, n in zip(PROMPTS, [1, 3, 40, 7, 2, 30, 5], strict=True)
    ]
    outputs = run_all(
        engine,
        [
            *neighbours[:3],
            request(host, "The dog", max_tokens=20, ignore_eos=True),
            *neighbours[3:],
        ],
    )
    assert outputs[3].text == target.text
    assert [o.completion_tokens for o in outputs] == [1, 3, 40, 20, 7, 2, 30, 5]


def test_seeded_sampling_is_the_same_whatever_the_neighbours(host, make_engine):
    engine = make_engine()
    params = {"temperature": 0.9, "top_p": 0.9, "top_k": 40, "seed": 1234, "ignore_eos": True}
    alone = run_all(engine, [request(host, "Once upon a time", **params)])[0].text
    neighbours = [request(host, p, temperature=1.0, ignore_eos=True) for p in PROMPTS[1:5]]
    batched = run_all(
        engine, [neighbours[0], request(host, "Once upon a time", **params), *neighbours[1:]]
    )
    assert batched[1].text == alone
    other_seed = run_all(engine, [request(host, "Once upon a time", **(params | {"seed": 99}))])
    assert other_seed[0].text != alone


def test_stop_strings_max_tokens_and_eos_are_per_job(host, make_engine):
    engine = make_engine()
    free = run_all(engine, [request(host, "A queue", max_tokens=24, ignore_eos=True)])[0].text
    stop = free[6:9]  # likely spans a token boundary
    outputs = run_all(
        engine,
        [
            request(host, "A queue", max_tokens=24, stop=[stop], ignore_eos=True),
            request(host, "The dog", max_tokens=3, ignore_eos=True),
            request(host, "Hello", max_tokens=30, ignore_eos=True),
        ],
    )
    assert outputs[0].finish_reason is FinishReason.STOP
    assert outputs[0].text == free[: free.find(stop)]
    assert outputs[1].finish_reason is FinishReason.LENGTH and outputs[1].completion_tokens == 3
    assert outputs[2].completion_tokens == 30


def test_eos_finishes_a_job_unless_ignore_eos(host, make_engine):
    engine = make_engine()
    eos = host.eos_token_id
    # At a high temperature a seeded job soon samples EOS; with ignore_eos it runs to max_tokens.
    params = {"temperature": 5.0, "seed": 3, "max_tokens": 120}
    stopped = run_all(engine, [request(host, "x", **params)])[0]
    forced = run_all(engine, [request(host, "x", **params, ignore_eos=True)])[0]
    assert eos is not None
    assert stopped.finish_reason is FinishReason.STOP and stopped.completion_tokens < 120
    assert forced.finish_reason is FinishReason.LENGTH and forced.completion_tokens == 120
    held = run_all(engine, [request(host, "x", **params, min_tokens=100)])[0]
    assert held.completion_tokens >= 100 > stopped.completion_tokens


def test_cancel_running_job_leaves_the_batch_and_neighbours_finish(host, make_engine):
    engine = make_engine()
    long = request(host, "Once upon a time", max_tokens=100, ignore_eos=True)
    other = request(host, "The dog", max_tokens=100, ignore_eos=True)
    futures = [engine.submit(long), engine.submit(other)]
    while not engine.steps:
        time.sleep(0.001)
    engine.cancel(long.job_id)
    cancelled, finished = (f.result(timeout=60) for f in futures)
    assert cancelled.finish_reason is FinishReason.CANCELLED
    assert cancelled.completion_tokens < 100
    assert finished.completion_tokens == 100


def test_token_budget_bounds_the_running_batch(host, make_engine):
    engine = make_engine(max_batch_tokens=60)
    sizes: list[int] = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            sizes.append(sum(s.budget for s in engine.running()))
            time.sleep(0.0005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    outputs = run_all(engine, [request(host, p, max_tokens=20, ignore_eos=True) for p in PROMPTS])
    stop.set()
    watcher.join()
    assert all(o.completion_tokens == 20 for o in outputs)
    assert max(sizes) > 0 and max(sizes) <= 60


def test_a_prompt_that_breaks_the_model_fails_alone(host, make_engine):
    from workers.engine import GenerationRequest

    engine = make_engine()
    poison = GenerationRequest(uuid.uuid4(), [1, 10**9], SamplingParams(max_tokens=4))
    futures = [
        engine.submit(request(host, "The dog")),
        engine.submit(poison),
        engine.submit(request(host, "Hello")),
    ]
    assert futures[0].result(timeout=60).completion_tokens >= 1
    with pytest.raises(IndexError):
        futures[1].result(timeout=60)
    assert futures[2].result(timeout=60).completion_tokens >= 1


def test_deadline_passed_fails_with_timeout(host, make_engine):
    from workers.engine import GenerationRequest, JobTimeout

    engine = make_engine()
    req = request(host, "The dog", max_tokens=100)
    late = GenerationRequest(req.job_id, req.prompt_ids, req.params, deadline=time.monotonic())
    with pytest.raises(JobTimeout):
        engine.submit(late).result(timeout=60)


def test_interactive_job_joins_before_waiting_batch_lines(host, make_engine):
    from dataclasses import replace

    engine = make_engine(max_batch_size=1)
    finished: list[str] = []
    batch_lines = [
        replace(request(host, f"line {i}", max_tokens=20, ignore_eos=True), priority=9)
        for i in range(4)
    ]
    interactive = request(host, "me first", max_tokens=20, ignore_eos=True)
    futures = []
    for name, item in [*(("batch", r) for r in batch_lines), ("interactive", interactive)]:
        future = engine.submit(item)
        future.add_done_callback(lambda _f, name=name: finished.append(name))
        futures.append(future)
    for future in futures:
        future.result(timeout=60)
    # The batch line already running finishes first; the interactive job overtakes the rest.
    assert finished.index("interactive") <= 1, finished


def batch_line(host, prompt, **params):
    from dataclasses import replace

    from llmq.protocol import BATCH_PRIORITY

    return replace(request(host, prompt, **params), priority=BATCH_PRIORITY)


def test_interactive_job_steps_beside_batch_lines_not_inside_their_batch(host, make_engine):
    engine = make_engine(max_batch_size=8, background_share=0.2)
    lines = [
        engine.submit(batch_line(host, f"line {i}", max_tokens=100, ignore_eos=True))
        for i in range(8)
    ]
    while len(engine.running()) < 8:
        time.sleep(0.001)
    interactive_sizes: list[int] = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            batch = engine._interactive.batch
            if batch is not None:
                interactive_sizes.append(len(batch.seqs))
            time.sleep(0.0002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    steps_before = engine.steps
    alone = request(host, "Once upon a time", max_tokens=20, ignore_eos=True)
    output = engine.submit(alone).result(timeout=60)
    stop.set()
    watcher.join()
    steps_taken = engine.steps - steps_before
    assert output.completion_tokens == 20
    assert interactive_sizes and max(interactive_sizes) == 1
    # Its 20 steps, plus the batch lines' share of the engine: far fewer than a step of the
    # lines after each of its own.
    assert steps_taken < 35, steps_taken
    assert not any(line.done() for line in lines)
    assert all(line.result(timeout=60).completion_tokens == 100 for line in lines)


def test_batch_lines_keep_moving_under_steady_interactive_traffic(host, make_engine):
    engine = make_engine(max_batch_size=4, background_share=0.3)
    line = engine.submit(batch_line(host, "a line", max_tokens=40, ignore_eos=True))
    deadline = time.monotonic() + 60
    while not line.done():
        assert time.monotonic() < deadline, "the batch line starved"
        engine.submit(request(host, "The dog", max_tokens=30, ignore_eos=True)).result(timeout=60)
    assert line.result().completion_tokens == 40


def test_interactive_and_batch_lines_give_the_texts_they_give_alone(host, make_engine):
    engine = make_engine(max_batch_size=4)
    alone = [run_all(engine, [request(host, p, max_tokens=16)])[0].text for p in PROMPTS]
    mixed = [
        batch_line(host, p, max_tokens=16) if i % 2 else request(host, p, max_tokens=16)
        for i, p in enumerate(PROMPTS)
    ]
    assert [o.text for o in run_all(engine, mixed, stagger_s=0.002)] == alone


def test_background_jobs_publish_their_text_once_and_interactive_jobs_token_by_token(host):
    from workers.engine import GenerationEngine

    published: list = []
    engine = GenerationEngine(
        host, max_batch_size=4, max_batch_tokens=100_000, max_wait_ms=5, on_tokens=published.extend
    )
    engine.start()
    try:
        line = batch_line(host, "Once upon a time", max_tokens=12, ignore_eos=True)
        chat = request(host, "Once upon a time", max_tokens=12, ignore_eos=True)
        line_text = engine.submit(line).result(timeout=60).text
        chat_text = engine.submit(chat).result(timeout=60).text
    finally:
        engine.stop()
    line_deltas = [e.event for e in published if e.event.job_id == line.job_id]
    chat_deltas = [e.event for e in published if e.event.job_id == chat.job_id]
    assert [d.text for d in line_deltas] == [line_text]
    assert line_deltas[0].token_index == 11
    assert len(chat_deltas) > 1 and "".join(d.text for d in chat_deltas) == chat_text


def test_newcomers_join_a_running_batch_in_groups_every_few_steps(host, make_engine):
    from workers.batch import Batch
    from workers.engine import _Lane

    engine = make_engine(max_batch_size=8, join_every_steps=4)
    lane = _Lane(background=False, batch=Batch(["a", "b", "c"], [], None))  # 5 rows free
    lane.steps_since_join = 1
    assert not engine._join_due(lane, waiting=2)  # they wait for the group
    assert engine._join_due(lane, waiting=5)  # they fill the batch: no reason to wait
    lane.steps_since_join = 4
    assert engine._join_due(lane, waiting=1)  # their turn came

    alone = [run_all(engine, [request(host, p, max_tokens=16)])[0].text for p in PROMPTS]
    requests = [request(host, p, max_tokens=16) for p in PROMPTS]
    joined = run_all(engine, requests, stagger_s=0.002)
    assert [o.text for o in joined] == alone


def test_a_prefill_leaves_cache_room_only_for_the_tokens_its_jobs_can_take(host, make_engine):
    engine = make_engine()
    seen = []
    forward = engine._forward_prompts

    def recording(seqs):
        batch = forward(seqs)
        seen.append(batch.groups[0])
        return batch

    engine._forward_prompts = recording
    run_all(engine, [request(host, "The dog", max_tokens=5), request(host, "x", max_tokens=3)])
    (group,) = seen
    assert group.layers[0].key_buffer.shape[2] == group.length + 4  # four decode steps at most


def test_the_engine_returns_freed_memory_once_it_idles_after_work(host, make_engine):
    from workers.memory import release_free_memory

    if not release_free_memory():
        pytest.skip("this C library has no malloc_trim")
    engine = make_engine()
    time.sleep(0.3)
    at_start = engine.memory_releases  # the model's loading left freed memory too
    run_all(engine, [request(host, p) for p in PROMPTS])
    deadline = time.monotonic() + 5
    while engine.memory_releases == at_start and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.memory_releases == at_start + 1
    time.sleep(0.5)  # still idle: nothing more to give back
    assert engine.memory_releases == at_start + 1
