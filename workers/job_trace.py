"""A traced job's spans in the worker, children of the context stored with its row.

    llmq.queue_wait      created_at → the worker began claiming it
    llmq.job             claim → result stored and announced
      llmq.claim
      llmq.engine.admission   submitted to the engine → its prefill began (waiting for a slot)
      llmq.engine.prefill
      llmq.engine.decode      one span for its time in the batch: steps and batch sizes
      llmq.engine.score       a scoring job's (workers/score_runner.py) instead of the three
      llmq.result.write
      llmq.stream.publish
      POST                    a remote model's upstream requests (the httpx instrumentation)

queue_wait + job cover the job's life from its row's creation to its end. The engine spans are
made from timestamps the engine recorded (workers/engine_jobs.EngineTimings) once the job has
ended, so the engine, in its own process or thread, builds no span and steps no slower.
"""

import time
from concurrent.futures import Future
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, Status, StatusCode

from llmq import tracing
from workers.engine_jobs import EngineTimings


class JobTrace:
    def __init__(self, job: Any, parent: Context, claim_started_ns: int, claimed_ns: int) -> None:
        tracer = tracing.tracer()
        attributes = {"llmq.job_id": str(job.id), "llmq.attempt": job.attempts}
        wait = tracer.start_span(
            "llmq.queue_wait",
            context=parent,
            start_time=int(job.created_at.timestamp() * 1e9),
            attributes=attributes,
        )
        wait.end(end_time=claim_started_ns)
        attributes |= {"llmq.model": job.model, "llmq.queue": job.queue}
        self.span: Span = tracer.start_span(
            "llmq.job", context=parent, start_time=claim_started_ns, attributes=attributes
        )
        self._context = trace.set_span_in_context(self.span)
        self.child("llmq.claim", claim_started_ns, claimed_ns)
        self.store_started_ns = 0

    @classmethod
    def begin(cls, job: Any, claim_started_ns: int, claimed_ns: int) -> "JobTrace | None":
        """The job's trace, when tracing is on and the job was traced from its request."""
        if not tracing.enabled() or not job.trace_context:
            return None
        parent = tracing.context_of(job.trace_context)
        if parent is None:
            return None
        return cls(job, parent, claim_started_ns, claimed_ns)

    def traceparent(self) -> str | None:
        """The job's span as a W3C traceparent: work done for the job elsewhere (a remote
        model's upstream request) joins the trace under it."""
        return tracing.traceparent_of(self.span)

    def log_ids(self) -> dict[str, str]:
        """The ids for the job's log lines."""
        ctx = self.span.get_span_context()
        return {"trace_id": f"{ctx.trace_id:032x}", "span_id": f"{ctx.span_id:016x}"}

    def child(self, name: str, start_ns: int, end_ns: int, **attributes: Any) -> None:
        span = tracing.tracer().start_span(
            name, context=self._context, start_time=start_ns, attributes=attributes or None
        )
        span.end(end_time=max(end_ns, start_ns))

    def engine(self, timings: EngineTimings | None) -> None:
        """The engine's spans, from what it recorded (nothing for an engine that records none,
        a remote model's)."""
        if timings is None:
            return
        offset = time.time_ns() - time.monotonic_ns()

        def wall(seconds: float) -> int:
            return offset + int(seconds * 1e9)

        admitted = timings.admitted if timings.admitted is not None else timings.finished
        self.child("llmq.engine.admission", wall(timings.submitted), wall(admitted))
        if timings.admitted is None or timings.prefilled is None:
            return
        self.child("llmq.engine.prefill", wall(timings.admitted), wall(timings.prefilled))
        self.child(
            "llmq.engine.decode",
            wall(timings.prefilled),
            wall(timings.finished),
            **{
                "llmq.decode.steps": timings.steps,
                "llmq.decode.mean_batch_size": round(timings.mean_batch_size, 2),
                "llmq.decode.last_batch_size": timings.last_batch_size,
            },
        )

    def ended(self, output: Any, future: Future) -> None:
        """The engine has ended the job: its engine spans; the store starts now. With no
        output (it failed, or was cancelled) the job's span ends here."""
        if output is None:
            failure = future.exception()
            self.end(None if failure is None else f"{type(failure).__name__}: {failure}")
            return
        self.engine(output.timings)
        self.store_started_ns = time.time_ns()

    def stored(self, completion_tokens: int) -> None:
        self.child("llmq.result.write", self.store_started_ns, time.time_ns())
        self.span.set_attribute("llmq.completion_tokens", completion_tokens)

    def end(self, error: str | None = None) -> None:
        if error is not None:
            self.span.set_status(Status(StatusCode.ERROR, error))
        self.span.end()
