"""Evaluation runs end to end: API → Postgres → queue → real worker → grades → scores."""

import time
import uuid

import pytest
import torch

from db.session import session_scope
from db.tables import Job
from llmq.evals import gsm8k
from llmq.protocol import BATCH_PRIORITY
from tests.evals.conftest import EVAL_MODEL, GSM8K_TEST

MMLU_RUN = {
    "benchmark": "mmlu",
    "model": EVAL_MODEL,
    "num_fewshot": 1,
    "subjects": ["abstract_algebra", "anatomy"],
}
GSM8K_RUN = {"benchmark": "gsm8k", "model": EVAL_MODEL, "num_fewshot": 2, "limit": 2}


def start_run(client, body: dict) -> dict:
    response = client.post("/v1/evals", json=body)
    assert response.status_code == 202, response.text
    return response.json()


def wait_for_run(client, run_id: str, timeout: float = 180, until=("succeeded",)) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        run = client.get(f"/v1/evals/{run_id}").json()
        if run["status"] in until:
            return run
        assert run["status"] not in ("failed", "cancelled"), run
        assert time.monotonic() < deadline, f"run still {run['status']}: {run['progress']}"
        time.sleep(0.1)


def items_of(client, run_id: str) -> list[dict]:
    page = client.get(f"/v1/evals/{run_id}/items", params={"limit": 1000}).json()
    assert page["total"] == len(page["data"])
    return page["data"]


def direct_loglikelihood(model_path, prompt: str, continuation: str, max_length: int) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    whole = tokenizer(prompt + continuation).input_ids
    continuation_ids = whole[len(tokenizer(prompt).input_ids) :]
    row = whole[-(max_length + 1) :][:-1]
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([row])).logits[0], -1)
    picked = logprobs[-len(continuation_ids) :]
    return sum(picked[i, t].item() for i, t in enumerate(continuation_ids))


@pytest.fixture(scope="module")
def mmlu_run(client, eval_worker, eval_data) -> dict:
    run = start_run(client, MMLU_RUN)
    assert run["status"] == "queued"
    return wait_for_run(client, run["id"])


def test_mmlu_run_scores_every_question_by_loglikelihood(client, mmlu_run, tiny_model_path):
    assert mmlu_run["progress"]["total"] == 5
    assert mmlu_run["progress"]["done"] == 5
    assert mmlu_run["progress"]["failed"] == 0
    items = items_of(client, mmlu_run["id"])
    assert [(i["task"], i["doc_index"]) for i in items] == [
        ("abstract_algebra", 0),
        ("abstract_algebra", 1),
        ("abstract_algebra", 2),
        ("anatomy", 0),
        ("anatomy", 1),
    ]
    first = items[0]
    assert first["prompt"] == (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer: B\n\n"
        "Which value is a half?\nA. 0.50\nB. None\nC. 2\nD. 1/3\nAnswer:"
    )
    assert first["continuations"] == [" A", " B", " C", " D"]
    for item in items:
        lls = item["answer"]["loglikelihoods"]
        prediction = lls.index(max(lls))
        assert item["output"] == "ABCD"[prediction]
        assert item["correct"] == (str(prediction) == item["gold"])
        assert item["status"] == "succeeded"
    expected = direct_loglikelihood(tiny_model_path, first["prompt"], " C", 512)
    assert first["answer"]["loglikelihoods"][2] == pytest.approx(expected, abs=1e-4)


def test_mmlu_run_scores_are_means_over_items(client, mmlu_run):
    items = items_of(client, mmlu_run["id"])
    correct = [1.0 if i["correct"] else 0.0 for i in items]
    scores = mmlu_run["scores"]
    assert scores["metrics"]["acc"]["value"] == pytest.approx(sum(correct) / 5)
    assert scores["metrics"]["acc"]["n"] == 5
    assert scores["tasks"]["anatomy"]["acc"]["n"] == 2
    assert set(scores["groups"]) == {"stem"}  # both subjects are stem
    assert mmlu_run["finished_at"] is not None


def test_second_run_with_same_settings_reuses_every_result(client, mmlu_run):
    again = wait_for_run(client, start_run(client, MMLU_RUN)["id"])
    assert again["progress"]["reused"] == 5
    assert again["scores"] == mmlu_run["scores"]
    first = [i["job_id"] for i in items_of(client, mmlu_run["id"])]
    assert [i["job_id"] for i in items_of(client, again["id"])] == first


