"""`llmq keys create|list|revoke`: API keys, managed straight in Postgres (LLMQ_DATABASE_URL), so
that the first admin key can be made before any exists. The key is printed once, alone on
stdout (`export LLMQ_API_KEY=$(llmq keys create --name ci)`); only its hash is stored."""

from decimal import Decimal, InvalidOperation
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from llmq.settings import get_settings

keys_app = typer.Typer(help="API keys: create, list, revoke.", no_args_is_help=True)
console = Console(stderr=True)

LimitOption = Annotated[int | None, typer.Option(min=0, help="0: no limit (default: settings)")]
SpendOption = Annotated[
    str | None,
    typer.Option(help="Spend per calendar month in the models' price currency, e.g. 25.50"),
]


def spend_limit(value: str | None) -> Decimal | None:
    """The option as an exact amount: non-negative, at most 4 decimal places."""
    if value is None:
        return None
    try:
        amount = Decimal(value)
    except InvalidOperation:
        raise typer.BadParameter(f"{value!r} is not an amount; write e.g. 25.50") from None
    if not amount.is_finite() or amount < 0 or -amount.as_tuple().exponent > 4:  # type: ignore[operator]
        raise typer.BadParameter(
            f"{value} must be a non-negative amount with at most 4 decimal places, e.g. 25.50"
        )
    if amount >= 10**12:
        raise typer.BadParameter(f"{value} is too large; the most is 999999999999.9999")
    return amount


@keys_app.command("create")
def create_key(
    name: Annotated[str, typer.Option(help="Who or what the key is for")],
    admin: Annotated[bool, typer.Option("--admin", help="An admin key (default: a user key)")] = (
        False
    ),
    rate_limit_per_minute: LimitOption = None,
    max_concurrent_jobs: LimitOption = None,
    monthly_token_quota: LimitOption = None,
    monthly_spend_limit: SpendOption = None,
) -> None:
    """Create an API key and print it: it is shown this once."""
    from db.queries import keys as key_queries
    from db.session import session_scope

    role = key_queries.Role.ADMIN if admin else key_queries.Role.USER
    limits = key_queries.Limits(
        rate_limit_per_minute,
        max_concurrent_jobs,
        monthly_token_quota,
        spend_limit(monthly_spend_limit),
    )
    with session_scope(get_settings().database_url) as session:
        row, key = key_queries.create_key(session, name, role, limits)
        key_id = row.id
    console.print(f"created {role} key {key_id} ({name}); store it now, it is not shown again:")
    typer.echo(key)


@keys_app.command("list")
def list_keys(
    revoked: Annotated[bool, typer.Option(help="Include revoked keys")] = True,
) -> None:
    """Show the keys: id, name, prefix, role, their own limits, and when they were last used."""
    from db.queries import keys as key_queries
    from db.session import session_scope

    def shown(value: object) -> str:
        return "default" if value is None else str(value)

    table = Table("id", "name", "prefix", "role", "per minute", "concurrent", "monthly tokens",
                  "monthly spend", "created", "last used", "revoked")  # fmt: skip
    with session_scope(get_settings().database_url) as session:
        rows, _ = key_queries.list_keys(session, include_revoked=revoked, limit=10_000)
        for row in rows:
            table.add_row(
                str(row.id),
                row.name,
                row.prefix,
                row.role,
                shown(row.rate_limit_per_minute),
                shown(row.max_concurrent_jobs),
                shown(row.monthly_token_quota),
                "none" if row.monthly_spend_limit is None else f"{row.monthly_spend_limit:f}",
                f"{row.created_at:%Y-%m-%d %H:%M}",
                f"{row.last_used_at:%Y-%m-%d %H:%M}" if row.last_used_at else "",
                f"{row.revoked_at:%Y-%m-%d %H:%M}" if row.revoked_at else "",
            )
    out = Console()
    # Piped, the table keeps whole lines rather than wrap at 80 columns.
    (out if out.is_terminal else Console(width=220)).print(table)


@keys_app.command("revoke")
def revoke_key(
    key: Annotated[str, typer.Argument(help="The key's id, or the start of its prefix")],
) -> None:
    """Revoke a key: API processes refuse it within LLMQ_AUTH_CACHE_S seconds."""
    from db.queries import keys as key_queries
    from db.session import session_scope

    with session_scope(get_settings().database_url) as session:
        found = key_queries.find_keys(session, key)
        if len(found) != 1:
            matches = ", ".join(f"{row.id} ({row.prefix})" for row in found) or "none"
            console.print(f"[red]{key!r} must name exactly one key; it matches: {matches}[/red]")
            raise typer.Exit(1)
        row = key_queries.revoke_key(session, found[0].id)
        assert row is not None
        console.print(f"revoked key {row.id} ({row.name}, {row.prefix})")
