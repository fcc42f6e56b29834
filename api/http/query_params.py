"""Every query parameter of this API takes one value: a repeated one is refused with a 400, not
read as its last value (FastAPI's way), so `?limit=5&limit=500` cannot mean 500 by surprise."""

from collections import Counter

from fastapi import Request

from llmq.errors import InvalidRequest


async def single_query_values(request: Request) -> None:
    """An app-wide dependency: 400 naming the first query parameter that is sent twice."""
    counts = Counter(name for name, _ in request.query_params.multi_items())
    repeated = [name for name, count in counts.items() if count > 1]
    if repeated:
        name = repeated[0]
        raise InvalidRequest(
            f"query parameter {name!r} is given {counts[name]} times; send it once", param=name
        )
