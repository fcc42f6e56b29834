"""What a remote model's worker process holds: the remote engine and the job path around it,
which is the model's own (claim in Postgres, store the outcome, publish the events): only how a
claimed job reaches its engine differs."""

import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass

import structlog
from redis import Redis

from llmq.protocol import ErrorCategory, SamplingParams
from llmq.publisher import TokenPublisher
from llmq.registry import Device, ModelSpec
from llmq.settings import Settings
from workers.cancellation import CancellationWatcher
from workers.job_trace import JobTrace
from workers.remote.engine import RemoteEngine, UpstreamRequest
from workers.remote.tokenizer import FilesTokenizer
from workers.result_writer import ResultWriter
from workers.runner import JobRunner
from workers.score_runner import ScoreRunner

log = structlog.get_logger(__name__)

# While the breaker is open, a worker's threads wait before they claim their jobs: the jobs stay
# queued (and their messages unacknowledged) instead of failing one after another.
OPEN_BREAKER_POLL_S = 0.5


@dataclass(frozen=True)
class RemoteHost:
    """What the job path asks of a model host; a remote model has no tokenizer here."""

    spec: ModelSpec
    device: Device = "remote"


@dataclass(frozen=True)
class ScoringHost:
    """What the scoring runner asks of a model host: the tokenizer its pairs are encoded with."""

    tokenizer: FilesTokenizer


class RemoteJobRunner(JobRunner):
    engine: RemoteEngine  # type: ignore[assignment]

    def run_group(self, job_ids: list[uuid.UUID]) -> None:
        self._wait_while_breaker_open()
        super().run_group(job_ids)

    def _wait_while_breaker_open(self) -> None:
        """Hold the jobs, unclaimed, while the upstream's breaker is open, for at most the job
        time limit; their attempts then wait for it too, each until its own deadline."""
        until = time.monotonic() + self.job_timeout_s
        while not self.engine.may_send() and time.monotonic() < until:
            time.sleep(OPEN_BREAKER_POLL_S)

    def _submit(
        self, job, params: SamplingParams, deadline: float, trace: JobTrace | None
    ) -> Future:
        if params.wants_logprobs:
            raise ValueError(
                f"{self.host.spec.id} is a remote model: llmq does not relay its upstream's "
                "log-probabilities"
            )
        if params.constraint is not None:
            raise ValueError(
                f"{self.host.spec.id} is a remote model: llmq does not relay structured output "
                "to its upstream"
            )
        # A traced job's upstream requests are children of its span (and an upstream that
        # traces, another llmq, continues the trace from their traceparent header).
        trace_context = trace.traceparent() if trace is not None else None
        request = UpstreamRequest(
            job.id,
            job.input,
            params,
            deadline,
            job.priority,
            trace_context=trace_context,
            stream_tokens=job.stream_tokens,
        )
        return self.engine.submit(request)

    def refuse_group(self, job_ids: list[uuid.UUID]) -> None:
        """Scoring jobs where the upstream echoes no prompt log-probabilities (the API refuses
        these jobs; one that came anyway fails, rather than waiting forever in the queue)."""
        for job in self.claims.claim_all(job_ids):
            message = (
                f"{self.host.spec.id} is a remote model whose upstream is not known to echo "
                "prompt log-probabilities (remote.prompt_logprobs): it scores no continuations"
            )
            self._fail(job.id, ErrorCategory.INVALID_INPUT, message)


@dataclass(frozen=True)
class ScoreRefusal:
    """The score tasks' runner on a worker of a remote model that scores nothing."""

    runner: RemoteJobRunner

    def run(self, job_id: uuid.UUID) -> None:
        self.runner.refuse_group([job_id])

    def run_group(self, job_ids: list[uuid.UUID]) -> int:
        self.runner.refuse_group(job_ids)
        return 0


@dataclass
class RemoteRuntime:
    host: RemoteHost
    engine: RemoteEngine
    watcher: CancellationWatcher
    runner: RemoteJobRunner
    score_runner: "ScoreRunner | ScoreRefusal"

    @classmethod
    def start(cls, settings: Settings, spec: ModelSpec, worker_name: str) -> "RemoteRuntime":
        publisher = TokenPublisher(settings.redis_url)
        redis = Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
        engine = RemoteEngine(spec, redis, publisher.publish_tokens, publisher.reset)
        engine.start()
        watcher = CancellationWatcher(engine, settings.database_url)
        watcher.start()
        results = ResultWriter(settings.database_url, worker_name)
        results.start()
        runner = RemoteJobRunner(
            engine,  # type: ignore[arg-type]
            RemoteHost(spec),  # type: ignore[arg-type]
            publisher,
            settings.database_url,
            worker_name,
            settings.job_time_limit_s,
            results,
        )
        score_runner: ScoreRunner | ScoreRefusal = ScoreRefusal(runner)
        if spec.remote is not None and spec.remote.prompt_logprobs:
            tokenizer = FilesTokenizer(spec, settings.data_dir)  # pairs as lm-eval encodes them
            score_runner = ScoreRunner(
                engine,  # type: ignore[arg-type]
                ScoringHost(tokenizer),  # type: ignore[arg-type]
                settings.database_url,
                worker_name,
                settings.job_time_limit_s,
            )
        return cls(RemoteHost(spec), engine, watcher, runner, score_runner)

    def stop(self) -> None:
        self.watcher.stop()
        self.engine.stop()
        self.runner.stop()
        self.runner.publisher.close()

    def hand_back(self) -> None:
        """Nothing to free in a hurry: a remote model holds no weights, so even a forced unload
        lets its requests in flight finish."""

    def memory_bytes(self) -> int:
        return 0  # the weights live upstream
