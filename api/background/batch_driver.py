"""Moves batches through their states, from what Postgres holds, in any API process:

validating → in_progress: the input file is read and checked; its valid lines become jobs at
batch priority (the lines a sweep queues are stored in one transaction, each line's jobs with
its row, so a restart carries on where it stopped). Lines are released as the model's workers
take them, within the model's background window (api/background/window.py), which evaluation
runs share.
in_progress → finalizing → completed once every job has ended; expired when the completion
window passes first; cancelling → cancelled once no job of the batch is open. Finalizing
writes the output file (lines that succeeded) and the error file (the rest). A batch is driven
by one process at a time: each step locks its row.
"""

import json
import time
import uuid
from datetime import UTC, datetime, timedelta

import structlog
from sqlalchemy.orm import Session

from api.background.window import background_room
from api.intake.batch_input import REQUEST_TYPES, RequestLine, read_input
from api.intake.openai_requests import (
    ResponseShape,
    build_response,
    choice_requests,
    plan_request,
    stored_shape,
)
from api.intake.submit import PreparedJob, announce, prepare_generations, store_prepared
from api.schemas.openai import UsageInfo
from api.schemas.output_formats import resolve_named_schema
from db.queries import batches as batch_queries
from db.queries import files as file_queries
from db.queries.batches import BatchStatus
from db.session import get_sessionmaker, session_scope
from db.tables import Batch, BatchLine, Job
from llmq.errors import LlmqError
from llmq.periodic import PeriodicTask
from llmq.protocol import BATCH_PRIORITY, JobStatus
from llmq.tracing import collection_trace, current_traceparent, linked_trace

log = structlog.get_logger(__name__)

WINDOWS = {"24h": timedelta(hours=24)}


