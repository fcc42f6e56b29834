"""lm-evaluation-harness as a real client of llmq's OpenAI API: its own `local-completions`
model (code unchanged) sends token ids to a real API and worker holding stories260K, and gets
the answers of its Hugging Face backend on the same model.

- GSM8K 5-shot, the client's max_length = context + 1: it keeps the HF backend's contexts (the
  last context - 256 tokens), so the generated text and both filters' answers are the same.
- MMLU 0-shot, max_length = context: windows of at most context - 1 tokens (the one token the
  client asks for must fit); where the prompt fits, they are the HF backend's: the same
  predictions, log-likelihoods within 1e-4. BOS is added as the HF backend's tokenizer does.
- MMLU 5-shot: the client left-truncates every window. A recording proxy between client and
  API keeps the exact token ids it sent; every prompt token's log-probability llmq returned,
  and every log-likelihood the client logged, equal the model's own on that window
  (transformers, in this process).

Runs only where LLMQ_LMEVAL_PYTHON names a python with lm-eval (`pip install "lm-eval[hf,api]"
torch==2.13.0`) and ../shared has stories260K and the GSM8K and MMLU data.
"""

import json
import os
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import yaml

from bench.evals import SHARED_DATA, lmeval_outputs
from bench.lmeval_tasks import lmeval_api_run, lmeval_run, write_tasks
from bench.models import STORIES
from llmq.evals import mmlu
from tests.factories import ADMIN_KEY, start_api, start_worker, stop_worker, wait_for_queue

LMEVAL_PYTHON = os.environ.get("LLMQ_LMEVAL_PYTHON")
MODEL = "stories260K"
CONTEXT = 512  # stories260K's
LIMIT = 3
SUBJECTS = ["abstract_algebra", "anatomy"]  # 0-shot prompts that fit in CONTEXT - 1 tokens
LL_TOLERANCE = 1e-4

pytestmark = [
    pytest.mark.skipif(
        not LMEVAL_PYTHON, reason="set LLMQ_LMEVAL_PYTHON to a python that has lm-eval installed"
    ),
    pytest.mark.skipif(
        not (SHARED_DATA / "mmlu").is_dir(),
        reason=f"needs the GSM8K and MMLU data under {SHARED_DATA}",
    ),
]


class Recorder:
    """An HTTP proxy in front of the API that keeps every (request, response) body pair."""

    def __init__(self, target: str):
        self.target = target
        self.exchanges: list[tuple[dict, int, dict]] = []
        lock = threading.Lock()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                headers = {"Content-Type": "application/json"}
                if authorization := self.headers.get("Authorization"):
                    headers["Authorization"] = authorization
                reply = httpx.post(
                    recorder.target + self.path, content=body, headers=headers, timeout=300
                )
                try:
                    answer = reply.json()
                except ValueError:
                    answer = {"text": reply.text}
                with lock:
                    recorder.exchanges.append((json.loads(body), reply.status_code, answer))
                self.send_response(reply.status_code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply.content)))
                self.end_headers()
                self.wfile.write(reply.content)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def stories_api(database_url, redis_url, tmp_path_factory):
    """A real API and worker serving stories260K (auth on: the client sends the suite's key)."""
    models_file = tmp_path_factory.mktemp("stories") / "models.yaml"
    spec = {
        "id": MODEL,
        "source": str(STORIES),
        "devices": ["cpu"],
        "max_batch_size": 64,
        "context_length": CONTEXT,
    }
    models_file.write_text(yaml.safe_dump({"models": [spec]}))
    env = {"LLMQ_MODELS_FILE": str(models_file)}
    worker = start_worker(MODEL, **env)
    try:
        wait_for_queue(f"llmq.{MODEL}.cpu", worker)
        api, base_url = start_api(**env)
        try:
            yield base_url
        finally:
            stop_worker(api)
    finally:
        stop_worker(worker)


@pytest.fixture(scope="module")
def runs(stories_api, tmp_path_factory) -> dict:
    """lm-eval's HF backend and three runs of its API client, all at once; each one's samples
    keyed by (task, doc id, filter), and the 5-shot run's recorded exchanges."""
    out = tmp_path_factory.mktemp("lmeval-client")
    tasks_dir = write_tasks(SHARED_DATA, out / "tasks")
    subjects = [f"llmq_mmlu_{s}" for s in SUBJECTS]
    recorder = Recorder(stories_api)
    commands = {
        # No --num_fewshot: each task's own, GSM8K 5 and MMLU 0.
        "hf": lmeval_run(
            LMEVAL_PYTHON, STORIES, tasks_dir, ["llmq_gsm8k", *subjects],
            num_fewshot=None, batch_size=64, output_dir=out / "hf", limit=LIMIT,
            max_length=CONTEXT,
        ),
    }  # fmt: skip
    for name, tasks, shots, max_length, base in (
        ("gsm8k", ["llmq_gsm8k"], 5, CONTEXT + 1, stories_api),
        ("mmlu0", subjects, 0, CONTEXT, stories_api),
        ("mmlu5", subjects, 5, CONTEXT, recorder.url),
    ):
        commands[name] = lmeval_api_run(
            LMEVAL_PYTHON, base, MODEL, STORIES, tasks_dir, tasks,
            num_fewshot=shots, max_length=max_length, output_dir=out / name, limit=LIMIT,
            num_concurrent=4, batch_size=2, api_key=ADMIN_KEY,
        )  # fmt: skip
    processes = {}
    try:
        for name, (command, env) in commands.items():
            with (out / f"{name}.log").open("w") as log:
                processes[name] = subprocess.Popen(
                    command, env=env, stdout=log, stderr=subprocess.STDOUT
                )
        for name, process in processes.items():
            code = process.wait(timeout=600)
            assert code == 0, (out / f"{name}.log").read_text()[-3000:]
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
        recorder.close()
    samples = {name: lmeval_outputs(out, name)[0] for name in commands}
    return samples | {"exchanges": recorder.exchanges}


