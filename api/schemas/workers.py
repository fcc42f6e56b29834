"""Response bodies of the workers' admin API (`/v1/admin/workers`): what each worker serves and
has loaded, as its `llmq_models` report tells (workers/control.py)."""

from typing import Literal

from pydantic import BaseModel, Field

ModelState = Literal["unloaded", "loading", "loaded", "draining", "unloading"]


class WorkerModelPublic(BaseModel):
    model: str
    state: ModelState
    running: int = Field(description="Messages (one job, or a group) running on it now")
    memory_bytes: int = Field(description="Its weights' bytes on the worker's device; 0 unloaded")
    loads: int = Field(description="How often this worker has loaded it")
    unloads: int = Field(description="How often this worker has unloaded it (evictions too)")
    failures: int = Field(description="How often loading it failed here")
    revision: str | None = Field(description="The revision its loaded entry names, if any")
    error: str | None = Field(description="Why its last load failed, if it did")


class WorkerPublic(BaseModel):
    object: str = "worker"
    name: str = Field(description="Celery's name of the worker: <models>.<device>.<pid>@<host>")
    host: str
    pid: int
    device: str
    uptime_s: float
    max_loaded_models: int
    queues: list[str]
    models_loaded: list[str]
    jobs_running: int = Field(description="Messages running on its loaded models")
    memory_bytes: int = Field(description="Bytes of the weights it holds loaded")
    models: list[WorkerModelPublic]

    @classmethod
    def of(cls, name: str, report: dict, queues: set[str]) -> "WorkerPublic":
        models = [WorkerModelPublic.model_validate(m) for m in report["models"]]
        return cls(
            name=name,
            host=report["host"],
            pid=report["pid"],
            device=report["device"],
            uptime_s=report["uptime_s"],
            max_loaded_models=report["max_loaded_models"],
            queues=sorted(queues),
            models_loaded=[m.model for m in models if m.state == "loaded"],
            jobs_running=sum(m.running for m in models),
            memory_bytes=sum(m.memory_bytes for m in models),
            models=models,
        )


class WorkersPublic(BaseModel):
    object: str = "list"
    data: list[WorkerPublic]


class ModelCommandPublic(BaseModel):
    """The outcome of a load, unload or reload on one worker."""

    object: str = "model_command"
    worker: str
    model: str
    action: Literal["load", "unload", "reload"]
    done: bool = Field(description="False: still under way when the wait ran out; poll the worker")
    state: ModelState | None = Field(description="The model's state on the worker now")
    error: str | None = None


class ModelReloadPublic(BaseModel):
    object: str = "model_reload"
    model: str
    workers: list[ModelCommandPublic]
