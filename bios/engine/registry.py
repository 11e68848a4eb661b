"""Finding backends by name: the `bios.backends` entry-point group, or a `module:factory` string."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points

from bios.backend import Backend, BackendConfig
from bios.catalog import Catalog
from bios.errors import InvalidRequestError
from bios.simulation import SimulationConfig

GROUP = "bios.backends"
SIMULATOR_GROUP = "bios.simulator"


def available_backends() -> list[str]:
    """Names registered in the `bios.backends` entry-point group."""
    return sorted(ep.name for ep in entry_points(group=GROUP))


def backend_factory(name: str) -> Callable[[BackendConfig], Backend]:
    """The factory registered as `name`, or imported from `module:factory`."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise InvalidRequestError(f"backend {name!r} cannot be imported: {exc}", field="backend") from None
    for ep in entry_points(group=GROUP):
        if ep.name == name:
            return ep.load()
    raise InvalidRequestError(
        f"backend {name!r} is unknown; installed backends: {', '.join(available_backends()) or 'none'} "
        "(or give module:factory)",
        field="backend",
    )


def create_backend(name: str, config: BackendConfig) -> Backend:
    """Build the backend `name` with `config`."""
    return backend_factory(name)(config)


def simulated(backend: Backend, config: SimulationConfig, catalog: Catalog) -> Backend:
    """`backend` wrapped by the service simulator (entry point `default` of `bios.simulator`)."""
    for ep in entry_points(group=SIMULATOR_GROUP):
        if ep.name == "default":
            return ep.load()(backend, config, catalog)
    raise InvalidRequestError(
        "simulation: no service simulator is installed (entry point bios.simulator:default)", field="simulation"
    )
