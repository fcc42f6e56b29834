"""Evaluation benchmark and fidelity check, three ways on the same model, data and shots in one
run: lm-evaluation-harness's Hugging Face backend (the oracle), llmq's own GSM8K and MMLU eval
runs, and lm-eval's own OpenAI client (`--model local-completions`, its code unchanged) scoring
and generating through llmq's /v1/completions.

    python -m bench.evals [--benchmarks gsm8k,mmlu] [--limit N] [--num-fewshot N]
                          [--lmeval-python /path/to/venv/bin/python]

It prints each way's wall-clock time and compares every item with the HF backend's: the
prompt, MMLU's prediction (and how far the log-likelihoods are apart), GSM8K's generated text
and both filters' answers, and llmq's scores. Shots: GSM8K 5, MMLU 0 unless `--num-fewshot`.

The API client keeps `max_length - 1` tokens. GSM8K runs it with max_length = context + 1, so
that it keeps the HF backend's contexts (the last context - 256 tokens); MMLU with max_length =
context (a prompt of `context` tokens and the one token it generates would not fit), so its
windows are one token shorter than the HF backend's: they are the same windows where the
prompt and answer fit in context - 1 tokens, and only those items are held to the HF backend's
log-likelihoods. It adds BOS as the HF backend's tokenizer does (`add_bos_token=True`: without
it every log-likelihood differs).

lm-eval runs in its own virtual environment (it is not a dependency of llmq): `python -m venv V
&& V/bin/pip install "lm-eval[hf,api]" torch==2.13.0`, offline, on local task files from
bench/lmeval_tasks.py. llmq runs end to end: API, Postgres, Redis, one worker holding the model
(its start-up is not timed: a worker is a long-lived service). Both lm-eval columns include
lm-eval's own start-up (imports, data, tokenizer; the HF backend's model load).
"""

import argparse
import glob
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from bench.lmeval_tasks import lmeval_api_run, lmeval_run, write_tasks
from bench.models import SHARED_DATA, STORIES
from bench.stack import llmq_stack
from llmq.evals import mmlu

console = Console(width=160)
MODEL = "stories260K"
MAX_LENGTH = 512  # stories260K's max_position_embeddings, lm-eval's max_length for it
SHOTS = {"gsm8k": 5, "mmlu": 0}
# The API client's max_length (it keeps one token less): GSM8K's contexts as the HF backend's,
# MMLU's windows within the model's context with the one token the client asks for.
API_MAX_LENGTH = {"gsm8k": MAX_LENGTH + 1, "mmlu": MAX_LENGTH}
DEFAULT_LIMIT = 20
LL_TOLERANCE = 1e-4


def shots(benchmark: str, args) -> int:
    return SHOTS[benchmark] if args.num_fewshot is None else args.num_fewshot


def timed(command: list[str], env: dict, log: Path) -> float:
    """Run lm-eval, its output in `log` (shown if it fails); its wall-clock seconds."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log.open("w") as output:
        done = subprocess.run(command, env=env, stdout=output, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    if done.returncode:
        console.print(log.read_text()[-4000:])
        raise SystemExit(f"lm-eval failed ({done.returncode}): see {log}")
    return wall


def run_lmeval(python: str, tasks_dir: Path, benchmark: str, args, out: Path) -> float:
    task = f"llmq_{benchmark}"
    command, env = lmeval_run(
        python,
        args.model,
        tasks_dir,
        [task],
        num_fewshot=shots(benchmark, args),
        batch_size=args.batch_size,
        output_dir=out / task,
        limit=args.limit,
        max_length=MAX_LENGTH,
    )
    return timed(command, env, out / f"{task}.log")


def run_lmeval_api(base: str, tasks_dir: Path, benchmark: str, args, out: Path) -> float:
    """lm-eval's OpenAI client against llmq; its outputs go to `out`/llmq_<benchmark>."""
    task = f"llmq_{benchmark}"
    shutil.rmtree(out / task, ignore_errors=True)
    command, env = lmeval_api_run(
        args.lmeval_python,
        base,
        MODEL,
        Path(args.model),
        tasks_dir,
        [task],
        num_fewshot=shots(benchmark, args),
        max_length=API_MAX_LENGTH[benchmark],
        output_dir=out / task,
        limit=args.limit,
        num_concurrent=args.api_concurrency,
        batch_size=args.api_batch_size,
        api_key="unused",  # bench.stack runs the API with LLMQ_AUTH=off
    )
    return timed(command, env, out / f"{task}.log")


