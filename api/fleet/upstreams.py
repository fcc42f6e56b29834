"""Remote models in the API: what their jobs cannot ask for, and the state of each one's
upstream circuit breaker (kept in Redis by its workers) for /v1/models, /readyz and /metrics."""

from redis import Redis
from redis.exceptions import RedisError

from llmq.circuit_breakers import breaker_state
from llmq.errors import InvalidRequest
from llmq.protocol import SamplingParams
from llmq.registry import ModelSpec, Registry

# The breaker gauge's values.
STATE_VALUES = {"closed": 0, "half-open": 1, "open": 2}


def check_remote_params(spec: ModelSpec, params: SamplingParams) -> None:
    """400 for what llmq does not relay to or from a remote model's upstream."""
    if not spec.is_remote:
        return
    asked = [
        (params.logprobs is not None, "logprobs", "log-probabilities"),
        (params.prompt_logprobs is not None, "echo", "prompt log-probabilities (echo)"),
        (params.constraint is not None, "response_format", "structured output"),
    ]
    for wanted, param, what in asked:
        if wanted:
            raise InvalidRequest(
                f"{spec.id} is a remote model (served by {spec.remote.model} upstream) and llmq "
                f"does not relay {what} for remote models; remove {param}",
                param=param,
            )


class UpstreamBreakers:
    def __init__(self, registry: Registry, redis_url: str) -> None:
        self.remote = [spec for spec in registry.models if spec.is_remote]
        self.redis = Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)

    def states(self) -> dict[str, str]:
        """Each remote model's breaker: closed, half-open, open, or unknown without Redis."""
        states = {}
        for spec in self.remote:
            try:
                states[spec.id] = breaker_state(spec, self.redis)
            except RedisError:
                states[spec.id] = "unknown"
        return states
