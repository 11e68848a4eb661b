"""Frozen sampler adapters on the backend: created when a sampling client first needs one,
shared by every client of the same checkpoint, and freed when the last of them is released.

An RL loop that saves sampler weights every iteration therefore holds only the snapshots its
live sampling clients use, not one backend adapter per save. Used from the engine's worker
thread only (the backend is single-threaded).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace

from bios.backend import AdapterState, Backend
from bios.engine.checkpoints import CheckpointStore
from bios.types import StateResult

RECENT_EXPORTS = 2
"""Sampler saves whose exported weights stay in memory for a fast first use."""


class SnapshotPool:
    """Reference-counted snapshot adapters, keyed by checkpoint id."""

    def __init__(self, backend: Backend, store: CheckpointStore) -> None:
        self.backend = backend
        self.store = store
        self._adapters: dict[str, str] = {}  # checkpoint id -> adapter id
        self._users: dict[str, int] = {}
        self._recent: OrderedDict[str, AdapterState] = OrderedDict()

    def remember(self, record: StateResult, state: AdapterState) -> None:
        """Keep the weights just saved as `record`, so a sampling client on it starts without a disk read."""
        self._recent[record.id] = AdapterState(spec=state.spec, step=state.step, weights=state.weights)
        while len(self._recent) > RECENT_EXPORTS:
            self._recent.popitem(last=False)

    def acquire(self, record: StateResult) -> str:
        """The adapter frozen from checkpoint `record`, created if none is live; one more user."""
        if record.id not in self._adapters:
            adapter_id = f"snapshot-{record.id}"
            state = self._recent.pop(record.id, None) or self.store.load(record.path, adapter_id)
            frozen = AdapterState(
                spec=replace(state.spec, adapter_id=adapter_id), step=state.step, weights=state.weights
            )
            self.backend.create_adapter(frozen.spec, frozen)
            self._adapters[record.id] = adapter_id
        self._users[record.id] = self._users.get(record.id, 0) + 1
        return self._adapters[record.id]

    def release(self, checkpoint_id: str) -> None:
        """One user fewer; the last one frees the backend adapter (the checkpoint stays on disk)."""
        self._users[checkpoint_id] -= 1
        if self._users[checkpoint_id] == 0:
            del self._users[checkpoint_id]
            self.backend.delete_adapter(self._adapters.pop(checkpoint_id))

    def live(self) -> int:
        """How many snapshot adapters the backend holds."""
        return len(self._adapters)
