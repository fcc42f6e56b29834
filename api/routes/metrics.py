"""Prometheus metrics of this API process, open to scrapers like the health probes."""

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from api.metrics import exposition

router = APIRouter(tags=["metrics"])


@router.get("/metrics", include_in_schema=False)
def read_metrics(request: Request) -> Response:
    """Prometheus text format: HTTP traffic, submitted jobs, queue depth and live workers."""
    return Response(exposition(request.app.state.scrape_registry), media_type=CONTENT_TYPE_LATEST)
