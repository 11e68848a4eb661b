"""The registry of conformance properties, one module per capability.

A property is a plain function `prop_NAME(pair, **drawn)` registered with `@conformance_property`,
which names, for each drawn argument, a factory `spec -> SearchStrategy` (the strategies need
the served model's vocabulary and lengths, known only once the pair is built). The runner turns
it into a Hypothesis test with `settings(profile)(given(**strategies)(fn))` and calls it with
the pair. `REGISTRY` maps each property's name (its function name) to its `Property`, in
registration order: forward, training, dropout, sampling, state, errors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hypothesis import strategies as st

StrategyFactory = Callable[[dict], st.SearchStrategy]


@dataclass(frozen=True)
class Property:
    """name: `prop_...`; body: `body(pair, **drawn)`; strategies: argument → factory(spec)."""

    name: str
    body: Callable[..., None]
    strategies: dict[str, StrategyFactory]

    @property
    def doc(self) -> str:
        """The first line of the property's docstring."""
        return (self.body.__doc__ or "").strip().splitlines()[0] if self.body.__doc__ else ""


REGISTRY: dict[str, Property] = {}


def conformance_property(**strategies: StrategyFactory) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register the decorated `prop_*` function with the strategies of its drawn arguments."""

    def register(fn: Callable[..., None]) -> Callable[..., None]:
        if not fn.__name__.startswith("prop_"):
            raise ValueError(f"property {fn.__name__} must be named prop_...")
        REGISTRY[fn.__name__] = Property(fn.__name__, fn, strategies)
        return fn

    return register


from conformance.properties import (  # noqa: E402,F401  (registers them)
    dropout,
    errors,
    forward,
    sampling,
    state,
    training,
)