def test_gsm8k_run_generates_until_a_stop_and_grades_both_filters(
    client, eval_worker, eval_data, tiny_model_path, database_url
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = wait_for_run(client, start_run(client, GSM8K_RUN)["id"])
    items = items_of(client, run["id"])
    with session_scope(database_url) as session:  # background jobs, beside interactive ones
        assert {session.get(Job, uuid.UUID(i["job_id"])).priority for i in items} == {
            BATCH_PRIORITY
        }
    assert [i["gold"] for i in items] == [row["answer"] for row in GSM8K_TEST[:2]]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    for item in items:
        assert item["prompt"].count("Question:") == 3
        # Greedy from the prompt's last 512 - 256 tokens, cut at the first stop string.
        ids = tokenizer(item["prompt"]).input_ids[-(512 - 256) :]
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([ids]), max_new_tokens=256, do_sample=False, pad_token_id=3
            )
        text = tokenizer.decode(out[0][len(ids) :], skip_special_tokens=True)
        for stop in gsm8k.stop_strings("</s>"):
            text = text.split(stop)[0]
        text = text.replace("\x00", "\u2400")  # Postgres text holds no NUL; llmq shows ␀
        assert item["output"] == text
        answers, metrics = gsm8k.grade(text, item["gold"])
        assert item["answer"] == answers
        assert item["metrics"] == metrics
    strict = run["scores"]["metrics"]["exact_match,strict-match"]
    assert strict["n"] == 2


def test_cancel_run_cancels_its_jobs(client, eval_worker, eval_data):
    run = start_run(client, {**GSM8K_RUN, "limit": 3, "num_fewshot": 5})
    cancelled = client.post(f"/v1/evals/{run['id']}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"
    again = client.post(f"/v1/evals/{run['id']}/cancel")
    assert again.status_code == 409
    assert again.json()["error"]["message"] == f"evaluation run {run['id']} already cancelled"
    time.sleep(1)  # sweeps of the driver pass; none may feed a cancelled run
    for item in items_of(client, run["id"]):
        if item["job_id"] is not None:
            job = client.get(f"/v1/jobs/{item['job_id']}").json()
            assert job["status"] in ("cancelled", "succeeded")
    assert client.get(f"/v1/evals/{run['id']}").json()["status"] == "cancelled"


def test_start_run_with_unknown_model_or_subject_is_refused(client):
    response = client.post("/v1/evals", json={**MMLU_RUN, "model": "nope"})
    assert response.status_code == 404
    assert "model 'nope' is not served here" in response.json()["error"]["message"]
    response = client.post("/v1/evals", json={**MMLU_RUN, "subjects": ["cooking"]})
    assert response.status_code == 400
    assert "unknown MMLU subjects ['cooking']" in response.json()["error"]["message"]
    response = client.post("/v1/evals", json={**GSM8K_RUN, "dataset": "/etc"})
    assert response.status_code == 400
    assert "dataset '/etc' is not a folder name" in response.json()["error"]["message"]


def test_gsm8k_on_a_model_shorter_than_its_generation_fails_the_run(client, eval_data):
    run = start_run(client, {**GSM8K_RUN, "model": "tiny-llama"})  # 128 tokens of context
    failed = wait_for_run(client, run["id"], until=("failed",), timeout=30)
    assert "GSM8K needs more than the 256 it generates" in failed["error"]


def test_read_unknown_run_is_404(client):
    response = client.get("/v1/evals/3f2b9c4e-8a1d-4c2e-9f7a-1b2c3d4e5f60")
    assert response.status_code == 404
    assert response.json()["error"]["message"].startswith("no evaluation run with id")


def test_run_with_failed_items_ends_failed_and_scores_the_rest(client, eval_worker, eval_data):
    run = start_run(client, {**GSM8K_RUN, "limit": 3, "num_fewshot": 3})
    deadline = time.monotonic() + 60
    cancelled = None
    while cancelled is None:  # one item's job is cancelled from outside: that item fails
        assert time.monotonic() < deadline, "no item's job could be cancelled"
        for item in items_of(client, run["id"]):
            job_id = item["job_id"]
            if job_id and client.post(f"/v1/jobs/{job_id}/cancel").status_code == 200:
                cancelled = item
                break
        else:
            time.sleep(0.02)
    failed = wait_for_run(client, run["id"], until=("failed",))
    assert failed["error"].startswith("1 of 3 items failed")
    assert failed["progress"]["failed"] == 1
    assert failed["scores"]["metrics"], "the two other items are still scored"
    errors = {i["position"]: i["error"] for i in items_of(client, run["id"])}
    assert errors[cancelled["position"]].startswith("job cancelled")
    assert sum(e is not None for e in errors.values()) == 1
