"""`bios serve`: the engine behind a multi-tenant HTTP API (FastAPI + uvicorn).

`build(options)` assembles catalog, backend (under the service simulator when
`options.simulation` names a profile), engine, database, keys and the FastAPI app;
`serve(options)` runs it with uvicorn. Needs the `server` extra.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from bios.admission import DIRECT
from bios.backend import Backend, BackendConfig, ProcessGroup
from bios.catalog import BUILTIN_MODELS, Catalog
from bios.config import bios_home
from bios.engine import CheckpointStore, Engine, create_backend
from bios.errors import InvalidRequestError
from bios.simulation import SimulationConfig, simulate


@dataclass(frozen=True)
class ServerOptions:
    """What `bios serve` is told. `models`: a TOML catalog (None serves the built-in models);
    `database_url`: SQLAlchemy URL (None: SQLite under home); `keys_file`: default home/server/keys;
    `simulation`: a TOML simulation profile (bios.simulation) to run the backend under the
    service simulator, None for none."""

    host: str = "127.0.0.1"
    port: int = 8000
    backend: str = "emulator"
    backend_options: tuple[tuple[str, str], ...] = ()
    models: Path | None = None
    no_auth: bool = False
    home: Path | None = None
    database_url: str | None = None
    keys_file: Path | None = None
    max_body_bytes: int = 64 << 20
    retention_s: float = 3600.0
    simulation: Path | None = None


def load_catalog(path: Path | None) -> Catalog:
    """The models of a TOML catalog: `[[model]]` tables with `name` (a built-in model) and
    optionally `path` (a Hugging Face model directory served under that name)."""
    if path is None:
        return Catalog()
    try:
        entries = tomllib.loads(Path(path).read_text(encoding="utf-8")).get("model", [])
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InvalidRequestError(f"models: cannot read the catalog {path}: {exc}", field="models") from None
    catalog = Catalog({})
    for i, entry in enumerate(entries):
        name = entry.get("name")
        if not isinstance(name, str):
            raise InvalidRequestError(f"models: [[model]] number {i + 1} in {path} has no name", field="models")
        if "path" in entry:
            catalog.register_hf_directory(name, Path(path).parent / entry["path"])
        elif name in BUILTIN_MODELS:
            catalog.register(BUILTIN_MODELS[name])
        else:
            raise InvalidRequestError(
                f"models: {name!r} is not a built-in model "
                f'({", ".join(sorted(BUILTIN_MODELS))}); give its directory as path = "..."',
                field="models",
            )
    return catalog


def check_bind(host: str, no_auth: bool) -> None:
    """--no-auth is refused unless `host` is a loopback address."""
    if not no_auth:
        return
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise InvalidRequestError(
            f"host: --no-auth serves only on a loopback address (127.0.0.1, ::1), not {host!r}", field="host"
        )


def compute_for(options: ServerOptions) -> tuple[Catalog, Backend]:
    """The catalog and the backend `options` serve. With a multi-process backend (ProcessGroup),
    this joins the process group: every process calls it, and only the leader goes on to `build`."""
    catalog = load_catalog(options.models)
    if options.models is None:  # an explicit TOML catalog lists exactly what is served
        catalog.register_installed((options.home or bios_home()).resolve() / "models")
    return catalog, create_backend(
        options.backend, BackendConfig(catalog=catalog, options=dict(options.backend_options))
    )


def build(options: ServerOptions, compute: tuple[Catalog, Backend] | None = None):
    """The FastAPI app and its `Service` for `options` (on `compute`, the catalog and backend
    from `compute_for`, or new ones); InvalidRequestError (before anything is
    built) for a bad simulation profile. The engine never runs backend calls inline: they
    would run on the event loop's thread."""
    from bios.server.app import create_app
    from bios.server.auth import KeyRing
    from bios.server.db import Records, connect, default_url
    from bios.server.journal import Journal
    from bios.server.recovery import recover
    from bios.server.service import Service

    check_bind(options.host, options.no_auth)
    home = (options.home or bios_home()).resolve()
    simulation = SimulationConfig.from_toml(options.simulation) if options.simulation is not None else None
    catalog, backend = compute or compute_for(options)
    simulator = simulate(backend, simulation, catalog) if simulation is not None else None
    if simulator is not None:
        backend = simulator.backend
    store = CheckpointStore(home / "checkpoints", getattr(backend, "checkpoint_format", "safetensors"))
    records = Records(connect(options.database_url or default_url(home)))
    keys = KeyRing(
        options.keys_file or home / "server" / "keys",
        os.environ.get("BIOS_API_KEYS"),
        enabled=not options.no_auth,
        operator_keys=os.environ.get("BIOS_OPERATOR_KEYS"),
    )
    if keys.enabled and not len(keys):
        raise InvalidRequestError(
            "api keys: none configured; run `bios keys create NAME`, set BIOS_API_KEYS, or pass --no-auth", field="keys"
        )
    service = Service(
        Engine(backend, catalog, store, hook=simulator.hook if simulator else DIRECT, allow_inline=False),
        records,
        Journal(home / "server" / "journal"),
        retention_s=options.retention_s,
        simulator=simulator,
    )
    app = create_app(service, keys, max_body_bytes=options.max_body_bytes)
    recovered = recover(service, app.state.tinker.resume)
    if recovered.sessions or recovered.samplers or recovered.resumed or recovered.interrupted:
        logging.getLogger("bios.server").warning("restored %s", recovered)
    return app, service


def serve(options: ServerOptions) -> None:
    """Build the server and run it until interrupted (Ctrl-C or SIGTERM); under the simulator,
    print its report (and write its trace file, if the profile names one) on the way out."""
    import signal
    import sys
    import threading

    import uvicorn

    check_bind(options.host, options.no_auth)
    compute = compute_for(options)
    backend = compute[1]
    if isinstance(backend, ProcessGroup) and not backend.leads():
        backend.follow()  # until the leader's server closes
        return
    app, service = build(options, compute)
    if threading.current_thread() is threading.main_thread():
        # uvicorn shuts down gracefully on SIGTERM, then raises it again; without a handler that
        # would kill the process before the cleanup below. Exit with the shell's status for it.
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        uvicorn.run(app, host=options.host, port=options.port, log_level="warning", timeout_keep_alive=75)
    finally:
        service.close()
        try:
            report = service.simulation_report()
            if report is not None:
                print(report, file=sys.stderr)
        finally:
            service.engine.close()


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)
