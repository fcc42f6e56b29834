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

queue_wait + job cover the job's life from its row's creation to its end. Every span is made
once the work it times is done, from timestamps recorded as it went on (the engine's in
workers/engine_jobs.EngineTimings, so the engine, in its own process or thread, builds no span
and steps no slower), and handed straight to the export processors (tracing.finished_span).
"""

import time
from concurrent.futures import Future
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanContext

from llmq import tracing
from workers.engine_jobs import EngineTimings


class JobTrace:
    def __init__(
        self,
        job: Any,
        parent: SpanContext,
        context: SpanContext,
        claim_started_ns: int,
        claimed_ns: int,
    ) -> None:
        """`parent` is the context stored with the job's row, `context` the job's own span's."""
        self.parent, self.context = parent, context
        self.attributes: dict[str, Any] = {"llmq.job_id": str(job.id), "llmq.attempt": job.attempts}
        tracing.finished_span(
            "llmq.queue_wait",
            tracing.child_context(parent),
            parent,
            int(job.created_at.timestamp() * 1e9),
            claim_started_ns,
            dict(self.attributes),
        )
        self.attributes |= {"llmq.model": job.model, "llmq.queue": job.queue}
        self.started_ns = claim_started_ns
        self.child("llmq.claim", claim_started_ns, claimed_ns)
        self.store_started_ns = 0
        self.ended_already = False

    @classmethod
    def begin(cls, job: Any, claim_started_ns: int, claimed_ns: int) -> "JobTrace | None":
        """The job's trace, when tracing is on, the job was traced from its request, and this
        process's sampler records it."""
        if not tracing.enabled() or not job.trace_context:
            return None
        contexts = tracing.sampled_child_of(job.trace_context, "llmq.job")
        if contexts is None:
            return None
        return cls(job, *contexts, claim_started_ns, claimed_ns)

    def traceparent(self) -> str | None:
        """The job's span as a W3C traceparent: work done for the job elsewhere (a remote
        model's upstream request) joins the trace under it."""
        return tracing.traceparent_of(trace.NonRecordingSpan(self.context))

    def log_ids(self) -> dict[str, str]:
        """The ids for the job's log lines."""
        return {
            "trace_id": f"{self.context.trace_id:032x}",
            "span_id": f"{self.context.span_id:016x}",
        }

    def child(self, name: str, start_ns: int, end_ns: int, **attributes: Any) -> None:
        tracing.finished_span(
            name,
            tracing.child_context(self.context),
            self.context,
            start_ns,
            end_ns,
            attributes or None,
        )

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
        self.attributes["llmq.completion_tokens"] = completion_tokens

    def end(self, error: str | None = None) -> None:
        """The job's own span, once: the first end wins."""
        if self.ended_already:
            return
        self.ended_already = True
        tracing.finished_span(
            "llmq.job",
            self.context,
            self.parent,
            self.started_ns,
            time.time_ns(),
            self.attributes,
            error,
        )
