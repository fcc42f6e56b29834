"""Request and response bodies of API keys and usage (`ApiKeyCreate` in, `ApiKeyPublic` out)."""

import re
import uuid
from datetime import date, datetime
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
)

from api.http.limits import KeyLimits
from api.schemas.jobs import (
    MAX_JSON_INT,
    CostPublic,
    JobPublic,
    JsonIntOrNone,
    costs_public,
    reject_nul,
)
from db.queries.usage import Totals
from db.tables import ApiKey, Job
from llmq.pricing import format_amount

STRICT_INPUT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
INT32_MAX = 2**31 - 1

RateLimitField = Field(
    default=None, ge=0, le=INT32_MAX, description="Requests per minute; 0: none; null: default."
)
ConcurrencyField = Field(
    default=None,
    ge=0,
    le=INT32_MAX,
    description="Jobs queued or running at once; 0: no limit; null: the server's default.",
)
QuotaField = Field(
    default=None,
    ge=0,
    le=MAX_JSON_INT,
    description="Prompt + completion tokens per calendar month (UTC); 0: none; null: default.",
)


AMOUNT = re.compile(r"[0-9]{1,12}(\.[0-9]{1,4})?")
MAX_AMOUNT = 10**12 - 1


def _amount(value: object) -> object:
    """A whole JSON number, or a decimal string for a fraction (a float would not be exact), as
    a Decimal; anything else is refused with what to send."""
    if isinstance(value, bool):
        raise ValueError('monthly_spend_limit must be an amount such as 25 or "12.50"')
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        raise ValueError(
            f'send a fractional monthly_spend_limit as a string, e.g. "{value}", so it stays exact'
        )
    if isinstance(value, str):
        if not AMOUNT.fullmatch(value):
            raise ValueError(
                f"monthly_spend_limit {value!r} is not an amount: send up to 12 digits, and at "
                'most 4 after the point, e.g. "12.50"'
            )
        return Decimal(value)
    return value


SpendLimitOrNone = Annotated[
    Decimal | None,
    BeforeValidator(_amount),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 0, "maximum": MAX_AMOUNT},
                {"type": "string", "pattern": f"^{AMOUNT.pattern}$"},
                {"type": "null"},
            ]
        }
    ),
]
SpendLimitField = Field(
    default=None,
    ge=0,
    le=MAX_AMOUNT,
    description="Spend per calendar month (UTC), in the currency of the models' prices: a whole "
    'number, or a string with at most 4 decimal places ("12.50"); 0 or null: none.',
)


class LimitsPublic(BaseModel):
    """Limits in force: the key's own, or the server's defaults. 0 means no limit."""

    rate_limit_per_minute: int
    max_concurrent_jobs: int
    monthly_token_quota: int
    monthly_spend_limit: str = Field(description="In the deployment's currency; 0: none")

    @classmethod
    def of(cls, limits: KeyLimits) -> "LimitsPublic":
        return cls(
            **vars(limits) | {"monthly_spend_limit": format_amount(limits.monthly_spend_limit)}
        )


class ApiKeyCreate(BaseModel):
    """A new API key. Unset limits take the server's defaults."""

    model_config = STRICT_INPUT

    name: str = Field(min_length=1, max_length=200, examples=["analytics team"])
    role: Literal["user", "admin"] = "user"
    rate_limit_per_minute: JsonIntOrNone = RateLimitField
    max_concurrent_jobs: JsonIntOrNone = ConcurrencyField
    monthly_token_quota: JsonIntOrNone = QuotaField
    monthly_spend_limit: SpendLimitOrNone = SpendLimitField

    @field_validator("name")
    @classmethod
    def name_has_no_nul(cls, name: str) -> str:
        return reject_nul(name, "name")


class ApiKeyUpdate(BaseModel):
    """New name or limits for a key; only the fields sent change, and null restores a limit's
    default."""

    model_config = STRICT_INPUT

    # Published without null, which name_is_text refuses: leave name out to keep it.
    name: Annotated[
        str | None, WithJsonSchema({"type": "string", "minLength": 1, "maxLength": 200})
    ] = Field(default=None, min_length=1, max_length=200)
    rate_limit_per_minute: JsonIntOrNone = RateLimitField
    max_concurrent_jobs: JsonIntOrNone = ConcurrencyField
    monthly_token_quota: JsonIntOrNone = QuotaField
    monthly_spend_limit: SpendLimitOrNone = SpendLimitField

    @field_validator("name")
    @classmethod
    def name_is_text(cls, name: str | None) -> str | None:
        if name is None:
            raise ValueError("name cannot be null; leave it out to keep it")
        return reject_nul(name, "name")


