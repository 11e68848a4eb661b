"""LoRA cost follows the active adapters: XLA's cost analysis of the compiled training step
(forward_backward, optim_step) and of a decode step does not grow with idle slots nor with the
padding up to the model's maximum rank, and grows with the adapters a call works on."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from backends.jax import compiled, optimizer
from backends.jax.batch import CPU_ACTIVATION_BYTES, Batch, Row, kept_activations, layout
from backends.jax.sharding import make_mesh, rows_multiple
from backends.jax.slots import Active, SlotTable
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


def _table(capacity: int, ranks: tuple[int, ...], max_rank: int = SPEC.max_lora_rank) -> SlotTable:
    """A slot table of `capacity` slots up to `max_rank`, holding one adapter per rank (slots 1..)."""
    table = SlotTable(SPEC, MESH, capacity, max_rank)
    for i, rank in enumerate(ranks):
        spec = AdapterSpec(f"a{i}", MODEL, rank, 2.0 * rank, MODULES)
        table.add(spec, init_lora_weights(SPEC, MODULES, rank, i), None, 0)
    return table


def _cost(lowered) -> tuple[float, float]:
    """(flops, bytes accessed) of a lowered program, from XLA's cost analysis."""
    analysis = lowered.compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return float(analysis["flops"]), float(analysis["bytes accessed"])


def _batch(table: SlotTable, ranks: tuple[int, ...]) -> tuple[Batch, Active]:
    """4 rows of 32 tokens, shared among the table's adapters, and the slots they use."""
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
    plan = layout(rows, rows_multiple(MESH), SPEC.max_seq_len)
    return Batch.pack(rows, plan, LOSS, MESH, active.index), active


def _training_cost(
    capacity: int, ranks: tuple[int, ...], max_rank: int = SPEC.max_lora_rank
) -> dict[str, tuple[float, float]]:
    """Costs of forward_backward over 4 rows of 32 tokens (shared among the adapters) and of optim_step."""
    table = _table(capacity, ranks, max_rank)
    batch, active = _batch(table, ranks)
    slots = jnp.asarray(active.slots)
    hyper = {name: jnp.full(len(active.slots), 0.01) for name in ("learning_rate", "beta1", "beta2", "eps")}
    hyper |= {name: jnp.zeros(len(active.slots)) for name in ("weight_decay", "grad_clip_norm")}
    fb = compiled.forward_backward.lower(SPEC, BASE, table.lora, table.accumulator, slots, batch, LOSS, active.rank)
    step = compiled.adam_update.lower(table.lora, table.opt_state, table.accumulator, hyper, slots, active.rank)
    return {"forward_backward": _cost(fb), "optim_step": _cost(step)}


def _fused_cost(capacity: int, ranks: tuple[int, ...]) -> tuple[float, float]:
    """Cost of `train_update` (forward_backward and adam_update as one program) on `_batch`."""
    table = _table(capacity, ranks)
    batch, active = _batch(table, ranks)
    slots = jnp.asarray(active.slots)
    hyper = {name: jnp.full(len(active.slots), 0.01) for name in ("learning_rate", "beta1", "beta2", "eps")}
    hyper |= {name: jnp.zeros(len(active.slots)) for name in ("weight_decay", "grad_clip_norm")}
    return _cost(
        compiled.train_update.lower(
            SPEC, BASE, table.lora, table.opt_state, table.accumulator, slots, batch, hyper, LOSS, active.rank
        )
    )


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
    for program in ("forward_backward", "optim_step"):
        assert one_adapter[4][program][1] == pytest.approx(one_adapter[32][program][1], rel=0.02), program


def test_the_fused_step_costs_what_its_two_programs_cost_and_nothing_for_idle_slots(one_adapter):
    fused = {capacity: _fused_cost(capacity, (8,)) for capacity in (4, 32)}
    separate = [sum(one_adapter[4][program][m] for program in one_adapter[4]) for m in (0, 1)]
    assert fused[4][0] == pytest.approx(separate[0], rel=0.05), (fused, separate)
    assert fused[4][1] == pytest.approx(separate[1], rel=0.05), (fused, separate)
    assert fused[4][0] == pytest.approx(fused[32][0], rel=1e-3)
    assert fused[4][1] == pytest.approx(fused[32][1], rel=0.02)


