"""Evaluation runs: GSM8K and MMLU scored exactly as lm-evaluation-harness 0.4.x scores them.

The flow, module by module:

- `datasets`: decides where a run may read (a folder inside the evaluation data directory, or
  the benchmark's hub dataset) and reads the benchmark data (local JSON Lines and CSV files, or
  the dataset hub) into plain records, keeping every cell as the text it is.
- `gsm8k`, `mmlu`: lm-eval's prompt formats, few-shot selection and answer checks, one module
  per benchmark; each module's docstring is the spec it follows.
- `planning`: turns a run's settings into items, each one job for the model's workers: a
  generation job (GSM8K) or a scoring job (MMLU: the log-likelihood of each answer).
- `grading`: reads a finished job's result back into an item's answer and metrics.
- `scores`: lm-eval's aggregation: means, standard errors, and size-weighted group scores.
- `report`, `cli`: the table, the JSON report and the chart people read.
"""
