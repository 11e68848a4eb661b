"""The engine: everything between the public API and the arithmetic (ordering, batching,
futures, checkpoints). Shared by the in-process transport and the server."""

from bios.engine.checkpoints import CheckpointStore
from bios.engine.engine import Engine
from bios.engine.registry import available_backends, create_backend
from bios.engine.samplers import SamplerHandle

__all__ = ["CheckpointStore", "Engine", "SamplerHandle", "available_backends", "create_backend"]
