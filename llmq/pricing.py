"""What a model's tokens cost: the `price` block of a models.yaml entry, and the price book that
every process reads it through.

Amounts are `Decimal`, never float. A price per million tokens has at most 4 decimal places, so
one token's price has at most 10, and a usage row's cost (its tokens times the price of a token)
is exact in the `usage.cost` column, NUMERIC(20, 10): a column of whole micro-units could not
hold one token at $0.5 per million (0.0000005). Sums of rows are therefore exact too, and
nothing is rounded before an amount is shown.

A usage row stores its cost when its job finishes, at the price in force then; a later price
change never rewrites it. Prices change without a restart: a process looks at models.yaml's
modification time whenever it is about to price a job, and re-reads the prices when the file
has changed (the rest of the file takes effect on restart).

A deployment charges in one currency: the models that have a price must share its currency
code, and per-key spend limits are amounts in it.
"""

import threading
from collections.abc import Iterable
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import structlog
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmq.settings import get_settings

if TYPE_CHECKING:
    from llmq.registry import ModelSpec

log = structlog.get_logger(__name__)

MILLION = Decimal(1_000_000)
PerMillion = Annotated[Decimal, Field(ge=0, max_digits=14, decimal_places=4)]


class Price(BaseModel):
    """A model's prices per million tokens. Tokens answered from the completion cache (a cache
    hit, or a job that shared an identical job's run) cost `cached_per_million`: free unless
    set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt_per_million: PerMillion
    completion_per_million: PerMillion
    cached_per_million: PerMillion = Decimal(0)
    currency: str = Field(pattern=r"^[A-Z]{3}$", description="ISO 4217 code, e.g. USD")

    def cost(self, prompt_tokens: int, completion_tokens: int, *, cached: bool) -> Decimal:
        """The exact cost of a finished job's tokens."""
        if cached:
            return (prompt_tokens + completion_tokens) * self.cached_per_million / MILLION
        return (
            prompt_tokens * self.prompt_per_million
            + completion_tokens * self.completion_per_million
        ) / MILLION

    @property
    def cached_per_token(self) -> Decimal:
        return self.cached_per_million / MILLION


def one_currency(specs: Iterable["ModelSpec"]) -> str | None:
    """The currency the priced models share (None when none has a price); ValueError naming
    the models when they do not share one."""
    currencies: dict[str, list[str]] = {}
    for spec in specs:
        if spec.price is not None:
            currencies.setdefault(spec.price.currency, []).append(spec.id)
    if len(currencies) > 1:
        listed = "; ".join(f"{code}: {', '.join(ids)}" for code, ids in sorted(currencies.items()))
        raise ValueError(
            f"models with a price must share one currency, but these differ ({listed}); "
            "give every price the same currency"
        )
    return next(iter(currencies), None)


def format_amount(amount: Decimal) -> str:
    """An amount as plain decimal digits, without trailing zeros or an exponent."""
    text = format(amount, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text or "0"


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
            from llmq.registry import load_registry  # the registry imports this module

            try:
                registry = load_registry(self.path)
            except (OSError, ValueError, ValidationError, yaml.YAMLError) as exc:
                log.error(
                    "models file invalid; prices unchanged", path=str(self.path), error=str(exc)
                )
                return
            self._prices = {spec.id: spec.price for spec in registry.models if spec.price}
            self._currency = one_currency(registry.models)
            self._stamp = stamp
            log.info("prices read", path=str(self.path), priced=sorted(self._prices))


@lru_cache
def get_price_book() -> PriceBook:
    """This process's price book, of the settings' models file."""
    return PriceBook(get_settings().models_file)