class BatchDriver:
    def __init__(self, state, interval_s: float, idle_interval_s: float | None = None) -> None:
        self.state = state  # the app's state: settings, registry, prompt counter, live queues
        self._sweeper = PeriodicTask(
            "llmq-batch-driver", interval_s, self.sweep, idle_interval_s=idle_interval_s
        )
        self._valid: dict[str, list[RequestLine]] = {}  # a running batch's checked input lines

    def start(self) -> None:
        self._sweeper.start()

    def stop(self) -> None:
        self._sweeper.stop()

    def wake(self) -> None:
        """Sweep now: a batch was created or cancelled."""
        self._sweeper.wake()

    @property
    def database_url(self) -> str:
        return self.state.settings.database_url

    def sweep(self) -> bool:
        """Drive every open batch; False when there was none."""
        with session_scope(self.database_url) as session:
            validating = batch_queries.batches_with_status(session, BatchStatus.VALIDATING)
            running = batch_queries.batches_with_status(
                session, BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING
            )
        for batch_id in validating:
            self.start_batch(batch_id)
        for batch_id in running:
            self.advance(batch_id)
        return bool(validating or running)

    def start_batch(self, batch_id: str) -> None:
        """Validate the input; the valid lines are then queued by `advance`."""
        with session_scope(self.database_url) as session:
            batch = batch_queries.lock_batch(session, batch_id, BatchStatus.VALIDATING)
            if batch is None:
                return
            valid, errors = self._read(session, batch)
            reported = [e.as_batch_error() for e in errors] or None
            if not valid:
                batch_queries.set_status(session, batch_id, BatchStatus.FAILED, errors=reported)
                log.info("batch failed validation", batch_id=batch_id, errors=len(errors))
                return
            total = len(valid) + len(errors)
            batch_queries.set_status(
                session, batch_id, BatchStatus.IN_PROGRESS, total=total, errors=reported
            )
        self.advance(batch_id)

    def advance(self, batch_id: str) -> None:
        """Queue lines as the window allows, apply a cancel or the expiry, finalize once all
        lines are queued and every job has ended."""
        with session_scope(self.database_url) as session:
            batch = batch_queries.lock_batch(
                session, batch_id, BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING
            )
            if batch is None:
                return
            open_statuses = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)
            if batch.status == BatchStatus.CANCELLING:
                # Queued lines are dropped; running ones finish and are kept.
                batch_queries.cancel_open_jobs(session, batch_id, (JobStatus.QUEUED.value,))
                final = BatchStatus.CANCELLED
            elif batch_queries.expired(batch, datetime.now(UTC)):
                batch_queries.cancel_open_jobs(session, batch_id, open_statuses)
                final = BatchStatus.EXPIRED
            else:
                final = BatchStatus.COMPLETED
                if batch_queries.line_count(session, batch_id) < self._valid_lines(batch):
                    # The batch's row stays locked meanwhile: no other process queues them too.
                    self._queue_lines(batch, session)
                    return
            if batch_queries.job_counts(session, batch_id).open:
                return
            batch_queries.set_status(session, batch_id, BatchStatus.FINALIZING)
            self._finalize(session, batch, batch_queries.lines(session, batch_id), final)
            self._valid.pop(batch_id, None)

    def _read(self, session: Session, batch: Batch):
        content = file_queries.file_content(session, batch.input_file_id)
        return read_input(content, batch.endpoint, self.state.registry)

    def _valid_input(self, session: Session, batch: Batch) -> list[RequestLine]:
        if batch.id not in self._valid:  # read once per process: input files never change
            self._valid[batch.id] = self._read(session, batch)[0]
        return self._valid[batch.id]

    def _queue_lines(self, batch: Batch, session: Session) -> None:
        room = background_room(session, self.state.registry, self.state.live_queues)
        left = sum(max(0, free) for free in room.values())
        if not left:  # the usual sweep while a batch runs: every window is full
            return
        submitted = batch_queries.submitted_lines(session, batch.id)
        todo = []
        for line in self._valid_input(session, batch):
            model = line.request.model  # validated: a served model
            if line.line in submitted or room[model] <= 0:
                continue
            room[model] -= 1
            todo.append(line)
            left -= 1
            if not left:
                break
        # Its own session: its commit must not end the lock's transaction. The lines of one
        # sweep are stored in one transaction, each line's jobs with its row, then sent
        # together. The batch is one trace; each line's jobs get their own, linked to it.
        with (
            get_sessionmaker(self.database_url)() as submitting,
            collection_trace("llmq.batch.queue", batch.id, **{"llmq.batch_id": batch.id}) as queued,
        ):
            checked = []
            for line in todo:
                with linked_trace("llmq.batch.line", queued):
                    checked.append((line, *self._prepare_line(submitting, batch, line)))
            prepared = [job for _, jobs, _ in checked for job in jobs]
            stored = store_prepared(submitting, prepared)
            job_ids = iter(job.id for job, _ in stored)
            rows = []
            for line, jobs, refusal in checked:
                body = line.body if refusal is None else {**line.body, "_error": refusal}
                ids = [next(job_ids) for _ in jobs]
                rows.append((line.line, line.custom_id, line.url, body, ids))
            batch_queries.add_lines(submitting, batch.id, rows)
            submitting.commit()
        announce(stored, prepared)
        if todo:
            log.debug("batch lines queued", batch_id=batch.id, lines=len(todo))

    def _prepare_line(
        self, session: Session, batch: Batch, line: RequestLine
    ) -> tuple[list[PreparedJob], dict | None]:
        """The line's jobs, checked and ready to store, or no jobs and why the line was
        refused."""
        try:
            request = resolve_named_schema(session, batch.owner, line.request)
            planned = plan_request(self.state, request)
            requests = choice_requests(
                planned, owner=batch.owner, priority=BATCH_PRIORITY, batch_id=batch.id
            )
            state = self.state
            # The line's own trace (linked_trace), current here: its jobs' rows keep it.
            prepared = prepare_generations(
                requests, state.prompt_counter, state.live_queues, current_traceparent()
            )
            return prepared, None
        except LlmqError as exc:  # e.g. the prompt does not fit the model's context
            return [], {"code": exc.code or exc.error_type, "message": exc.message}

    def _shape(self, line: BatchLine, jobs: list[Job]) -> ResponseShape:
        request = REQUEST_TYPES[line.url].model_validate(line.body)
        return stored_shape(self.state, request, jobs)

    def _valid_lines(self, batch: Batch) -> int:
        return batch.total - len(batch.errors or [])

    def _finalize(self, session: Session, batch: Batch, lines: list[BatchLine], final: str):
        jobs = batch_queries.jobs_of(session, batch.id)
        outputs, failures = [], []
        expired = final == BatchStatus.EXPIRED
        for line in lines:
            line_jobs = [jobs[j] for j in line.job_ids if j in jobs]
            record = _output_record(line, line_jobs, expired, self._shape)
            (outputs if record["error"] is None else failures).append(record)
        for error in batch.errors or []:
            failures.append(_failed_record(None, error["code"], error["message"], error["line"]))
        fields = {}
        if outputs:
            fields["output_file_id"] = self._write_file(session, batch, "output", outputs)
        if failures:
            fields["error_file_id"] = self._write_file(session, batch, "errors", failures)
        batch_queries.set_status(session, batch.id, final, **fields)
        log.info(
            "batch finished", batch_id=batch.id, status=final, ok=len(outputs), failed=len(failures)
        )

    def _write_file(self, session: Session, batch: Batch, kind: str, records: list[dict]) -> str:
        content = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records).encode()
        stored = file_queries.create_file(
            session,
            owner=batch.owner,
            filename=f"{batch.id}_{kind}.jsonl",
            purpose="batch_output",
            content=content,
        )
        return stored.id