def lmeval_outputs(out: Path, task: str) -> tuple[dict, dict]:
    """(samples keyed by (task, doc id, filter), results) from lm-eval's --output_path."""
    samples = {}
    for path in glob.glob(str(out / task / "*" / "samples_*.jsonl")):
        name = Path(path).name.removeprefix("samples_").rsplit("_", 1)[0]
        name = name.removeprefix("llmq_mmlu_").removeprefix("llmq_")
        for line in Path(path).read_text().split("\n"):
            if not line:
                continue
            sample = json.loads(line)
            samples[(name, sample["doc_id"], sample["filter"])] = sample
    results_file = sorted(glob.glob(str(out / task / "*" / "results_*.json")))[-1]
    return samples, json.loads(Path(results_file).read_text())["results"]


def run_llmq(base: str, benchmark: str, args) -> tuple[float, dict, list[dict]]:
    body = {"benchmark": benchmark, "model": MODEL, "num_fewshot": shots(benchmark, args)}
    if args.limit:
        body["limit"] = args.limit
    with httpx.Client(base_url=base, timeout=60) as client:
        started = time.perf_counter()
        run = client.post("/v1/evals", json=body).json()
        while run["status"] not in ("succeeded", "failed", "cancelled"):
            time.sleep(0.5)
            run = client.get(f"/v1/evals/{run['id']}").json()
        wall = time.perf_counter() - started
        assert run["status"] == "succeeded", run
        items, offset = [], 0
        while offset < run["progress"]["total"]:
            page = client.get(
                f"/v1/evals/{run['id']}/items", params={"limit": 1000, "offset": offset}
            ).json()
            items += page["data"]
            offset += len(page["data"])
    return wall, run, items


def compare(benchmark: str, items: list[dict], samples: dict) -> tuple[dict, list[dict]]:
    """Item-by-item agreement with lm-eval, and the items that differ in any way."""
    checked = prompts = answers = texts = 0
    worst_ll = 0.0
    differences = []
    for item in items:
        first = "strict-match" if benchmark == "gsm8k" else "none"
        sample = samples.get((item["task"], item["doc_index"], first))
        if sample is None:
            continue
        checked += 1
        same_prompt = sample["arguments"]["gen_args_0"]["arg_0"] == item["prompt"]
        if benchmark == "mmlu":
            theirs = [float(r[0][0]) for r in sample["resps"]]
            ours = item["answer"]["loglikelihoods"]
            worst_ll = max(worst_ll, *(abs(a - b) for a, b in zip(theirs, ours, strict=True)))
            same_answer = same_text = mmlu.predict(theirs) == mmlu.predict(ours)
        else:
            theirs, ours = sample["resps"][0][0], item["output"]
            same_text = theirs == ours
            same_answer = all(
                samples[(item["task"], item["doc_index"], name)]["filtered_resps"][0]
                == item["answer"][name]
                for name in ("strict-match", "flexible-extract")
            )
        prompts += same_prompt
        answers += same_answer
        texts += same_text
        if not (same_prompt and same_answer and same_text):
            differences.append(
                {
                    "task": item["task"],
                    "doc_index": item["doc_index"],
                    "llmq": ours,
                    "lm-eval": theirs,
                }
            )
    return {
        "items": len(items),
        "compared": checked,
        "same prompt": prompts,
        "same answer": answers,
        "same text" if benchmark == "gsm8k" else "same prediction": texts,
        "max |Δ loglikelihood|": worst_ll,
    }, differences


