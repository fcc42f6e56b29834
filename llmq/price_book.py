"""The price book every process prices jobs through: the prices in models.yaml as they are now.

A usage row stores its cost when its job finishes, at the price in force then; a later price
change never rewrites it. Prices change without a restart: a process looks at models.yaml's
modification time whenever it is about to price a job, and re-reads the prices when the file
has changed (the rest of the file takes effect on restart).
"""

import threading
from functools import lru_cache
from pathlib import Path

import structlog
import yaml
from pydantic import ValidationError

from llmq.pricing import Price
from llmq.registry import load_registry
from llmq.settings import get_settings

log = structlog.get_logger(__name__)


class PriceBook:
    """The prices in models.yaml as they are now, re-read when the file changes. A file that
    no longer validates keeps the prices last read (and logs why), so that a half-saved edit
    never makes jobs free."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._prices: dict[str, Price] = {}
        self._currency: str | None = None

    def price(self, model: str) -> Price | None:
        """The model's price in force now; None when it has none."""
        self._refresh()
        return self._prices.get(model)

    @property
    def currency(self) -> str | None:
        """The deployment's currency; None while no model has a price."""
        self._refresh()
        return self._currency

    def _refresh(self) -> None:
        try:
            stat = self.path.stat()
        except OSError as exc:
            log.warning(
                "models file unreadable; prices unchanged", path=str(self.path), error=str(exc)
            )
            return
        stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if stamp == self._stamp:
            return
        with self._lock:
            if stamp == self._stamp:
                return
            try:
                registry = load_registry(self.path)
            except (OSError, ValueError, ValidationError, yaml.YAMLError) as exc:
                log.error(
                    "models file invalid; prices unchanged", path=str(self.path), error=str(exc)
                )
                return
            self._prices = {spec.id: spec.price for spec in registry.models if spec.price}
            self._currency = registry.currency
            self._stamp = stamp
            log.info("prices read", path=str(self.path), priced=sorted(self._prices))


@lru_cache
def get_price_book() -> PriceBook:
    """This process's price book, of the settings' models file."""
    return PriceBook(get_settings().models_file)
