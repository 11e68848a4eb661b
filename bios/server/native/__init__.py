"""Bios's own `/v1` protocol (one route per client operation, see `bios.wire`), one router per
concern: `discovery` (health, stats, capabilities, tokenizers), `sessions`, `training` (the
ordered requests of a session), `samplers`, `requests` (answers and long-polls) and
`checkpoints`. `router` holds them all, in that order."""

from fastapi import APIRouter

from bios.server.native import checkpoints, discovery, requests, samplers, sessions, training

router = APIRouter()
for _part in (discovery, sessions, training, samplers, requests, checkpoints):
    router.include_router(_part.router)

__all__ = ["router"]
