"""The evaluation API: start, read, page through and cancel benchmark runs."""

import uuid
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request, status

from api.deps import ApiKeyDep, RegistryDep, SessionDep, SettingsDep
from api.http.auth import Caller
from api.http.limits import admit
from api.intake.submit import resolve_model
from api.schemas.evals import (
    EvalItemPublic,
    EvalItemsPublic,
    EvalProgress,
    EvalRunCreate,
    EvalRunPublic,
    EvalRunsPublic,
    EvalScores,
)
from db.queries import evals as eval_queries
from db.tables import EvalItem, EvalRun
from llmq.errors import EvalRunNotCancellable, EvalRunNotFound, InvalidRequest
from llmq.evals.datasets import resolve_dataset
from llmq.evals.grading import is_correct
from llmq.evals.planning import Benchmark, RunSettings, check_data
from llmq.evals.summary import summarize

router = APIRouter(prefix="/v1/evals", tags=["evals"])


def run_public(session, request: Request, run: EvalRun) -> EvalRunPublic:
    if run.status in eval_queries.RunStatus.ACTIVE:
        request.app.state.eval_driver.grade(run.id)  # read what the jobs say now
        session.expire_all()
    progress = eval_queries.progress(session, run.id, run.total)
    benchmark = Benchmark(run.benchmark)
    scores = run.scores
    if scores is None and progress.graded:
        scores = summarize(benchmark, eval_queries.graded_metrics(session, run.id))
    rate = eta = None
    if run.started_at is not None and progress.graded_here:
        end = run.finished_at or datetime.now(UTC)
        elapsed = (end - run.started_at).total_seconds()
        rate = progress.graded_here / elapsed if elapsed > 0 else None
        if rate and run.status in eval_queries.RunStatus.ACTIVE:
            eta = (progress.total - progress.graded) / rate
    return EvalRunPublic(
        id=run.id,
        benchmark=run.benchmark,
        model=run.model,
        status=run.status,
        num_fewshot=run.num_fewshot,
        limit=run.limit,
        subjects=run.subjects,
        dataset=run.dataset,
        created_at=run.created_at,
        started_at=run.started_at,
        finished_at=run.finished_at,
        progress=EvalProgress(
            total=progress.total,
            done=progress.graded,
            failed=progress.failed,
            in_flight=progress.in_flight,
            reused=progress.reused,
            items_per_s=rate,
            eta_s=eta,
        ),
        scores=EvalScores.model_validate(scores) if scores else None,
        error=run.error,
    )


def item_public(benchmark: Benchmark, item: EvalItem, job_status: str | None) -> EvalItemPublic:
    return EvalItemPublic(
        position=item.position,
        task=item.task,
        doc_index=item.doc_index,
        status=eval_queries.item_state(job_status, item),
        prompt=item.input["prompt"],
        continuations=item.input.get("continuations"),
        output=item.output,
        answer=(item.details or {}).get("answers") or item.details,
        gold=item.gold,
        correct=is_correct(benchmark, item.metrics),
        metrics=item.metrics,
        error=item.error,
        job_id=item.job_id,
        reused=item.reused,
    )


