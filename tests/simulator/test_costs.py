"""The simulator's cost model (emulator/simulator/costs.py) and profiles (profiles.py) against
docs/simulator.md: formulas recomputed by hand from the model's shapes, the worked example
against NVIDIA's published measurement, and the lookups' errors."""

from __future__ import annotations

import json

import pytest

from bios.catalog import Catalog
from bios.errors import InvalidRequestError
from bios.simulation import SimulationConfig
from emulator.simulator.costs import CostModel, DeviceGroup
from emulator.simulator.profiles import (
    DEFAULT_EFFICIENCY,
    HARDWARE,
    KNOWN_MODELS,
    efficiency,
    hardware,
    projection_model,
)

LLAMA_8B = KNOWN_MODELS["meta-llama/Llama-3.1-8B"]
LLAMA_70B = KNOWN_MODELS["meta-llama/Llama-3.1-70B"]
TINY = Catalog().get("bios/tiny")
SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DGXC_LORA_STEP_S = 0.92
"""NVIDIA dgxc-benchmarking ft_llama3 README_8b: Llama3 8B LoRA BF16, GBS 32 × seq 4096, 8×H100."""


def _model(name: str, devices: int, spec=LLAMA_8B, config: SimulationConfig | None = None) -> CostModel:
    hw = hardware(name)
    return CostModel(DeviceGroup(hw, devices, efficiency(config or SimulationConfig(), hw)), spec)


def _matmul_weights(spec) -> int:
    """W of docs/simulator.md, written out: the seven projections of every layer plus the unembedding."""
    d, q, kv, f = spec.d_model, spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim, spec.d_ff
    return spec.n_layers * (d * q + 2 * d * kv + q * d + 3 * d * f) + d * spec.vocab_size


def test_worked_example_matches_the_hand_formula_and_nvidias_measurement():
    spec, rank, batch, length = LLAMA_8B, 32, 32, 4096
    d, q, kv, f = spec.d_model, spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim, spec.d_ff
    w = _matmul_weights(spec)
    p = spec.n_layers * rank * ((d + q) + 2 * (d + kv) + (q + d) + 2 * (d + f) + (f + d))
    assert (w, p) == (7_504_658_432, 83_886_080)
    attention_per_token = 12 * spec.n_layers * (length / 2) * spec.n_heads * spec.head_dim
    flops = (4 * w + 6 * p + attention_per_token) * batch * length
    peak, bandwidth = 8 * 989e12, 8 * 3.35e12
    forward_backward = max(flops / (peak * 0.539), 2 * w / (bandwidth * 0.60))
    adam = 7 * 4 * p / (bandwidth * 0.80)

    step = _model("H100", 8).step_s(batch, length, rank, SEVEN)

    assert step == pytest.approx(forward_backward + adam, rel=1e-9)
    assert f"{step:.3g}" == "1.04"  # the figure printed in docs/simulator.md
    assert abs(step / DGXC_LORA_STEP_S - 1) < 0.25


def test_a_one_token_forward_is_bound_by_reading_the_weights():
    cost = _model("H100", 1)
    weight_read = _matmul_weights(LLAMA_8B) * 2 / (3.35e12 * 0.60)
    assert cost.forward_backward_s([1], 32, SEVEN, backward=False) == pytest.approx(weight_read, rel=1e-12)
    assert cost.forward_backward_s([1], 32, SEVEN, backward=True) == pytest.approx(weight_read, rel=1e-12)
    assert cost.forward_backward_s([], 32, SEVEN, backward=True) == 0.0


def test_a_long_batch_is_compute_bound():
    cost = _model("H100", 1)
    lengths = [2048] * 8
    w = _matmul_weights(LLAMA_8B)
    forward = sum(
        2 * w * t + 4 * LLAMA_8B.n_layers * t * (t / 2) * LLAMA_8B.n_heads * LLAMA_8B.head_dim for t in lengths
    )
    assert cost.forward_backward_s(lengths, 0, (), backward=False) == pytest.approx(
        forward / (989e12 * 0.539), rel=1e-12
    )
    assert cost.forward_backward_s(lengths, 0, (), backward=False) > 10 * w * 2 / (3.35e12 * 0.60)


def test_forward_only_is_about_a_third_of_forward_backward_and_unknown_modules_are_ignored():
    cost = _model("H100", 8)
    both = cost.forward_backward_s([4096] * 4, 16, SEVEN, backward=True)
    forward = cost.forward_backward_s([4096] * 4, 16, SEVEN, backward=False)
    assert 0.3 < forward / both < 0.6
    assert cost.forward_backward_s([4096] * 4, 16, SEVEN + ("bogus_proj",), backward=True) == both
    assert cost.adapter_params(16, ("bogus_proj",)) == 0


def test_decode_is_bandwidth_bound():
    cost = _model("H100", 1)
    one, two = cost.decode_step_s(1, 1024), cost.decode_step_s(2, 1024)
    assert 1.0 < two / one < 1.05


