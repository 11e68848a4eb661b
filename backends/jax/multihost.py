"""Serving from several processes (one per host) on `jax.distributed`: SPMD by broadcast calls.

Every process holds a `JaxBackend` replica over one global mesh (all processes' devices).
Process 0 leads: it takes the engine's calls and, before running each one, broadcasts the
method name and its arguments (a pickled payload: its length first, then the bytes padded to
a power of two so that few broadcast programs compile). Every other process follows: it
receives each call and runs it on its own replica, so all processes run the same compiled
programs on the same inputs in the same order, and the collectives inside them meet.
Results stay on each process; only process 0's go back to the engine. A call that fails
fails identically everywhere (the inputs are the same), so an error never desynchronises
the processes; `close` on the leader ends every follower's loop.

Randomness the backend would draw itself (sampling with `seed` None) is drawn once on the
leader and sent with the call, so every replica draws the same tokens. Checkpoints are
written by process 0 alone, as safetensors, from the replicated state that `export_state`
copies to the host; a checkpoint is loaded by process 0 and its state travels to the other
processes inside the broadcast `create_adapter` call, so followers need no shared disk.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
import secrets
from collections.abc import Sequence
from typing import cast

import jax
import numpy as np
from jax.experimental import multihost_utils

from backends.jax.backend import JaxBackend
from bios.backend import (
    AdapterSpec,
    AdapterState,
    ForwardBackwardOutput,
    ForwardBackwardWork,
    OptimStepOutput,
    OptimStepWork,
    ResultCallback,
    SampleOutput,
    SampleWork,
)
from bios.errors import BiosError, InvalidRequestError

OPTIONS = ("coordinator", "num_processes", "process_id", "distributed")
"""Backend options that make the backend span several processes (see `initialize`)."""
MIN_PAYLOAD = 1024
"""Smallest broadcast payload in bytes; larger ones are padded to a power of two."""
CLOSE = "close"

log = logging.getLogger("bios.backends.jax.multihost")


def wanted(options: dict[str, str]) -> bool:
    """Whether `options` ask for a multi-process backend."""
    return any(name in options for name in OPTIONS)


def initialize(options: dict[str, str]) -> None:
    """Join the process group before any device is touched.

    `coordinator` ("host:port" of process 0), `num_processes` and `process_id` are passed to
    `jax.distributed.initialize`; any left out (or all, with `distributed=auto`) are detected
    by JAX from the environment. CPU devices talk through gloo collectives.
    Raises InvalidRequestError naming the option when one is malformed.
    """
    arguments: dict[str, str | int] = {}
    if "coordinator" in options:
        arguments["coordinator_address"] = options["coordinator"]
    for name in ("num_processes", "process_id"):
        if name in options:
            try:
                arguments[name] = int(options[name])
            except ValueError:
                raise InvalidRequestError(f"{name} must be an integer, got {options[name]!r}", field=name) from None
    if options.get("distributed", "auto") != "auto":
        raise InvalidRequestError(
            f"distributed must be 'auto' (detect the cluster), got {options['distributed']!r}", field="distributed"
        )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**arguments)  # type: ignore[arg-type]


class Channel:
    """Python objects sent from process 0 to every process, in order (a collective: every
    process calls `send` or `receive` once per message)."""

    def send(self, message: object) -> None:
        """Process 0: deliver `message` (picklable) to every process."""
        self._transfer(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))

    def receive(self) -> object:
        """Any other process: the next message process 0 sent."""
        return pickle.loads(self._transfer(b""))

    @staticmethod
    def _transfer(payload: bytes) -> bytes:
        source = jax.process_index() == 0
        length = int(multihost_utils.broadcast_one_to_all(np.int64(len(payload)), is_source=source))
        size = max(MIN_PAYLOAD, 1 << (length - 1).bit_length())
        buffer = np.zeros(size, np.uint8)
        buffer[: len(payload)] = np.frombuffer(payload, np.uint8)
        received = multihost_utils.broadcast_one_to_all(buffer, is_source=source)
        return np.asarray(received)[:length].tobytes()


class MultihostBackend:
    """A `JaxBackend` replica in every process, driven by process 0 (see the module docstring).

    On process 0 it is the engine's backend (the Backend protocol) and `leads()` is True; on
    the others, `follow()` runs the calls process 0 broadcasts until it closes, and the
    Backend methods raise RuntimeError.
    """

    name = "jax"
    checkpoint_format = "safetensors"
    """Process 0 writes checkpoints alone, from host copies: no collective write."""

    def __init__(self, replica: JaxBackend, channel: Channel | None = None) -> None:
        self.replica = replica
        self.channel = channel or Channel()
        self.process_id = jax.process_index()
        self.process_count = jax.process_count()

    def leads(self) -> bool:
        return self.process_id == 0

    def follow(self) -> None:
        """Run every call process 0 broadcasts, on this replica, until it closes.

        A call's BiosError is process 0's to report (it raised the same one); any other
        exception is logged and the loop goes on, as process 0's engine does.
        """
        if self.leads():
            raise RuntimeError("process 0 leads; only the other processes follow")
        while True:
            method, arguments = cast(tuple[str, tuple], self.channel.receive())
            if method == CLOSE:
                self.replica.close()
                return
            try:
                getattr(self.replica, method)(*arguments)
            except BiosError:
                pass
            except Exception:  # the leader's engine reports it; stay in lockstep
                log.exception("process %d: %s failed", self.process_id, method)

    def _broadcast(self, method: str, *arguments: object) -> None:
        """Process 0: send the call to the followers (before running it here)."""
        if not self.leads():
            raise RuntimeError(f"process {self.process_id} follows process 0; only process 0 takes calls")
        self.channel.send((method, arguments))

    # ---- the Backend protocol, on process 0 ----------------------------------------------------

    def create_adapter(self, spec: AdapterSpec, state: AdapterState | None = None) -> None:
        self._broadcast("create_adapter", spec, state)
        self.replica.create_adapter(spec, state)

    def delete_adapter(self, adapter_id: str) -> None:
        self._broadcast("delete_adapter", adapter_id)
        self.replica.delete_adapter(adapter_id)

    def export_state(self, adapter_id: str) -> AdapterState:
        """Replicated state: each process copies its own; process 0's is returned."""
        self._broadcast("export_state", adapter_id)
        return self.replica.export_state(adapter_id)

    def forward_backward(
        self, work: Sequence[ForwardBackwardWork], on_result: ResultCallback | None = None
    ) -> list[ForwardBackwardOutput | BiosError]:
        self._broadcast("forward_backward", list(work))
        return self.replica.forward_backward(work, on_result)

    def optim_step(
        self, work: Sequence[OptimStepWork], on_result: ResultCallback | None = None
    ) -> list[OptimStepOutput | BiosError]:
        self._broadcast("optim_step", list(work))
        return self.replica.optim_step(work, on_result)

    def sample(
        self, work: Sequence[SampleWork], on_result: ResultCallback | None = None
    ) -> list[SampleOutput | BiosError]:
        """Items without a seed get one drawn here, so every replica draws the same tokens."""
        seeded = [
            item if item.seed is not None else dataclasses.replace(item, seed=secrets.randbits(64)) for item in work
        ]
        self._broadcast("sample", seeded)
        return self.replica.sample(seeded, on_result)

    def close(self) -> None:
        """Close every replica; the followers' loops return."""
        if self.leads():
            self.channel.send((CLOSE, ()))
        self.replica.close()
