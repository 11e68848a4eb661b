"""A training call packs its data into few padded tokens, and packed data train exactly as alone."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import make_datum

import bios
from backends.jax.batch import PACK_TOKENS, Row, layout, micro_batches, token_bucket
from bios import types


def _rows(lengths: list[int], slot: int = 1, dropout: float = 0.0) -> list[Row]:
    return [Row(slot, 0, i, np.zeros(n, np.int32), {}, {}, dropout) for i, n in enumerate(lengths)]


def test_tokens_bucket_by_powers_of_two_then_quarter_octaves():
    assert [token_bucket(n) for n in (1, 16, 17, 57, 65, 128)] == [16, 16, 32, 64, 128, 128]
    assert [token_bucket(n) for n in (129, 161, 213, 256, 257, 500)] == [160, 192, 224, 256, 320, 512]
    assert token_bucket(300, cap=256) == 300  # a row longer than the cap is never cut


def test_short_data_share_one_row_as_long_as_their_total():
    plan = layout(_rows([57, 55, 52, 49]), multiple=1, max_tokens=2048)
    assert plan.shape == (1, 224) and plan.lanes == ((0, 1, 2, 3),) and plan.packed
    assert plan.places(_rows([57, 55, 52, 49])) == [(0, 0), (0, 57), (0, 112), (0, 164)]


def test_data_longer_than_the_pack_limit_fill_rows_of_the_longest():
    rows = _rows([300, 100, 90, 250])
    plan = layout(rows, multiple=1, max_tokens=2048)
    # first fit by decreasing length into rows of 320: [300], [250], [100, 90]; 3 rows bucket to 4
    assert plan.shape == (4, 320) and plan.lanes == ((0,), (3,), (1, 2))
    for lane in plan.lanes:
        assert sum(rows[i].length for i in lane) <= 320
    assert sum(r.length for r in rows) > PACK_TOKENS


def test_adapters_and_dropout_rows_never_share_a_row():
    rows = _rows([10, 10], slot=1) + _rows([10, 10], slot=2) + _rows([10], slot=2, dropout=0.5)
    plan = layout(rows, multiple=1, max_tokens=256)
    assert plan.shape == (8, 16)  # 16 tokens hold one datum of 10: 5 rows, fewer padded tokens than 3 x 64
    for lane in plan.lanes:
        assert len({rows[i].slot for i in lane}) == 1
        assert len(lane) == 1 or all(rows[i].dropout_rate == 0 for i in lane)
    assert (4,) in plan.lanes


def test_rows_split_evenly_over_the_data_devices():
    assert layout(_rows([20, 20, 20]), multiple=4, max_tokens=256).shape == (4, 32)
    assert layout(_rows([20, 20, 20]), multiple=1, max_tokens=256).shape == (1, 64)


def test_micro_batches_stay_within_the_budget_in_order():
    rows = _rows([30] * 10)
    runs = micro_batches(rows, budget=128, multiple=1, max_tokens=256)
    assert [row.datum for run, _ in runs for row in run] == list(range(10))
    assert all(plan.padded_tokens <= 128 for _, plan in runs)


@pytest.mark.parametrize("loss_fn", ["cross_entropy", "ppo", "gspo"])
def test_packed_data_get_the_results_they_get_alone(loss_fn):
    """Data packed into one row (two sessions, so two adapters in one call) give each datum the
    logprobs, loss and gradient it gets in a call of its own (GSPO's sequence ratio too)."""
    service = bios.ServiceClient(backend="jax")
    rng = np.random.default_rng(3)
    lengths = ([9, 23, 14], [31, 6])
    batches = []
    for seed, sizes in enumerate(lengths):
        batch = []
        for n in sizes:
            datum = make_datum(rng.integers(4, 4096, n + 1).tolist())
            if loss_fn != "cross_entropy":
                inputs = {
                    "target_tokens": datum.loss_fn_inputs["target_tokens"],
                    "logprobs": rng.normal(-8, 1, n).tolist(),
                    "advantages": rng.normal(0, 1, n).tolist(),
                }
                if loss_fn == "gspo":
                    inputs["sequence_ratio_mask"] = (rng.random(n) < 0.6).tolist()
                datum = types.Datum(model_input=datum.model_input, loss_fn_inputs=inputs)
            batch.append(datum)
        batches.append((seed, batch))
    together = [service.create_lora_training_client("bios/tiny", rank=4, seed=seed) for seed, _ in batches]
    alone = [service.create_lora_training_client("bios/tiny", rank=4, seed=seed) for seed, _ in batches]
    futures = [client.forward_backward(batch, loss_fn) for client, (_, batch) in zip(together, batches, strict=True)]
    packed = [future.result() for future in futures]
    for client, (_, batch), result in zip(alone, batches, packed, strict=True):
        singles = [client.forward_backward([datum], loss_fn).result() for datum in batch]
        for output, single in zip(result.loss_fn_outputs, singles, strict=True):
            np.testing.assert_allclose(
                output["logprobs"].to_numpy(), single.loss_fn_outputs[0]["logprobs"].to_numpy(), rtol=1e-5, atol=1e-5
            )
        assert result.loss == pytest.approx(sum(single.loss for single in singles), rel=1e-5)
    for packed_client, alone_client in zip(together, alone, strict=True):
        steps = [c.optim_step(types.AdamParams(learning_rate=1e-2)).result() for c in (packed_client, alone_client)]
        assert steps[0].metrics["grad_norm"] == pytest.approx(steps[1].metrics["grad_norm"], rel=1e-4)