def get_run_or_404(session, caller: Caller, run_id: uuid.UUID) -> EvalRun:
    """The run if the caller may see it: another key's run is 404, as if it did not exist."""
    run = eval_queries.get_run(session, run_id)
    if run is None or not caller.can_see(run.owner):
        raise EvalRunNotFound(run_id)
    return run


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=EvalRunPublic)
def create_eval_run(
    body: EvalRunCreate,
    session: SessionDep,
    registry: RegistryDep,
    settings: SettingsDep,
    request: Request,
    caller: ApiKeyDep,
) -> EvalRunPublic:
    """Start a benchmark run: it is stored, then its items run as jobs on the model's queue.
    Its jobs belong to the key: they count toward its usage, quota and concurrent jobs."""
    spec = resolve_model(registry, body.model)
    admit(session, caller.owner, caller.limits, jobs=0)  # the quota; the driver keeps the rest
    benchmark = Benchmark(body.benchmark)
    if body.subjects is not None and benchmark is not Benchmark.MMLU:
        raise InvalidRequest("subjects apply to mmlu only; remove them", param="subjects")
    if spec.remote is not None and not spec.remote.prompt_logprobs and benchmark.scores:
        raise InvalidRequest(
            f"{benchmark.value} scores each answer by its log-likelihood, and {spec.id} is a "
            "remote model whose upstream is not known to echo prompt log-probabilities (set "
            "remote.prompt_logprobs in models.yaml where it does). Run gsm8k on it, or "
            f"{benchmark.value} on a model llmq serves itself",
            param="model",
        )
    run_settings = RunSettings(
        benchmark,
        body.num_fewshot if body.num_fewshot is not None else benchmark.default_fewshot,
        body.limit,
        body.subjects,
        resolve_dataset(benchmark.value, body.dataset, settings.eval_data_root),
    )
    check_data(run_settings)  # a missing file or a link out of the data directory: 400 now
    run = eval_queries.create_run(
        session,
        eval_queries.NewRun(
            benchmark=benchmark.value,
            model=spec.id,
            num_fewshot=run_settings.num_fewshot,
            limit=body.limit,
            subjects=body.subjects,
            # Its name inside the data directory (or the hub id), never a server path: the
            # driver resolves it again, under the same rules, when it plans the run.
            dataset=run_settings.dataset.name,
            owner=caller.owner,
        ),
    )
    # Built before the commit: once the run is stored, answering must not need Postgres.
    public = run_public(session, request, run)
    session.commit()
    request.app.state.eval_driver.wake()  # plan it now, not at the idle driver's next look
    return public


@router.get("", response_model=EvalRunsPublic)
def list_eval_runs(
    session: SessionDep,
    request: Request,
    caller: ApiKeyDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> EvalRunsPublic:
    """The key's evaluation runs (an admin's: everyone's), newest first."""
    runs, total = eval_queries.list_runs(session, limit, offset, owner=caller.sees_only)
    data = [run_public(session, request, run) for run in runs]
    return EvalRunsPublic(data=data, total=total, limit=limit, offset=offset)


@router.get("/{run_id}", response_model=EvalRunPublic)
def read_eval_run(
    run_id: uuid.UUID, session: SessionDep, request: Request, caller: ApiKeyDep
) -> EvalRunPublic:
    """A run: status, items done of total, items/s, ETA, and its scores so far."""
    return run_public(session, request, get_run_or_404(session, caller, run_id))


@router.get("/{run_id}/items", response_model=EvalItemsPublic)
def list_eval_items(
    run_id: uuid.UUID,
    session: SessionDep,
    caller: ApiKeyDep,
    task: Annotated[str | None, Query(max_length=100)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> EvalItemsPublic:
    """The run's items in order: prompt, model output, extracted answer, gold, correct."""
    run = get_run_or_404(session, caller, run_id)
    rows, total = eval_queries.list_items(session, run_id, task=task, limit=limit, offset=offset)
    benchmark = Benchmark(run.benchmark)
    data = [item_public(benchmark, item, job_status) for item, job_status in rows]
    return EvalItemsPublic(data=data, total=total, limit=limit, offset=offset)


@router.post("/{run_id}/cancel", response_model=EvalRunPublic)
def cancel_eval_run(
    run_id: uuid.UUID, session: SessionDep, request: Request, caller: ApiKeyDep
) -> EvalRunPublic:
    """Cancel a run: its queued jobs never run and its running ones leave their batch."""
    run = get_run_or_404(session, caller, run_id)
    if not eval_queries.cancel_run(session, run_id):
        session.rollback()
        raise EvalRunNotCancellable(f"evaluation run {run_id} already {run.status}")
    session.commit()
    session.refresh(run)
    return run_public(session, request, run)
