"""The `/api/v1` router that serves the official Tinker SDK from a Bios `Service`."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI

from bios.server.auth import KeyRing
from bios.server.service import Service
from bios.server.state import state_of
from bios.server.tinker import (
    account_routes,
    rest_routes,
    sampling_routes,
    session_routes,
    training_routes,
    weights_routes,
)
from bios.server.tinker.context import Tinker, install_on

router = APIRouter(prefix="/api/v1", tags=["tinker"])
for _part in (session_routes, training_routes, weights_routes, sampling_routes, rest_routes, account_routes):
    router.include_router(_part.router)


def install(app: FastAPI, service: Service, keys: KeyRing) -> None:
    """Answer the Tinker SDK's `/api/v1` requests on `app`, from `service`, to the holders of `keys`."""
    install_on(app, Tinker(service, keys, state_of(app).signer))
    app.include_router(router)
