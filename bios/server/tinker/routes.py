"""The `/api/v1` router that serves the official Tinker SDK from a Bios `Service`."""

from __future__ import annotations

from fastapi import APIRouter

from bios.server.auth import KeyRing
from bios.server.service import Service
from bios.server.tinker.context import Tinker
from bios.server.tinker.rest_routes import add_rest_routes
from bios.server.tinker.sampling_routes import add_sampling_routes
from bios.server.tinker.session_routes import add_session_routes
from bios.server.tinker.training_routes import add_training_routes


def tinker_router(service: Service, keys: KeyRing) -> APIRouter:
    """Routes under `/api/v1` speaking the Tinker SDK's protocol to the holders of `keys`."""
    tinker = Tinker(service, keys)
    router = APIRouter(prefix="/api/v1", tags=["tinker"])
    add_session_routes(router, tinker)
    add_training_routes(router, tinker)
    add_sampling_routes(router, tinker)
    add_rest_routes(router, tinker)
    return router
