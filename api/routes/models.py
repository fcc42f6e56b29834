"""The configured models and whether a live worker serves each."""

import anyio
from fastapi import APIRouter, Request

from api.deps import LiveQueuesDep, RegistryDep
from api.schemas.jobs import ModelPublic, ModelsPublic

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=ModelsPublic)
async def list_models(registry: RegistryDep, live: LiveQueuesDep, request: Request) -> ModelsPublic:
    """Every model in models.yaml, with its queues and the ones a worker consumes now, the
    workers that can serve it and those that have it loaded, and a remote model's upstream
    circuit breaker."""
    breakers = await anyio.to_thread.run_sync(request.app.state.upstream_breakers.states)
    data = []
    for spec in registry.models:
        queues = [spec.queue(d) for d in spec.devices]
        live_queues = [q for q in queues if q in live.queues]
        workers = sorted(w for w, qs in live.worker_queues.items() if qs.intersection(queues))
        data.append(
            ModelPublic(
                id=spec.id,
                source=spec.source,
                devices=list(spec.devices),
                queues=queues,
                context_length=spec.context_length,
                max_batch_size=spec.max_batch_size,
                live=bool(live_queues),
                live_queues=live_queues,
                workers=workers,
                loaded_on=[w for w in workers if spec.id in live.loaded.get(w, ())],
                circuit_breaker=breakers.get(spec.id),
            )
        )
    return ModelsPublic(data=data)