def test_sample_is_one_prefill_and_new_tokens_decode_steps_at_the_mean_context():
    spec, prompt, rows, new = LLAMA_8B, 2048, 4, 256
    w = _matmul_weights(spec)
    peak, bandwidth = 989e12, 3.35e12
    prefill_flops = 2 * w * prompt + 4 * spec.n_layers * prompt * (prompt / 2) * spec.n_heads * spec.head_dim
    prefill = max(prefill_flops / (peak * 0.50), 2 * w / (bandwidth * 0.60))
    context = prompt + new / 2
    kv_row = 2 * spec.n_layers * context * spec.n_kv_heads * spec.head_dim * 2
    step = max((2 * w + rows * kv_row) / (bandwidth * 0.60), 2 * w * rows / (peak * 0.50))
    assert _model("H100", 1).sample_s(prompt, rows, new) == pytest.approx(prefill + new * step, rel=1e-12)
    assert _model("H100", 1).sample_s(prompt, rows, new, batch_rows=64) > _model("H100", 1).sample_s(prompt, rows, new)


def test_memory_against_hand_formulas():
    cost = _model("H100", 1)
    assert cost.training_memory_bytes([4096, 1000]) == 34 * 4096 * 32 * 5096
    assert cost.sample_memory_bytes(100, 3, 50) == 2 * 32 * 8 * 128 * 2 * 150 * 3
    assert cost.weights_bytes == LLAMA_8B.n_params * 2
    assert cost.free_memory_bytes == pytest.approx(80e9 * 0.9 - LLAMA_8B.n_params * 2)
    assert cost.free_memory_bytes > 0
    assert _model("L40S", 1, LLAMA_70B).free_memory_bytes < 0


def test_optim_step_streams_seven_fp32_values_per_parameter():
    assert _model("A100", 2).optim_step_s(1_000_000) == pytest.approx(28e6 / (2 * 2.039e12 * 0.80), rel=1e-12)


def test_describe_names_the_model_hardware_and_efficiencies():
    assert _model("H100", 8).describe() == "Llama-3.1-8B on 8×H100 (train MFU 0.54, decode MBU 0.60)"


def test_projection_model_resolves_catalog_known_names_and_config_files(tmp_path):
    catalog = Catalog()
    assert projection_model(None, catalog, TINY) is TINY
    assert projection_model("bios/tiny", catalog, LLAMA_8B) is TINY
    for name in ("meta-llama/Llama-3.1-8B", "Llama-3.1-8B", "llama-3.1-8b"):
        assert projection_model(name, catalog, TINY) is LLAMA_8B
    config = {
        "model_type": "llama",
        "vocab_size": TINY.vocab_size,
        "hidden_size": TINY.d_model,
        "num_hidden_layers": TINY.n_layers,
        "num_attention_heads": TINY.n_heads,
        "num_key_value_heads": TINY.n_kv_heads,
        "intermediate_size": TINY.d_ff,
        "max_position_embeddings": 256,
    }
    directory = tmp_path / "my-model"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    for ref in (str(directory / "config.json"), str(directory)):
        spec = projection_model(ref, catalog, LLAMA_8B)
        assert spec.name == "my-model"
        assert spec.linear_shapes() == TINY.linear_shapes() and spec.n_params == TINY.n_params
    with pytest.raises(InvalidRequestError) as info:
        projection_model("no/such-model", catalog, TINY)
    assert info.value.field == "model" and "meta-llama/Llama-3.1-70B" in str(info.value)


def test_hardware_lookup_is_case_insensitive_and_names_the_choices():
    assert hardware("h100") is HARDWARE["H100"]
    assert hardware("l40s").memory_bytes.value == 48e9
    with pytest.raises(InvalidRequestError) as info:
        hardware("TPU")
    assert info.value.field == "hardware" and "H200" in str(info.value)


def test_every_figure_names_its_source():
    for hw in HARDWARE.values():
        for figure in (hw.peak_flops, hw.hbm_bytes_per_s, hw.memory_bytes, hw.link_bytes_per_s):
            assert figure.value > 0 and figure.source
    for eff in DEFAULT_EFFICIENCY.values():
        for figure in (eff.train_mfu, eff.prefill_mfu, eff.decode_mbu, eff.optimizer_mbu):
            assert 0 < figure.value <= 1 and figure.source
    assert set(DEFAULT_EFFICIENCY) == set(HARDWARE)
    assert all("cost projection" in spec.description and spec.weights_seed == 0 for spec in KNOWN_MODELS.values())


def test_simulation_profile_overrides_the_default_efficiency():
    hw = hardware("H100")
    eff = efficiency(SimulationConfig(mfu_train=0.3), hw)
    assert eff.train_mfu.value == 0.3 and eff.train_mfu.source == "set in the simulation profile"
    assert eff.decode_mbu == DEFAULT_EFFICIENCY["H100"].decode_mbu
    assert eff.prefill_mfu == DEFAULT_EFFICIENCY["H100"].prefill_mfu
    slower = _model("H100", 8, config=SimulationConfig(mfu_train=0.3)).step_s(32, 4096, 32, SEVEN)
    assert slower > _model("H100", 8).step_s(32, 4096, 32, SEVEN)
