"""kombu's Redis transport, hardened against poison entries on a queue.

kombu parses each entry it pops from a queue's list inside the worker's event loop; an entry
that is not JSON (written by a foreign client, or truncated) raises there and stops the worker
with "Unrecoverable error". Here such an entry is logged and dropped: it has already left the
list and names no job. Well-formed messages whose body Celery cannot decode are already
rejected one by one by Celery itself.
"""

import structlog
from kombu.transport import TRANSPORT_ALIASES, redis

log = structlog.get_logger(__name__)


class Channel(redis.Channel):
    def _brpop_read(self, **options):
        try:
            return super()._brpop_read(**options)
        except (ValueError, KeyError, TypeError) as exc:  # JSON or UTF-8 errors, bad envelope
            log.error("dropped an undecodable queue entry", error=f"{type(exc).__name__}: {exc}")
            return True


class Transport(redis.Transport):
    Channel = Channel


def install() -> None:
    """Make `redis://` broker URLs use this transport in this process."""
    TRANSPORT_ALIASES["redis"] = f"{__name__}:Transport"
