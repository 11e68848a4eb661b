"""Print the tinker SDK's public surface as one line of JSON: section (`tinker.ServiceClient`,
..., `tinker`, `tinker.types`) → its public names. Run in a child process whose path holds one
SDK release (tinker_sdk.sdk_directory); imports nothing of Bios."""

from __future__ import annotations

import inspect
import json

import tinker
from tinker import types
from tinker.lib.public_interfaces.api_future import APIFuture


def methods(cls: type) -> list[str]:
    """The public methods and properties `cls` defines."""
    return sorted(n for n, v in vars(cls).items() if not n.startswith("_") and (callable(v) or isinstance(v, property)))


def public(module: object) -> list[str]:
    """The public names of `module` that are not modules themselves."""
    return sorted(n for n in dir(module) if not n.startswith("_") and not inspect.ismodule(getattr(module, n)))


clients = (tinker.ServiceClient, tinker.TrainingClient, tinker.SamplingClient, tinker.RestClient)
surface = {f"tinker.{c.__name__}": methods(c) for c in clients}
surface["tinker.APIFuture"] = methods(APIFuture)
surface["tinker"] = public(tinker)
surface["tinker.types"] = [n for n in public(types) if n != "annotations"]  # a `from __future__` leftover
print(json.dumps(surface))