def api_window(tokenizer, context: str, continuation: str) -> int:
    """How many tokens lm-eval's API client scores for a (context, continuation) before it
    truncates: its tokenization (trailing spaces move to the continuation; BOS added)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    return len(tokenizer(context + continuation).input_ids)


def compare_api(
    benchmark: str, api: dict, hf: dict, tokenizer, fits_in: int
) -> tuple[dict, list[dict]]:
    """lm-eval through llmq's API against lm-eval's HF backend, item by item. MMLU items whose
    every choice fits in `fits_in` tokens have the same window on both sides: the same
    prediction and log-likelihoods within LL_TOLERANCE are expected of them; longer ones are
    counted, not held to it."""
    first = "strict-match" if benchmark == "gsm8k" else "none"
    compared = prompts = answers = texts = fit = fit_answers = 0
    worst_fit = worst_all = 0.0
    differences = []
    for (task, doc, name), theirs in sorted(hf.items()):
        ours = api.get((task, doc, name))
        if name != first or ours is None:
            continue
        compared += 1
        same_prompt = ours["arguments"] == theirs["arguments"]
        prompts += same_prompt
        if benchmark == "gsm8k":
            same_text = ours["resps"][0][0] == theirs["resps"][0][0]
            same_answer = all(
                api[(task, doc, f)]["filtered_resps"] == hf[(task, doc, f)]["filtered_resps"]
                for f in ("strict-match", "flexible-extract")
            )
            texts += same_text
            fits = same = True
            ours_out, theirs_out = ours["resps"][0][0], theirs["resps"][0][0]
        else:
            ours_out = [float(r[0][0]) for r in ours["resps"]]
            theirs_out = [float(r[0][0]) for r in theirs["resps"]]
            gap = max(abs(a - b) for a, b in zip(ours_out, theirs_out, strict=True))
            same_answer = mmlu.predict(ours_out) == mmlu.predict(theirs_out)
            windows = [
                api_window(tokenizer, a["arg_0"], a["arg_1"]) for a in theirs["arguments"].values()
            ]
            fits = max(windows) <= fits_in
            worst_all = max(worst_all, gap)
            same = same_answer and gap <= LL_TOLERANCE
            if fits:
                fit += 1
                fit_answers += same_answer
                worst_fit = max(worst_fit, gap)
            same_text = True
        answers += same_answer
        if not (same_prompt and same_answer and same_text and (same or not fits)):
            differences.append(
                {"task": task, "doc_index": doc, "fits": fits, "api": ours_out, "hf": theirs_out}
            )
    agreement = {
        "compared": compared,
        "same prompt": prompts,
        "same answer": answers,
        "same text": texts if benchmark == "gsm8k" else "-",
        "window fits": fit if benchmark == "mmlu" else "-",
        "same answer, fits": fit_answers if benchmark == "mmlu" else "-",
        "max |Δ ll|, fits": f"{worst_fit:.2e}" if benchmark == "mmlu" else "-",
        "max |Δ ll|, all": f"{worst_all:.2e}" if benchmark == "mmlu" else "-",
    }
    return agreement, differences


def score_pairs(benchmark: str, run: dict, results: dict) -> list[tuple[str, float, float]]:
    if benchmark == "gsm8k":
        ours = run["scores"]["metrics"]
        return [(name, ours[name]["value"], results["llmq_gsm8k"][name]) for name in ours]
    pairs = [("acc", run["scores"]["metrics"]["acc"]["value"], results["llmq_mmlu"]["acc,none"])]
    for group, metrics in sorted(run["scores"]["groups"].items()):
        pairs.append(
            (f"acc {group}", metrics["acc"]["value"], results[f"llmq_mmlu_{group}"]["acc,none"])
        )
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmarks", default="gsm8k,mmlu")
    parser.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_LIMIT,
        help=f"items per task (MMLU subject); 0: all (default {DEFAULT_LIMIT})",
    )
    parser.add_argument(
        "--num-fewshot", type=int, default=None, help="shots for all (default GSM8K 5, MMLU 0)"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="lm-eval's batch size")
    parser.add_argument("--model", default=str(STORIES))
    parser.add_argument("--data", default=str(SHARED_DATA))
    parser.add_argument("--lmeval-python", default=os.environ.get("LMEVAL_PYTHON", "python"))
    parser.add_argument(
        "--lmeval-from",
        default=None,
        help="an earlier run's folder: reuse its lm-eval HF backend outputs",
    )
    parser.add_argument(
        "--api-concurrency", type=int, default=8, help="the API client's num_concurrent"
    )
    parser.add_argument(
        "--api-batch-size", type=int, default=8, help="the API client's prompts per request"
    )
    args = parser.parse_args()
    args.limit = args.limit or None
    benchmarks = [b for b in args.benchmarks.split(",") if b]
    workdir = Path(args.lmeval_from or tempfile.mkdtemp(prefix="llmq-bench-evals-"))
    tasks_dir = write_tasks(Path(args.data), workdir / "tasks")

    walls_file = workdir / "lmeval_walls.json"
    lmeval_wall = json.loads(walls_file.read_text()) if walls_file.exists() else {}
    for benchmark in benchmarks:
        if benchmark in lmeval_wall:
            continue
        console.print(f"lm-eval, HF backend: {benchmark} …")
        lmeval_wall[benchmark] = run_lmeval(args.lmeval_python, tasks_dir, benchmark, args, workdir)
        walls_file.write_text(json.dumps(lmeval_wall))

    spec = {
        "id": MODEL,
        "source": args.model,
        "devices": ["cpu"],
        "max_batch_size": 64,
        "context_length": MAX_LENGTH,
    }
    llmq, api_wall = {}, {}
    api_out = workdir / "api"
    with llmq_stack([spec], workdir, [MODEL], LLMQ_EVAL_DATA_DIR=args.data) as (base, _):
        for benchmark in benchmarks:
            console.print(f"llmq: {benchmark} …")
            llmq[benchmark] = run_llmq(base, benchmark, args)
            console.print(f"lm-eval, OpenAI client → llmq: {benchmark} …")
            api_wall[benchmark] = run_lmeval_api(base, tasks_dir, benchmark, args, api_out)

    from transformers import AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # prompts longer than the model's are counted
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    timing = Table(title=f"wall clock, {MODEL}, limit {args.limit}")
    columns = ("benchmark", "shots", "items", "llmq eval s", "lm-eval HF s", "lm-eval → llmq API s")
    for column in columns:
        timing.add_column(column, justify="right")
    fidelity = Table(title="llmq eval runs vs lm-eval HF backend, item by item")
    via_api = Table(title="lm-eval through llmq's API vs lm-eval HF backend, item by item")
    scores = Table(title="scores")
    for column in ("benchmark", "metric", "llmq", "lm-eval HF", "equal", "lm-eval → llmq API"):
        scores.add_column(column, justify="right")
    report = {}
    for benchmark in benchmarks:
        wall, run, items = llmq[benchmark]
        samples, results = lmeval_outputs(workdir, f"llmq_{benchmark}")
        agreement, differences = compare(benchmark, items, samples)
        api_samples, api_results = lmeval_outputs(api_out, f"llmq_{benchmark}")
        api_agreement, api_differences = compare_api(
            benchmark, api_samples, samples, tokenizer, API_MAX_LENGTH["mmlu"] - 1
        )
        report[benchmark] = {
            "shots": shots(benchmark, args),
            "llmq_s": wall,
            "lmeval_s": lmeval_wall[benchmark],
            "lmeval_api_s": api_wall[benchmark],
            **agreement,
            "differences": differences,
            "api": {**api_agreement, "differences": api_differences},
        }
        timing.add_row(
            benchmark, str(shots(benchmark, args)), str(len(items)), f"{wall:.1f}",
            f"{lmeval_wall[benchmark]:.1f}", f"{api_wall[benchmark]:.1f}",
        )  # fmt: skip
        if not via_api.columns:
            via_api.add_column("benchmark")
            for key in api_agreement:
                via_api.add_column(key, justify="right")
        via_api.add_row(benchmark, *(str(v) for v in api_agreement.values()))
        if not fidelity.columns:
            fidelity.add_column("benchmark")
            for key in agreement:
                fidelity.add_column(key, justify="right")
        fidelity.add_row(benchmark, *(str(v) for v in agreement.values()))
        via = [pair[2] for pair in score_pairs(benchmark, run, api_results)]
        for (name, ours, theirs), api_score in zip(
            score_pairs(benchmark, run, results), via, strict=True
        ):
            scores.add_row(
                benchmark, name, f"{ours:.6f}", f"{theirs:.6f}", str(abs(ours - theirs) < 1e-9),
                f"{api_score:.6f}",
            )  # fmt: skip
    console.print(timing, fidelity, via_api, scores)
    (workdir / "report.json").write_text(json.dumps(report, indent=2))
    console.print(f"lm-eval outputs and report.json in {workdir}")


if __name__ == "__main__":
    main()