class ApiKeyPublic(BaseModel):
    id: uuid.UUID
    object: str = "api_key"
    name: str
    prefix: str = Field(description="The key's first characters, to recognise it")
    role: Literal["user", "admin"]
    rate_limit_per_minute: int | None = Field(description="The key's own limit; null: default")
    max_concurrent_jobs: int | None
    monthly_token_quota: int | None
    monthly_spend_limit: str | None = Field(description="The key's own limit; null: none")
    limits: LimitsPublic
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None = Field(
        description="When the key was last seen, to within a few seconds"
    )

    @classmethod
    def from_row(cls, row: ApiKey, limits: KeyLimits) -> "ApiKeyPublic":
        return cls(
            id=row.id,
            name=row.name,
            prefix=row.prefix,
            role=row.role,  # type: ignore[arg-type]
            rate_limit_per_minute=row.rate_limit_per_minute,
            max_concurrent_jobs=row.max_concurrent_jobs,
            monthly_token_quota=row.monthly_token_quota,
            monthly_spend_limit=(
                None if row.monthly_spend_limit is None else format_amount(row.monthly_spend_limit)
            ),
            limits=LimitsPublic.of(limits),
            created_at=row.created_at,
            revoked_at=row.revoked_at,
            last_used_at=row.last_used_at,
        )


class ApiKeyCreated(ApiKeyPublic):
    key: str = Field(description="The key itself. It is shown this once and never stored.")


class ApiKeysPublic(BaseModel):
    object: str = "list"
    data: list[ApiKeyPublic]
    total: int
    limit: int
    offset: int


class UsageTotals(BaseModel):
    jobs: int = Field(description="Finished jobs that used tokens")
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int = Field(description="Of total_tokens, those answered from the cache")
    cost: list[CostPublic] = Field(
        description="What the jobs cost at their model's price when each finished, per "
        "currency; empty when no model had a price"
    )

    @classmethod
    def of(cls, totals: Totals) -> "UsageTotals":
        return cls(
            jobs=totals.jobs,
            prompt_tokens=totals.prompt_tokens,
            completion_tokens=totals.completion_tokens,
            total_tokens=totals.total_tokens,
            cached_tokens=totals.cached_tokens,
            cost=costs_public(totals.cost),
        )


class ModelUsage(UsageTotals):
    model: str


class DayUsage(UsageTotals):
    date: date


class QuotaPublic(BaseModel):
    monthly_token_quota: int = Field(description="0: no quota")
    used_this_month: int = Field(description="Tokens computed this calendar month (UTC)")
    remaining: int | None = Field(description="null: no quota")


class SpendPublic(BaseModel):
    """The key's spend this calendar month (UTC), in the deployment's currency."""

    currency: str
    monthly_spend_limit: str = Field(description="0: no limit")
    spent_this_month: str
    remaining: str | None = Field(description="null: no limit")


class UsagePublic(BaseModel):
    """One key's usage over a period of UTC days, both ends included."""

    object: str = "usage"
    key_id: uuid.UUID | None
    start: date
    end: date
    total: UsageTotals
    by_model: list[ModelUsage]
    by_day: list[DayUsage]
    limits: LimitsPublic
    quota: QuotaPublic
    spend: SpendPublic | None = Field(description="null: no model has a price")


class KeyUsage(UsageTotals):
    owner: str | None = Field(description="The API key's id, as jobs store it")
    key_id: uuid.UUID | None = Field(description="null: jobs made with auth off")
    name: str | None
    prefix: str | None


class UsageByKeyPublic(BaseModel):
    """Everyone's usage over a period of UTC days, both ends included, per key."""

    object: str = "usage"
    start: date
    end: date
    total: UsageTotals
    data: list[KeyUsage]


class AdminJobPublic(JobPublic):
    owner: str | None = Field(description="The id of the API key that submitted the job")

    @classmethod
    def from_row(cls, job: Job) -> "AdminJobPublic":
        return cls(**JobPublic.from_row(job).model_dump(), owner=job.owner)


class AdminJobsPublic(BaseModel):
    object: str = "list"
    data: list[AdminJobPublic]
    total: int
    limit: int
    offset: int
