"""Finding backends by name: the `bios.backends` entry-point group, or a `module:factory` string."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points

from bios.backend import Backend, BackendConfig
from bios.errors import InvalidRequestError

GROUP = "bios.backends"


def available_backends() -> list[str]:
    """Names registered in the `bios.backends` entry-point group."""
    return sorted(ep.name for ep in entry_points(group=GROUP))


def backend_factory(name: str) -> Callable[[BackendConfig], Backend]:
    """The factory registered as `name`, or imported from `module:factory`."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            factory: Callable[[BackendConfig], Backend] = getattr(importlib.import_module(module_name), attr)
            return factory
        except (ImportError, AttributeError) as exc:
            raise InvalidRequestError(f"backend {name!r} cannot be imported: {exc}", field="backend") from None
    for ep in entry_points(group=GROUP):
        if ep.name == name:
            loaded: Callable[[BackendConfig], Backend] = ep.load()
            return loaded
    raise InvalidRequestError(
        f"backend {name!r} is unknown; installed backends: {', '.join(available_backends()) or 'none'} "
        "(or give module:factory)",
        field="backend",
    )


def create_backend(name: str, config: BackendConfig) -> Backend:
    """Build the backend `name` with `config`."""
    return backend_factory(name)(config)
