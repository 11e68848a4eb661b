"""`Transport`: the in-process `Engine` and the `HttpTransport` both offer every member of the
protocol with the protocol's signature (mypy checks the same through `bios.transport.connect`),
and a remote client loads no engine code."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

import bios
from bios.transport import Transport
from bios.transport.http import HttpTransport

REPO = Path(__file__).resolve().parents[2]
MEMBERS = sorted(name for name in vars(Transport) if not name.startswith("_"))


def _check_signature(name: str, implementation: object) -> None:
    """Every parameter of the protocol's `name` is accepted the same way by the implementation,
    whose extra parameters are optional keywords; both are coroutines or neither is."""
    wanted, offered = getattr(Transport, name), getattr(implementation, name)
    assert inspect.iscoroutinefunction(wanted) == inspect.iscoroutinefunction(offered), name
    params = inspect.signature(offered).parameters
    for param in inspect.signature(wanted).parameters.values():
        if param.name == "self":
            continue
        got = params.get(param.name)
        assert got is not None, f"{name}: no parameter {param.name}"
        assert (got.kind, got.default) == (param.kind, param.default), f"{name}({param.name})"
    extra = set(params) - set(inspect.signature(wanted).parameters)
    for param in (params[n] for n in extra):
        assert param.kind is param.KEYWORD_ONLY and param.default is not param.empty, f"{name}: {param.name}"


@pytest.mark.inprocess
def test_the_engine_and_the_http_transport_offer_the_whole_protocol(service: bios.ServiceClient) -> None:
    remote = HttpTransport("http://127.0.0.1:9", None)  # nothing is sent before the first call
    try:
        for transport in (service.transport, remote):
            for name in MEMBERS:
                if isinstance(vars(Transport)[name], property):
                    found = inspect.getattr_static(transport, name, None)  # an attribute or a property
                    assert found is not None, f"{type(transport).__name__}.{name}"
                else:
                    _check_signature(name, transport)
    finally:
        remote.close()


def test_a_remote_client_loads_no_engine_code() -> None:
    code = (
        "import sys, bios\n"
        "bios.ServiceClient(base_url='http://127.0.0.1:9')\n"
        "print(sorted(m for m in sys.modules if m.startswith(('bios.engine', 'bios.server'))))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
