"""The adapter slots of one served base model: device arrays for every session's LoRA,
gradient accumulator and optimizer state, and which adapter lives in which slot.

Slot 0 is reserved for the bare base model (its factors and scale are zero); sessions take
slots 1.. and the capacity doubles when full (a new capacity is a new shape, so it compiles
new programs — it happens once per doubling).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from backends.jax import compiled, optimizer
from backends.jax.batch import bucket
from backends.jax.compiled import host
from backends.jax.params import adapter_weights, lora_shapes, slot_arrays, slot_axis, slot_index
from backends.jax.sharding import replicated
from bios.backend import AdapterSpec, AdapterState
from bios.catalog import ModelSpec
from bios.errors import ConflictError, NotFoundError


@dataclass(frozen=True)
class Active:
    """The slots one compiled call works on: `slots` [A] int32 (A bucketed to a power of two,
    filled by repeating the last slot), and `rank`, the largest of their adapters' ranks
    bucketed (at most the table's). Programs read and write only these slots, these columns."""

    slots: np.ndarray
    rank: int
    index: dict[int, int]
    """Each slot's position in `slots`."""


@dataclass
class SlotTable:
    """LoRA state [.., S, ..] (params.py), accumulator (same shapes), slot-major optimizer state."""

    spec: ModelSpec
    mesh: Mesh
    capacity: int
    rank: int
    lora: dict[str, jax.Array] = field(init=False)
    accumulator: dict[str, jax.Array] = field(init=False)
    opt_state: optimizer.State = field(init=False)
    adapters: dict[str, tuple[int, AdapterSpec]] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)
    """Optimizer steps taken by each adapter, on the host (seeds its dropout masks)."""

    def __post_init__(self) -> None:
        shapes = lora_shapes(self.spec, self.capacity, self.rank)
        put = lambda shape: jax.device_put(jnp.zeros(shape, jnp.float32), replicated(self.mesh))
        self.lora = {name: put(shape) for name, shape in shapes.items()}
        self.accumulator = {name: put(shape) for name, shape in shapes.items() if name != "scale"}
        self.opt_state = optimizer.init_state(self.accumulator)
        self._place()

    def _place(self) -> None:
        """Commit every array to the mesh (replicated), as the compiled programs return them,
        so eager edits never change an argument's sharding and force a recompilation."""
        self.lora, self.accumulator, self.opt_state = jax.device_put(
            (self.lora, self.accumulator, self.opt_state), replicated(self.mesh)
        )

    def slot(self, adapter_id: str) -> int:
        try:
            return self.adapters[adapter_id][0]
        except KeyError:
            raise NotFoundError(f"adapter {adapter_id!r} does not exist", field="adapter_id") from None

    def active(self, slots: Iterable[int]) -> Active:
        """The `Active` set of the distinct `slots` (slot 0, the bare model, counts as rank 1)."""
        distinct = sorted(set(slots))
        ranks = {slot: spec.rank for slot, spec in self.adapters.values()}
        rank = bucket(max(ranks.get(slot, 1) for slot in distinct), cap=self.rank)
        padded = distinct + distinct[-1:] * (bucket(len(distinct)) - len(distinct))
        return Active(np.array(padded, np.int32), rank, {slot: i for i, slot in enumerate(distinct)})

    def add(
        self, spec: AdapterSpec, weights: dict[str, np.ndarray], moments: tuple[dict, dict] | None, step: int
    ) -> int:
        """Place an adapter (bios.weights names) in a free slot, growing the table if needed."""
        if spec.adapter_id in self.adapters:
            raise ConflictError(f"adapter {spec.adapter_id!r} already exists", field="adapter_id")
        used = {slot for slot, _ in self.adapters.values()}
        free = next((s for s in range(1, self.capacity) if s not in used), None)
        if free is None:
            self._grow()
            free = self.capacity // 2
        self._write(free, weights, moments, step, spec.alpha / spec.rank)
        self.adapters[spec.adapter_id] = (free, spec)
        self.steps[spec.adapter_id] = step
        return free

    def remove(self, adapter_id: str) -> None:
        """Free the adapter's slot (zeroing it, so nothing of it can leak into a later tenant)."""
        if adapter_id in self.adapters:
            slot, _ = self.adapters.pop(adapter_id)
            self.steps.pop(adapter_id, None)
            self._write(slot, {}, None, 0, 0.0)

    def arrays(self, adapter_id: str) -> dict[str, np.ndarray]:
        """Host copies of the adapter's slot of every LoRA factor, padded to the table's rank:
        `lora.<module>.a` [L, in, R], `lora.lm_head.a` [D, R], ... (params.py, slot axis removed)."""
        slot = self.slot(adapter_id)
        return {k: host(v[slot_index(k, slot)]) for k, v in self.lora.items() if k != "scale"}

    def export(self, adapter_id: str) -> AdapterState:
        """The adapter's weights and Adam moments (bios.weights names, at its own rank) and step,
        gathered by one program and fetched in one transfer."""
        slot, spec = self.adapters[adapter_id]
        leaves, tree = jax.tree.flatten(compiled.slot_state(self.lora, self.opt_state, jnp.int32(slot)))
        weights, first, second, step = jax.tree.unflatten(tree, compiled.host_all(*leaves))

        def named(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return adapter_weights(self.spec, arrays, spec.target_modules, spec.rank)

        return AdapterState(
            spec=spec, step=int(step), weights=named(weights), adam_m=named(first), adam_v=named(second)
        )

    def _write(self, slot: int, weights: dict, moments: tuple[dict, dict] | None, step: int, scale: float) -> None:
        values = slot_arrays(self.spec, weights, self.rank)

        def put(tree: dict, arrays: dict, slot_major: bool) -> dict:
            out = dict(tree)
            for k, v in arrays.items():
                index = (slot,) if slot_major else slot_index(k, slot)
                out[k] = tree[k].at[index].set(jnp.asarray(v, tree[k].dtype))
            return out

        self.lora = put(self.lora, values, False)
        self.lora["scale"] = self.lora["scale"].at[slot].set(scale)
        self.accumulator = put(self.accumulator, {k: np.zeros_like(v) for k, v in values.items()}, False)
        mu, nu = (
            (slot_arrays(self.spec, m, self.rank) for m in moments) if moments else (dict.fromkeys(values, 0.0),) * 2
        )
        old_mu, old_nu = optimizer.adam_moments(self.opt_state)
        count = optimizer.step_count(self.opt_state).at[slot].set(step)
        self.opt_state = optimizer.with_moments(self.opt_state, count, put(old_mu, mu, True), put(old_nu, nu, True))
        self._place()

    def _grow(self) -> None:
        """Double the capacity, keeping every slot's contents."""
        old = (self.lora, self.accumulator, self.opt_state, self.capacity)
        self.capacity *= 2
        self.__post_init__()
        lora, accumulator, opt_state, capacity = old

        def copy(new: jax.Array, old: jax.Array, axis: int) -> jax.Array:
            index = (slice(None),) * axis + (slice(0, capacity),)
            return new.at[index].set(old)

        self.lora = {k: copy(self.lora[k], v, slot_axis(k)) for k, v in lora.items()}
        self.accumulator = {k: copy(self.accumulator[k], v, slot_axis(k)) for k, v in accumulator.items()}
        self.opt_state = jax.tree.map(
            lambda new, old: copy(new, old, 0) if new.ndim else new, self.opt_state, opt_state
        )
        self._place()
