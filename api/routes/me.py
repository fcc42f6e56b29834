"""The calling key's own account: its token usage and cost, limits, monthly quota and spend."""

import re
from datetime import UTC, date, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BeforeValidator

from api.deps import ApiKeyDep, SessionDep
from api.schemas.keys import (
    DayUsage,
    LimitsPublic,
    ModelUsage,
    QuotaPublic,
    SpendPublic,
    UsagePublic,
    UsageTotals,
)
from db.queries import usage as usage_queries
from db.queries.usage import Totals
from llmq.errors import InvalidPeriod
from llmq.price_book import get_price_book
from llmq.pricing import format_amount

router = APIRouter(prefix="/v1/me", tags=["usage"])

MAX_PERIOD_DAYS = 366
ISO_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def iso_day(value: object) -> object:
    """Only YYYY-MM-DD: pydantic alone would also read 0 as 1970-01-01 (a Unix time)."""
    if isinstance(value, str) and not ISO_DAY.fullmatch(value):
        raise ValueError(f"{value!r} is not a day; send YYYY-MM-DD, such as 2025-01-31")
    return value


StartDay = Annotated[
    date | None,
    BeforeValidator(iso_day),
    Query(description="First UTC day, YYYY-MM-DD; default: the 1st of this month"),
]
EndDay = Annotated[
    date | None,
    BeforeValidator(iso_day),
    Query(description="Last UTC day, included; default: today"),
]


def usage_period(start: date | None, end: date | None) -> tuple[date, date]:
    """The days asked for, this month so far by default; 400 for a backwards or overlong one."""
    today = datetime.now(UTC).date()
    end = end or today
    start = start or min(end, today).replace(day=1)
    if start > end:
        raise InvalidPeriod(f"start {start} is after end {end}; swap them", param="start")
    if (end - start).days >= MAX_PERIOD_DAYS:
        raise InvalidPeriod(
            f"the period is {(end - start).days + 1:,} days; ask for at most {MAX_PERIOD_DAYS}",
            param="start",
        )
    return start, end


def period_bounds(start: date, end: date) -> tuple[datetime, datetime]:
    """[start, end] as UTC days: [midnight of start, midnight after end)."""
    return usage_queries.day_start(start), usage_queries.day_start(end + timedelta(days=1))


@router.get("/usage", response_model=UsagePublic)
def read_my_usage(
    caller: ApiKeyDep, session: SessionDep, start: StartDay = None, end: EndDay = None
) -> UsagePublic:
    """This key's tokens and cost over a period of UTC days, by model and by day, with its
    limits and what is left of its monthly quota and spend limit."""
    start, end = usage_period(start, end)
    rows = usage_queries.by_model_and_day(session, caller.owner, *period_bounds(start, end))
    total, models, days = Totals(), {}, {}
    for model, day, totals in rows:
        total.add(totals)
        models.setdefault(model, Totals()).add(totals)
        days.setdefault(day, Totals()).add(totals)
    month_start = usage_queries.month_start(datetime.now(UTC))
    used = usage_queries.tokens_since(session, caller.owner, month_start)
    quota = caller.limits.monthly_token_quota
    spend = None
    if (currency := get_price_book().currency) is not None:
        spent = usage_queries.spent_since(session, caller.owner, month_start, currency)
        limit = caller.limits.monthly_spend_limit
        spend = SpendPublic(
            currency=currency,
            monthly_spend_limit=format_amount(limit),
            spent_this_month=format_amount(spent),
            remaining=format_amount(max(limit - spent, 0)) if limit else None,
        )
    return UsagePublic(
        key_id=caller.key_id,
        start=start,
        end=end,
        total=UsageTotals.of(total),
        by_model=[
            ModelUsage(model=model, **UsageTotals.of(totals).model_dump())
            for model, totals in sorted(models.items())
        ],
        by_day=[
            DayUsage(date=day, **UsageTotals.of(totals).model_dump())
            for day, totals in sorted(days.items())
        ],
        limits=LimitsPublic.of(caller.limits),
        quota=QuotaPublic(
            monthly_token_quota=quota,
            used_this_month=used,
            remaining=max(0, quota - used) if quota else None,
        ),
        spend=spend,
    )
