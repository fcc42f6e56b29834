"""kombu's Redis transport, hardened for a worker that must outlive anything Redis does.

- **Poison entries.** kombu parses each entry it pops from a queue's list inside the worker's
  event loop; an entry that is not JSON (written by a foreign client, or truncated) raises there
  and stops the worker with "Unrecoverable error". Here such an entry is logged and dropped: it
  has already left the list and names no job. Well-formed messages whose body Celery cannot
  decode are already rejected one by one by Celery itself.
- **A broker outage with jobs in flight.** When the connection drops, Celery (5.7) first tears
  the transport down (`Connection.collect()`, which detaches it from its kombu connection), then
  closes the connection again. If the first close was cut short (the channel was waiting in
  BRPOP), the second one closes the channel for real and tries to put its unacknowledged
  messages back through a fresh connection pool, built from the detached connection's URL:
  `AttributeError: 'NoneType' object has no attribute 'hostname'`. That is no connection error,
  so Celery stops the worker (the same failure as kombu issue #582). A thread acknowledging a
  finished job on the old channel meets it too. Here a detached channel raises a connection
  error instead, which Celery handles by reconnecting, and leaves its unacknowledged messages
  where they are: in Redis's unacked set when Redis kept its data (kombu restores them after the
  visibility timeout), and in any case in Postgres, whose reconciler sends every queued job
  again that is not waiting in its queue.
"""

import structlog
from kombu.transport import TRANSPORT_ALIASES, redis
from redis.exceptions import ConnectionError as RedisConnectionError

log = structlog.get_logger(__name__)


class BrokerDetached(RedisConnectionError):
    """The channel's transport was already torn down after a lost connection."""


class QoS(redis.QoS):
    def restore_unacked(self, client=None):
        if self.channel.detached:
            log.warning(
                "broker connection lost; unacknowledged messages stay for the reconciler",
                messages=len(self._delivered),
            )
            self._delivered.clear()
            return
        return super().restore_unacked(client)


class Channel(redis.Channel):
    QoS = QoS

    @property
    def detached(self) -> bool:
        return self.connection is None or self.connection.client is None

    def _connparams(self, asynchronous=False):
        if self.detached:
            raise BrokerDetached("the broker connection was closed after an error")
        return super()._connparams(asynchronous=asynchronous)

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
