"""What a worker process holds for each model it has loaded: the engine (in its own process, or
in a thread of this one: LLMQ_ENGINE_PROCESS), the tokenizer or model host, and the engine's
helpers. workers/model_pool.py decides which models are loaded."""

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from llmq.fingerprint import model_revisions, read_revision
from llmq.protocol import SamplingParams
from llmq.publisher import TokenPublisher
from llmq.registry import Device, ModelSpec
from llmq.settings import Settings
from workers import metrics as worker_metrics
from workers.cancellation import CancellationWatcher
from workers.engine import GenerationEngine, GenerationRequest
from workers.engine_process import EngineConfig, EngineProcess
from workers.host import ModelFacts, ModelHost, TokenizerHost
from workers.result_writer import ResultWriter
from workers.runner import JobRunner
from workers.score_runner import ScoreRunner

log = structlog.get_logger(__name__)


@dataclass
class WorkerRuntime:
    host: ModelHost | TokenizerHost  # the tokenizer alone when the engine has its own process
    engine: GenerationEngine | EngineProcess
    watcher: CancellationWatcher
    runner: JobRunner
    score_runner: ScoreRunner
    facts: ModelFacts

    @classmethod
    def start(
        cls,
        settings: Settings,
        spec: ModelSpec,
        device: Device,
        worker_name: str,
        spare: bool = False,
    ) -> "WorkerRuntime":
        """Load the model; `spare`: in a spare engine process if one waits (a worker that
        switches models keeps one: workers/spare_engines.py)."""
        publisher = TokenPublisher(settings.redis_url)
        host, engine, facts = _start_engine(settings, spec, device, publisher, spare)
        _warm_up(engine, host)
        watcher = CancellationWatcher(engine, settings.database_url)
        watcher.start()
        results = ResultWriter(
            settings.database_url, worker_name, weights_current=_weights_current(settings, spec)
        )
        results.start()
        # Both take either engine and either host: they use the surface the two share.
        runner = JobRunner(
            engine,
            host,
            publisher,
            settings.database_url,
            worker_name,
            settings.job_time_limit_s,
            results,
        )
        score_runner = ScoreRunner(
            engine, host, settings.database_url, worker_name, settings.job_time_limit_s
        )
        return cls(host, engine, watcher, runner, score_runner, facts)

    def stop(self) -> None:
        self.watcher.stop()
        self.engine.stop()
        self.runner.stop()
        self.runner.publisher.close()
        worker_metrics.model_unloaded(self.host.spec, self.host.device, self.engine.metrics)

    def hand_back(self) -> None:
        """Stop the engine under its running jobs: their runners put them back to queued and
        their messages back on the queue (a forced unload)."""
        self.engine.stop()

    def memory_bytes(self) -> int:
        return self.facts.memory_bytes


def _start_engine(
    settings: Settings,
    spec: ModelSpec,
    device: Device,
    publisher: TokenPublisher,
    spare: bool = False,
) -> tuple[ModelHost | TokenizerHost, GenerationEngine | EngineProcess, ModelFacts]:
    """The engine, in its own process (which loads the model before this worker consumes
    anything) or in a thread of this one; and what this process needs of the model."""
    if settings.engine_process:
        host: ModelHost | TokenizerHost = TokenizerHost.load(spec, device, settings.data_dir)
        config = EngineConfig(
            spec,
            device,
            settings.data_dir,
            engine_options(spec),
            log_level=settings.log_level,
            log_json=settings.log_json,
        )
        engine: GenerationEngine | EngineProcess = EngineProcess(
            host, config, on_tokens=publisher.publish_tokens
        )
        facts = engine.start(spare=spare)
    else:
        host = ModelHost.load(spec, device, settings.data_dir)
        facts = host.facts()
        engine = GenerationEngine(host, **engine_options(spec), on_tokens=publisher.publish_tokens)
        engine.start()
    worker_metrics.model_loaded(spec, device, facts)
    return host, engine, facts


def _weights_current(settings: Settings, spec: ModelSpec) -> Callable[[], bool]:
    """Whether the model's weights on disk (or in its store) are still those loaded here: new
    files waiting for a reload make this worker keep no cache entry, since the API keys new
    requests by the new files already. Each host compares its own views, so hosts whose copies
    differ in file times keep their entries."""
    revisions = model_revisions(settings.data_dir)  # re-read at most every few seconds
    revisions.forget(spec.id)  # a reload's new files, not what was seen before it
    loaded = read_revision(spec, settings.data_dir)
    return lambda: revisions.revision(spec) == loaded


def engine_options(spec: ModelSpec) -> dict[str, Any]:
    """GenerationEngine's keyword arguments for a model, wherever the engine runs."""
    return {
        "max_batch_size": spec.max_batch_size,
        "max_batch_tokens": spec.max_batch_tokens,
        "max_score_tokens": spec.max_score_tokens,
        "join_every_steps": spec.join_every_steps,
        "max_cache_groups": spec.max_cache_groups,
        "max_wait_ms": spec.max_wait_ms,
        "continuous": spec.scheduling == "continuous",
        "background_share": spec.background_share,
    }


def _warm_up(engine: GenerationEngine | EngineProcess, host: ModelHost | TokenizerHost) -> None:
    """One short generation, so the first real job does not pay for lazy initialisation."""
    started = time.perf_counter()
    request = GenerationRequest(uuid.uuid4(), host.encode("Hello"), SamplingParams(max_tokens=2))
    engine.submit(request).result(timeout=120)
    log.info("model warmed up", seconds=round(time.perf_counter() - started, 3))
