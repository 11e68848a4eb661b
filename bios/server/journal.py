"""The durable state of every training session of `bios serve`.

After each change of a session's adapter that the server acknowledges (creation, every
`optim_step`, `load_state`) the adapter — LoRA weights, Adam moments, step — is written here
before the acknowledgment is published, as ONE safetensors file per session replaced
atomically (`os.replace`), so a `kill -9` leaves either the old or the new state, never half.
The entry also holds the sequence number and the id and answer of the request that made it:
if the server dies after writing the state but before committing the answer, the restart
acknowledges that request with this answer instead of losing or repeating the step.

Cost: one device→host copy and one file of 3 × (LoRA parameters) float32 values per step,
written by the server's answer thread while the engine computes the next request; only the
acknowledgment of that step waits for it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load, save_file

from bios.backend import AdapterSpec, AdapterState

_GROUPS = ("weights", "adam_m", "adam_v")


@dataclass(frozen=True)
class Entry:
    """A session's last durable state: the adapter, the sequence number of the request that
    produced it (-1 for the session's creation), and that request's id and answer (None for creation)."""

    state: AdapterState
    seq: int
    request_id: str | None
    answer: bytes | None


class Journal:
    """One file per session under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _file(self, session_id: str) -> Path:
        return self.root / f"{session_id}.safetensors"

    def write(
        self, session_id: str, state: AdapterState, seq: int, request_id: str | None = None, answer: bytes | None = None
    ) -> None:
        """Replace `session_id`'s durable state with `state` (atomically)."""
        tensors = {
            f"{group}/{name}": np.ascontiguousarray(array)
            for group in _GROUPS
            for name, array in getattr(state, group).items()
        }
        spec = {**asdict(state.spec), "target_modules": list(state.spec.target_modules)}
        meta = {
            "spec": json.dumps(spec),
            "step": str(state.step),
            "seq": str(seq),
            "request_id": request_id or "",
            "answer": (answer or b"").decode(),
        }
        staging = self._file(session_id).with_suffix(".tmp")
        save_file(tensors, str(staging), metadata=meta)
        os.replace(staging, self._file(session_id))

    def read(self, session_id: str) -> Entry | None:
        """The durable state of `session_id`, None if it has none (also when the session ends
        while it is being read: the file is read whole, once)."""
        try:
            data = self._file(session_id).read_bytes()
        except FileNotFoundError:
            return None
        header_size = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + header_size])["__metadata__"]
        tensors = load(data)
        groups: dict[str, dict[str, np.ndarray]] = {group: {} for group in _GROUPS}
        for key, array in tensors.items():
            group, _, name = key.partition("/")
            groups[group][name] = array
        spec = json.loads(meta["spec"])
        state = AdapterState(
            spec=AdapterSpec(**{**spec, "target_modules": tuple(spec["target_modules"])}),
            step=int(meta["step"]),
            **groups,
        )
        return Entry(state, int(meta["seq"]), meta["request_id"] or None, meta["answer"].encode() or None)

    def delete(self, session_id: str) -> None:
        self._file(session_id).unlink(missing_ok=True)
