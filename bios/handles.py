"""Handles the service gives out for objects it keeps: `SamplerHandle`.

Contract layer: imports only the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SamplerHandle:
    """A sampling target: a frozen adapter (`adapter_id`, made from checkpoint `checkpoint_id`)
    or the bare base model (both None). A client needs only `sampler_id` and `base_model`; the
    adapter fields are the engine's own (a remote handle leaves them None)."""

    sampler_id: str
    base_model: str
    adapter_id: str | None = None
    checkpoint_id: str | None = None
