"""What a worker process holds for its life: the model host, the engine and its helpers."""

import time
import uuid
from dataclasses import dataclass

import structlog

from llmq.protocol import SamplingParams
from llmq.publisher import TokenPublisher
from llmq.registry import get_registry
from llmq.settings import Settings
from workers import metrics as worker_metrics
from workers.cancellation import CancellationWatcher
from workers.engine import GenerationEngine, GenerationRequest
from workers.host import ModelHost, detect_device
from workers.result_writer import ResultWriter
from workers.runner import JobRunner
from workers.score_runner import ScoreRunner

log = structlog.get_logger(__name__)


@dataclass
class WorkerRuntime:
    host: ModelHost
    engine: GenerationEngine
    watcher: CancellationWatcher
    runner: JobRunner
    score_runner: ScoreRunner

    @classmethod
    def start(cls, settings: Settings, worker_name: str) -> "WorkerRuntime":
        spec = get_registry().get(settings.worker_model)
        if spec is None:
            raise RuntimeError(
                f"LLMQ_WORKER_MODEL={settings.worker_model!r} is not in {settings.models_file}"
            )
        host = ModelHost.load(spec, detect_device(settings.worker_device), settings.data_dir)
        worker_metrics.model_loaded(host)
        publisher = TokenPublisher(settings.redis_url)
        engine = GenerationEngine(
            host,
            max_batch_size=spec.max_batch_size,
            max_batch_tokens=spec.max_batch_tokens,
            max_score_tokens=spec.max_score_tokens,
            join_every_steps=spec.join_every_steps,
            max_cache_groups=spec.max_cache_groups,
            max_wait_ms=spec.max_wait_ms,
            continuous=spec.scheduling == "continuous",
            background_share=spec.background_share,
            on_tokens=publisher.publish_tokens,
        )
        engine.start()
        _warm_up(engine, host)
        watcher = CancellationWatcher(engine, settings.database_url)
        watcher.start()
        results = ResultWriter(settings.database_url, worker_name)
        results.start()
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
        return cls(host, engine, watcher, runner, score_runner)

    def stop(self) -> None:
        self.watcher.stop()
        self.engine.stop()
        self.runner.results.stop()
        self.runner.publisher.close()


def _warm_up(engine: GenerationEngine, host: ModelHost) -> None:
    """One short generation, so the first real job does not pay for lazy initialisation."""
    started = time.perf_counter()
    request = GenerationRequest(uuid.uuid4(), host.encode("Hello"), SamplingParams(max_tokens=2))
    engine.submit(request).result(timeout=120)
    log.info("model warmed up", seconds=round(time.perf_counter() - started, 3))
