"""Each remote model's circuit breaker (pybreaker), its state kept in Redis so that every worker
of the model shares one breaker and the API can show it.

closed: requests go upstream. open: after `fail_max` failed requests in a row, none does for
`reset_timeout_s`; jobs wait for it in the queue. half-open: then one probe request goes; its
success closes the breaker, its failure opens it again.
"""

import pybreaker
from redis import Redis

from llmq.registry import ModelSpec

STATES = (pybreaker.STATE_CLOSED, pybreaker.STATE_HALF_OPEN, pybreaker.STATE_OPEN)


def namespace(spec: ModelSpec) -> str:
    return f"llmq:breaker:{spec.id}"


def storage(spec: ModelSpec, redis: Redis) -> pybreaker.CircuitRedisStorage:
    # A Redis that cannot be read leaves the breaker closed: the upstream is then tried, and
    # each job's own retries and deadline still bound what an outage costs.
    return pybreaker.CircuitRedisStorage(pybreaker.STATE_CLOSED, redis, namespace(spec))


def circuit_breaker(
    spec: ModelSpec,
    redis: Redis,
    exclude: list[type[BaseException]],
    listeners: list[pybreaker.CircuitBreakerListener],
) -> pybreaker.CircuitBreaker:
    assert spec.remote is not None, "only remote models have a breaker"
    settings = spec.remote.circuit_breaker
    return pybreaker.CircuitBreaker(
        fail_max=settings.fail_max,
        reset_timeout=settings.reset_timeout_s,
        exclude=exclude,
        listeners=listeners,
        state_storage=storage(spec, redis),
        name=spec.id,
        # The failure that trips the breaker is raised as itself, so that it is told as such.
        throw_new_error_on_trip=False,
    )


def breaker_state(spec: ModelSpec, redis: Redis) -> str:
    """closed, half-open or open (closed when Redis cannot say)."""
    return storage(spec, redis).state
