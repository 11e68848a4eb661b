"""The `bios` command line: `bios demo`, `bios models`, `bios checkpoints list|delete`."""

from __future__ import annotations

import argparse
import sys

from bios.errors import BiosError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bios", description="Bios: LoRA fine-tuning service API")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="fine-tune a LoRA on the built-in model and sample from it")
    demo.add_argument("--backend", default=None, help="backend name or module:factory (default: BIOS_BACKEND or emulator)")
    demo.add_argument("--model", default="bios/tiny", help="base model (default: bios/tiny)")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: the task's own)")
    demo.add_argument("--seed", type=int, default=0)

    models = commands.add_parser("models", help="list the models this installation serves")
    models.add_argument("--backend", default=None)

    checkpoints = commands.add_parser("checkpoints", help="list or delete saved checkpoints")
    checkpoint_commands = checkpoints.add_subparsers(dest="action", required=True)
    listing = checkpoint_commands.add_parser("list")
    listing.add_argument("--session", default=None)
    delete = checkpoint_commands.add_parser("delete")
    delete.add_argument("path")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the process exit status (2 for a Bios error)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            from bios.demo import run_demo

            run_demo(backend=args.backend, model=args.model, steps=args.steps, seed=args.seed)
        elif args.command == "models":
            from bios.service_client import ServiceClient

            for info in ServiceClient(backend=args.backend).get_server_capabilities().supported_models:
                origin = "random-init" if info.random_init else "trained"
                print(f"{info.model_name:28s} {info.architecture:6s} {info.n_params / 1e6:8.2f}M params  {origin}")
        elif args.command == "checkpoints":
            from bios.config import bios_home
            from bios.engine import CheckpointStore

            store = CheckpointStore(bios_home() / "checkpoints")
            if args.action == "list":
                for record in store.list(args.session):
                    print(f"{record.path}  step={record.step}  {record.base_model}")
            else:
                store.delete(args.path)
                print(f"deleted {args.path}")
    except BiosError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
