"""LoRA cost follows the active adapters: XLA's cost analysis of the compiled training step
(forward_backward, optim_step) and of a decode step does not grow with idle slots nor with the
padding up to the model's maximum rank, and grows with the adapters a call works on."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from backends.jax import compiled
from backends.jax.batch import Batch, Row
from backends.jax.sharding import make_mesh
from backends.jax.slots import SlotTable
from backends.jax.weights import load_base
from bios.backend import AdapterSpec
from bios.catalog import Catalog
from bios.weights import init_lora_weights

MODEL = "bios/tiny"
LOSS = "cross_entropy"
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
SPEC = Catalog().get(MODEL)
MESH = make_mesh(1, None)
BASE = load_base(SPEC, MESH, jnp.float32)


def _table(capacity: int, ranks: tuple[int, ...]) -> SlotTable:
    """A slot table of `capacity` slots holding one adapter per rank (slots 1..)."""
    table = SlotTable(SPEC, MESH, capacity, SPEC.max_lora_rank)
    for i, rank in enumerate(ranks):
        spec = AdapterSpec(f"a{i}", MODEL, rank, 2.0 * rank, MODULES)
        table.add(spec, init_lora_weights(SPEC, MODULES, rank, i), None, 0)
    return table


def _cost(lowered) -> tuple[float, float]:
    """(flops, bytes accessed) of a lowered program, from XLA's cost analysis."""
    analysis = lowered.compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return float(analysis["flops"]), float(analysis["bytes accessed"])


def _training_cost(capacity: int, ranks: tuple[int, ...]) -> dict[str, tuple[float, float]]:
    """Costs of forward_backward over 4 rows of 32 tokens (shared among the adapters) and of optim_step."""
    table = _table(capacity, ranks)
    rng = np.random.default_rng(0)
    rows = [
        Row(
            1 + i * len(ranks) // 4,
            0,
            i,
            rng.integers(4, 400, 32),
            {"target_tokens": rng.integers(4, 400, 32), "weights": np.ones(32)},
            {},
        )
        for i in range(4)
    ]
    active = table.active(row.slot for row in rows)
    batch = Batch.pack(rows, LOSS, MESH, SPEC.max_seq_len, active.index)
    slots = jnp.asarray(active.slots)
    hyper = {name: jnp.full(len(active.slots), 0.01) for name in ("learning_rate", "beta1", "beta2", "eps")}
    hyper |= {name: jnp.zeros(len(active.slots)) for name in ("weight_decay", "grad_clip_norm")}
    fb = compiled.forward_backward.lower(SPEC, BASE, table.lora, table.accumulator, slots, batch, LOSS, active.rank)
    step = compiled.optim_step.lower(table.lora, table.opt_state, table.accumulator, hyper, slots, active.rank)
    return {"forward_backward": _cost(fb), "optim_step": _cost(step)}


def _decode_cost(capacity: int, ranks: tuple[int, ...]) -> tuple[float, float]:
    """Cost of compacting the adapters and one decode step of 8 rows (one token each)."""
    table = _table(capacity, ranks)
    active = table.active(range(1, 1 + len(ranks)))
    slots = jnp.asarray(active.slots)
    lora = compiled.compact(table.lora, slots, active.rank)
    cache = (jnp.zeros((SPEC.n_layers, 8, 64, SPEC.n_kv_heads, SPEC.head_dim)),) * 2
    row_slot = jnp.arange(8, dtype=jnp.int32) % len(ranks)
    tokens, start = jnp.ones((8, 1), jnp.int32), jnp.full(8, 5, jnp.int32)
    flops, moved = _cost(compiled.extend.lower(SPEC, BASE, lora, tokens, start, cache, row_slot))
    gather_flops, gather_moved = _cost(compiled.compact.lower(table.lora, slots, active.rank))
    return flops + gather_flops, moved + gather_moved


@pytest.fixture(scope="module")
def one_adapter() -> dict[int, dict[str, tuple[float, float]]]:
    """Training costs of one rank-8 adapter with 4 and with 32 slots allocated."""
    return {capacity: _training_cost(capacity, (8,)) for capacity in (4, 32)}


def test_idle_slots_cost_nothing_in_training(one_adapter):
    for program in ("forward_backward", "optim_step"):
        assert one_adapter[4][program][0] == pytest.approx(one_adapter[32][program][0], rel=1e-3), program
    # XLA's cost model charges the optimizer's in-place writes (dynamic-update-slice fusions) with
    # the whole slot table they update, so bytes are compared for forward_backward only
    assert one_adapter[4]["forward_backward"][1] == pytest.approx(one_adapter[32]["forward_backward"][1], rel=0.02)


def test_idle_slots_cost_nothing_in_decoding():
    (flops4, bytes4), (flops32, bytes32) = _decode_cost(4, (8,)), _decode_cost(32, (8,))
    assert flops4 == pytest.approx(flops32, rel=1e-3)
    assert bytes4 == pytest.approx(bytes32, rel=0.02)


def test_lora_cost_follows_the_adapter_rank_not_the_padding():
    assert SPEC.max_lora_rank == 32
    costs = {rank: _training_cost(4, (rank,)) for rank in (8, 16, 32)}
    for program in ("forward_backward", "optim_step"):
        flops = {rank: cost[program][0] for rank, cost in costs.items()}
        assert flops[8] < flops[16] < flops[32], (program, flops)
        # LoRA work is linear in the rank: doubling 16 → 32 adds twice what 8 → 16 added
        assert flops[32] - flops[16] == pytest.approx(2 * (flops[16] - flops[8]), rel=0.05), (program, flops)
    moved = {rank: cost["forward_backward"][1] for rank, cost in costs.items()}
    assert moved[8] < moved[16] < moved[32], moved
    decode = {rank: _decode_cost(4, (rank,))[0] for rank in (8, 32)}
    assert decode[8] < decode[32]


def test_lora_cost_grows_with_the_active_adapters():
    one, two = _training_cost(4, (8,)), _training_cost(4, (8, 8))
    # the optimizer steps both adapters: about twice the work (less a per-call part)
    assert 1.7 * one["optim_step"][0] < two["optim_step"][0] <= 2.0 * one["optim_step"][0]
    # the same tokens through two adapters read both adapters' factors
    assert two["forward_backward"][1] > one["forward_backward"][1]
    decode_one, decode_two = _decode_cost(4, (8,)), _decode_cost(4, (8, 8))
    assert decode_two[0] > decode_one[0] and decode_two[1] > decode_one[1]