def _output_record(line: BatchLine, jobs: list[Job], expired: bool, shape_of) -> dict:
    """One line of the output file, or of the error file when `error` is set."""
    if "_error" in line.body:
        problem = line.body["_error"]
        return _failed_record(line.custom_id, problem["code"], problem["message"], line.line)
    if jobs and all(job.status == JobStatus.SUCCEEDED.value for job in jobs):
        shape = shape_of(line, jobs)
        usage = UsageInfo()
        finished = []
        for index, job in enumerate(jobs):
            result = job.result
            usage.add(result.prompt_tokens if index == 0 else 0, result.completion_tokens)
            done = {
                "text": result.text,
                "finish_reason": result.finish_reason,
                "logprobs": result.logprobs,
            }
            finished.append((index, done))
        prefix = "chatcmpl" if shape.chat else "cmpl"
        created = int(jobs[0].finished_at.timestamp()) if jobs[0].finished_at else int(time.time())
        body = build_response(shape, f"{prefix}-{jobs[0].id.hex}", created, finished, usage)
        return {
            "id": f"batch_req_{uuid.uuid4().hex[:24]}",
            "custom_id": line.custom_id,
            "response": {
                "status_code": 200,
                "request_id": str(jobs[0].id),
                "body": body.model_dump(),
            },
            "error": None,
        }
    if expired and any(job.status == JobStatus.CANCELLED.value for job in jobs):
        return _failed_record(line.custom_id, "batch_expired", "the batch expired first", line.line)
    failed = next((job for job in jobs if job.status == JobStatus.FAILED.value), None)
    if failed is not None:
        message = f"generation failed ({failed.error_category}): {failed.error_message}"
        return _failed_record(line.custom_id, failed.error_category or "failed", message, line.line)
    return _failed_record(
        line.custom_id, "batch_cancelled", "the batch was cancelled first", line.line
    )


def _failed_record(custom_id: str | None, code: str, message: str, line: int | None) -> dict:
    return {
        "id": f"batch_req_{uuid.uuid4().hex[:24]}",
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message, "line": line},
    }


def expires_at(window: str) -> datetime:
    return datetime.now(UTC) + WINDOWS[window]
