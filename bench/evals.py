"""Evaluation benchmark and fidelity check: llmq's GSM8K and MMLU runs against
lm-evaluation-harness's Hugging Face backend, on the same model, data and shots, in one run.

    python -m bench.evals [--benchmarks gsm8k,mmlu] [--limit N] [--num-fewshot 5]
                          [--lmeval-python /path/to/venv/bin/python]

It prints each side's wall-clock time and compares every item: the prompt, MMLU's prediction
(and how far the log-likelihoods are apart), GSM8K's generated text and both filters' answers,
and the final scores. lm-eval runs in its own virtual environment (it is not a dependency of
llmq): `python -m venv V && V/bin/pip install "lm-eval[hf]" torch==2.13.0`, offline, on local
task files from bench/lmeval_tasks.py. llmq runs end to end: API, Postgres, Redis, one worker
holding the model (its start-up is not timed: a worker is a long-lived service).
"""

import argparse
import glob
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from bench.lmeval_tasks import lmeval_run, write_tasks
from bench.models import SHARED_STORIES
from bench.stack import llmq_stack
from llmq.evals import mmlu

console = Console(width=160)
SHARED_DATA = SHARED_STORIES.parent.parent / "data"
MODEL = "stories260K"
MAX_LENGTH = 512  # stories260K's max_position_embeddings, lm-eval's max_length for it


def run_lmeval(python: str, tasks_dir: Path, task: str, args, out: Path) -> float:
    command, env = lmeval_run(
        python,
        args.model,
        tasks_dir,
        [task],
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        output_dir=out / task,
        limit=args.limit,
        max_length=MAX_LENGTH,
    )
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


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
    body = {"benchmark": benchmark, "model": MODEL, "num_fewshot": args.num_fewshot}
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
    parser.add_argument("--limit", type=int, default=None, help="items per task (MMLU subject)")
    parser.add_argument("--num-fewshot", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64, help="lm-eval's batch size")
    parser.add_argument("--model", default=str(SHARED_STORIES))
    parser.add_argument("--data", default=str(SHARED_DATA))
    parser.add_argument("--lmeval-python", default=os.environ.get("LMEVAL_PYTHON", "python"))
    parser.add_argument(
        "--lmeval-from", default=None, help="an earlier run's folder: reuse its lm-eval outputs"
    )
    args = parser.parse_args()
    benchmarks = [b for b in args.benchmarks.split(",") if b]
    workdir = Path(args.lmeval_from or tempfile.mkdtemp(prefix="llmq-bench-evals-"))
    tasks_dir = write_tasks(Path(args.data), workdir / "tasks")

    walls_file = workdir / "lmeval_walls.json"
    lmeval_wall = json.loads(walls_file.read_text()) if walls_file.exists() else {}
    for benchmark in benchmarks:
        if benchmark in lmeval_wall:
            continue
        console.print(f"lm-eval: {benchmark} …")
        task = f"llmq_{benchmark}"
        lmeval_wall[benchmark] = run_lmeval(args.lmeval_python, tasks_dir, task, args, workdir)
        walls_file.write_text(json.dumps(lmeval_wall))

    spec = {
        "id": MODEL,
        "source": args.model,
        "devices": ["cpu"],
        "max_batch_size": 64,
        "context_length": MAX_LENGTH,
    }
    llmq = {}
    with llmq_stack([spec], workdir, [MODEL], LLMQ_EVAL_DATA_DIR=args.data) as (base, _):
        for benchmark in benchmarks:
            console.print(f"llmq: {benchmark} …")
            llmq[benchmark] = run_llmq(base, benchmark, args)

    timing = Table(title=f"wall clock, {MODEL}, {args.num_fewshot}-shot, limit {args.limit}")
    for column in ("benchmark", "items", "llmq s", "lm-eval s", "lm-eval / llmq"):
        timing.add_column(column, justify="right")
    fidelity = Table(title="llmq vs lm-eval, item by item")
    scores = Table(title="scores")
    for column in ("benchmark", "metric", "llmq", "lm-eval", "equal"):
        scores.add_column(column, justify="right")
    report = {}
    for benchmark in benchmarks:
        wall, run, items = llmq[benchmark]
        samples, results = lmeval_outputs(workdir, f"llmq_{benchmark}")
        agreement, differences = compare(benchmark, items, samples)
        report[benchmark] = {
            "llmq_s": wall,
            "lmeval_s": lmeval_wall[benchmark],
            **agreement,
            "differences": differences,
        }
        ratio = lmeval_wall[benchmark] / wall
        timing.add_row(
            benchmark, str(len(items)), f"{wall:.1f}", f"{lmeval_wall[benchmark]:.1f}",
            f"{ratio:.2f}x",
        )  # fmt: skip
        if not fidelity.columns:
            fidelity.add_column("benchmark")
            for key in agreement:
                fidelity.add_column(key, justify="right")
        fidelity.add_row(benchmark, *(str(v) for v in agreement.values()))
        for name, ours, theirs in score_pairs(benchmark, run, results):
            scores.add_row(
                benchmark, name, f"{ours:.6f}", f"{theirs:.6f}", str(abs(ours - theirs) < 1e-9)
            )
    console.print(timing, fidelity, scores)
    (workdir / "report.json").write_text(json.dumps(report, indent=2))
    console.print(f"lm-eval outputs and report.json in {workdir}")


if __name__ == "__main__":
    main()
