"""What a model's tokens cost: the `price` block of a models.yaml entry (the price book that every
process reads it through is llmq/price_book.py).

Amounts are `Decimal`, never float. A price per million tokens has at most 4 decimal places, so
one token's price has at most 10, and a usage row's cost (its tokens times the price of a token)
is exact in the `usage.cost` column, NUMERIC(20, 10): a column of whole micro-units could not
hold one token at $0.5 per million (0.0000005). Sums of rows are therefore exact too, and
nothing is rounded before an amount is shown.

A deployment charges in one currency: the models that have a price must share its currency
code, and per-key spend limits are amounts in it.
"""

from collections.abc import Iterable
from decimal import Decimal
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

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


def one_currency(prices: Iterable[tuple[str, Price | None]]) -> str | None:
    """The currency the priced models share, from (model id, price) pairs (None when none has a
    price); ValueError naming the models when they do not share one."""
    currencies: dict[str, list[str]] = {}
    for model_id, price in prices:
        if price is not None:
            currencies.setdefault(price.currency, []).append(model_id)
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
