"""The answers of requests: `GET /v1/requests/{id}`, long-polled on the event loop."""

from __future__ import annotations

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse, Response

from bios import wire
from bios.errors import NotFoundError
from bios.server.state import OwnerDep, ServiceDep

router = APIRouter()

JSON = "application/json"


@router.get("/v1/requests/{request_id}")
async def request_answer(
    request_id: str, who: OwnerDep, service: ServiceDep, wait: float = Query(0.0, ge=0.0)
) -> Response:
    """The request's answer envelope; 408 while it is still running after `wait` seconds."""
    found = await service.wait(who, request_id, min(wait, wire.MAX_WAIT_S))
    if found is not None and not found.startswith(b"{"):  # a request of the Tinker protocol, answered there
        raise NotFoundError(f"request_id: no request {request_id!r}", field="request_id")
    if found is None:
        return JSONResponse({"status": "pending", "request_id": request_id}, status_code=408)
    return Response(found, media_type=JSON)