def test_the_optimizer_writes_its_slots_back_in_place():
    """`write_back` updates the donated tables where they lie: no whole-table copy (which XLA's
    cost model cannot show: it charges an in-place write with the whole table it updates)."""
    table = _table(8, (8,))
    active = table.active([1])
    slots = jnp.asarray(active.slots)
    hyper = {name: jnp.full(1, 0.01) for name in ("learning_rate", "beta1", "beta2", "eps")}
    hyper |= {name: jnp.zeros(1) for name in ("weight_decay", "grad_clip_norm")}
    params, state, _ = compiled.adam_update(table.lora, table.opt_state, table.accumulator, hyper, slots, active.rank)
    program = compiled.write_back.lower(
        table.lora, table.opt_state, table.accumulator, params, state, slots, active.rank
    ).compile()
    copied = [line for line in program.as_text().splitlines() if " copy(" in line]
    assert not copied, copied[:3]


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


def _plain_cost(rank: int) -> dict[str, tuple[float, float]]:
    """Costs of the same training step written plainly for one adapter: the gradient of the loss
    with respect to its own factors ([L, 1, in, rank], ...) and an Adam step on them, no slot table."""
    table = _table(4, (rank,))
    batch, active = _batch(table, (rank,))
    lora = compiled.compact(table.lora, jnp.asarray(active.slots), active.rank)
    trainable = {k: v for k, v in lora.items() if k != "scale"}

    def gradient(params: dict, batch: Batch) -> dict:
        loss = lambda p: compiled._per_token(SPEC, BASE, {**p, "scale": lora["scale"]}, batch, LOSS, dropout=False)[0]
        return jax.grad(loss)(params)

    hyper = {name: jnp.full(1, 0.01) for name in ("learning_rate", "beta1", "beta2", "eps")}
    hyper |= {name: jnp.zeros(1) for name in ("weight_decay", "grad_clip_norm")}
    state = optimizer.init_state(trainable)
    step = jax.jit(optimizer.step).lower(trainable, state, trainable, hyper)
    return {"forward_backward": _cost(jax.jit(gradient).lower(trainable, batch)), "optim_step": _cost(step)}


def test_a_rank_16_adapter_costs_what_a_plain_lora_step_costs():
    """One rank-16 adapter open: each program costs the same with 4 slots up to rank 32 as with
    16 slots up to rank 128, and the step (forward_backward and optim_step) is within 10 % of the
    step written without slots."""
    small, large, plain = _training_cost(4, (16,)), _training_cost(16, (16,), max_rank=128), _plain_cost(16)
    for program in ("forward_backward", "optim_step"):
        for measure in (0, 1):
            assert large[program][measure] == pytest.approx(small[program][measure], rel=0.1), (program, measure)
    step = [tuple(sum(cost[program][m] for program in cost) for m in (0, 1)) for cost in (small, plain)]
    assert step[0][0] == pytest.approx(step[1][0], rel=0.1), step
    assert step[0][1] == pytest.approx(step[1][1], rel=0.1), step
    assert small["forward_backward"][0] == pytest.approx(plain["forward_backward"][0], rel=0.1)


def test_lora_cost_grows_with_the_active_adapters():
    one, two = _training_cost(4, (8,)), _training_cost(4, (8, 8))
    # the optimizer steps both adapters: about twice the work (less a per-call part)
    assert 1.7 * one["optim_step"][0] < two["optim_step"][0] <= 2.0 * one["optim_step"][0]
    # the same tokens through two adapters read both adapters' factors
    assert two["forward_backward"][1] > one["forward_backward"][1]
    decode_one, decode_two = _decode_cost(4, (8,)), _decode_cost(4, (8, 8))
    assert decode_two[0] > decode_one[0] and decode_two[1] > decode_one[1]


def test_recomputing_activations_gives_the_gradient_keeping_them_gives():
    table = _table(4, (8,))
    batch, active = _batch(table, (8,))
    slots = jnp.asarray(active.slots)
    kept, recomputed = (
        compiled.forward_backward(
            SPEC,
            BASE,
            table.lora,
            jax.tree.map(jnp.copy, table.accumulator),
            slots,
            batch,
            LOSS,
            active.rank,
            remat=remat,
        )
        for remat in (False, True)
    )
    for name in table.accumulator:
        np.testing.assert_allclose(kept[0][name], recomputed[0][name], rtol=1e-5, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(kept[1], recomputed[1], rtol=1e-6)
    assert np.abs(np.asarray(kept[0]["lora.q_proj.b"])).max() > 0  # a real gradient


def test_activations_are_kept_where_they_fit():
    # a small model's batch keeps its activations on CPU; an 8B model's 8 x 2048 tokens do not fit an 80 GB device
    assert kept_activations(SPEC, rows=8, length=256, data_parallel=1) < CPU_ACTIVATION_BYTES
    llama_8b = dataclasses.replace(SPEC, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, d_ff=14336)
    assert kept_activations(llama_8b, rows=8, length=2048, data_parallel=1) > 40e9
