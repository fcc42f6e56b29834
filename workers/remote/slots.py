"""A remote model's `max_concurrency`, shared by all of its workers: each request in flight
holds a slot in one Redis sorted set (member: the request, score: when its lease lapses).

Fair sharing: a worker takes a message from the model's queue only when one of its threads is
free, and a thread waits for a slot before it sends; slots go to whichever waiting request asks
first after one frees, so the upstream's capacity is spread over the workers by the work each
has taken, and no worker can hold more than the model's limit. A worker that dies without
giving its slots back loses them when their leases lapse (a lease is renewed while its request
streams).
"""

import threading
import time
from collections.abc import Callable

from redis import Redis
from redis.exceptions import RedisError

# Drop lapsed leases, then take a slot if fewer than the limit are held. Atomic in Redis, so
# two workers never take the last slot both.
_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
    redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
    return 1
end
return 0
"""
POLL_S = 0.05


class UpstreamSlots:
    def __init__(self, redis: Redis, model: str, limit: int, lease_s: float) -> None:
        self.redis = redis
        self.key = f"llmq:upstream-slots:{model}"
        self.limit = limit
        self.lease_s = lease_s
        self._acquire = redis.register_script(_ACQUIRE)
        self._local = threading.Semaphore(limit)  # never more than the limit from one worker

    def acquire(self, member: str, deadline: float, cancelled: Callable[[], bool]) -> bool:
        """Wait for a slot until time.monotonic() reaches `deadline`; False if none came (or
        the job was cancelled)."""
        while not self._local.acquire(timeout=POLL_S):
            if cancelled() or time.monotonic() >= deadline:
                return False
        while True:
            try:
                now = time.time()
                if self._acquire([self.key], [now, self.limit, now + self.lease_s, member]):
                    return True
            except RedisError:
                # Without Redis the shared count is unknown: this worker's own limit holds.
                return True
            if cancelled() or time.monotonic() >= deadline:
                self._local.release()
                return False
            time.sleep(POLL_S)

    def renew(self, member: str) -> None:
        try:
            self.redis.zadd(self.key, {member: time.time() + self.lease_s}, xx=True)
        except RedisError:
            pass

    def release(self, member: str) -> None:
        self._local.release()
        try:
            self.redis.zrem(self.key, member)
        except RedisError:
            pass  # its lease lapses

    def in_use(self) -> int:
        return int(self.redis.zcount(self.key, time.time(), "+inf"))