def test_gsm8k_answers_match_the_hf_backend(runs):
    hf, api = runs["hf"], runs["gsm8k"]
    keys = [key for key in hf if key[0] == "gsm8k"]
    assert len(keys) == 2 * LIMIT and set(keys) == set(api)
    for key in keys:
        assert api[key]["arguments"] == hf[key]["arguments"]
        assert api[key]["filtered_resps"] == hf[key]["filtered_resps"], key
        assert api[key]["resps"] == hf[key]["resps"], key  # the generated text itself


def test_mmlu_zero_shot_matches_the_hf_backend(runs):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    hf, api = runs["hf"], runs["mmlu0"]
    keys = [key for key in hf if key[0] in SUBJECTS]
    assert len(keys) == len(SUBJECTS) * LIMIT and set(keys) == set(api)
    for key in keys:
        assert api[key]["arguments"] == hf[key]["arguments"]
        for args in hf[key]["arguments"].values():  # every window fits: the same on both sides
            assert len(tokenizer(args["arg_0"] + args["arg_1"]).input_ids) < CONTEXT
        theirs = [float(resp[0][0]) for resp in hf[key]["resps"]]
        ours = [float(resp[0][0]) for resp in api[key]["resps"]]
        assert ours == pytest.approx(theirs, abs=LL_TOLERANCE), key
        assert mmlu.predict(ours) == mmlu.predict(theirs), key
        assert api[key]["acc"] == hf[key]["acc"]


def lm_eval_window(tokenizer, context: str, continuation: str) -> tuple[tuple[int, ...], int]:
    """The window lm-eval's API client sends for a (context, continuation), and where the
    continuation starts in it (TemplateLM._encode_pair, then TemplateAPI's left truncation to
    max_length - 1 tokens). The test checks it against the windows the proxy recorded."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation).input_ids  # BOS added: add_bos_token=True
    context_length = len(tokenizer(context).input_ids)
    keep = CONTEXT - 1
    start = max(0, len(whole) - keep)
    return tuple(whole[start:]), context_length - start


def test_mmlu_five_shot_truncated_windows_score_as_the_model_does(runs):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()

    def logprobs(window: tuple[int, ...]) -> list[float]:
        """The model's log-probability of each token after the first, given those before."""
        with torch.no_grad():
            logits = model(torch.tensor([window])).logits[0].float()
        scores = torch.log_softmax(logits, dim=-1)
        return [scores[i - 1, window[i]].item() for i in range(1, len(window))]

    # What the client sent, and what llmq answered: per window, each prompt token's logprob.
    returned: dict[tuple[int, ...], list[float]] = {}
    for request, status, response in runs["exchanges"]:
        assert status == 200, (request, response)
        assert request["echo"] is True and request["max_tokens"] == 1
        assert request["logprobs"] == 1 and request["temperature"] == 0
        prompts = request["prompt"]
        choices = sorted(response["choices"], key=lambda choice: choice["index"])
        assert len(choices) == len(prompts)
        for prompt, choice in zip(prompts, choices, strict=True):
            token_logprobs = choice["logprobs"]["token_logprobs"]
            assert len(token_logprobs) == len(prompt) + 1  # the prompt, then the token generated
            assert token_logprobs[0] is None
            returned[tuple(prompt)] = token_logprobs[1 : len(prompt)]

    samples = runs["mmlu5"]
    assert len(samples) == len(SUBJECTS) * LIMIT
    expected: dict[tuple[int, ...], int] = {}  # window: where its continuation starts
    for sample in samples.values():
        for args in sample["arguments"].values():
            window, start = lm_eval_window(tokenizer, args["arg_0"], args["arg_1"])
            expected[window] = start
    # The reconstruction is exactly what the client sent, and every window was left-truncated.
    assert set(expected) == set(returned)
    assert all(len(window) == CONTEXT - 1 for window in expected)

    model_logprobs = {window: logprobs(window) for window in expected}
    for window, theirs in model_logprobs.items():
        assert returned[window] == pytest.approx(theirs, abs=LL_TOLERANCE)
    for (task, doc, _), sample in samples.items():
        for args, resp in zip(sample["arguments"].values(), sample["resps"], strict=True):
            window, start = lm_eval_window(tokenizer, args["arg_0"], args["arg_1"])
            own = sum(model_logprobs[window][start - 1 :])  # the continuation's tokens
            assert float(resp[0][0]) == pytest.approx(own, abs=LL_TOLERANCE), (task, doc)
