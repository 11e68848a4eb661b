"""Bios's decoders equal Hugging Face `transformers` on random Llama / Qwen2 / Qwen3 models.

Each reference model (tests/reference_models.py) is written as a HF model directory, read back
the way a user's model is (`spec_from_hf_directory` + `load_base_weights`), and every
implementation in `IMPLEMENTATIONS` must reproduce the HF model's float32 logits. A backend
joins the check with one line: `IMPLEMENTATIONS["jax"] = jax_logits`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from reference_models import (
    LLAMA3_ROPE_SCALING,
    REFERENCE_CONFIGS,
    build_reference_model,
    random_tokens,
    reference_logits,
)
from transformers import AutoModelForCausalLM

from backends.jax import compiled
from backends.jax import params as jax_params
from backends.jax.params import base_from_hf
from bios.catalog import ModelSpec, spec_from_hf_directory
from bios.weights import load_base_weights
from emulator.model import forward

N_SEQUENCES, LENGTH = 3, 20


def emulator_logits(spec: ModelSpec, tokens: np.ndarray) -> np.ndarray:
    """The float64 reference model's logits, bare base model: tokens [T] → [T, V]."""
    base = {name: array.astype(np.float64) for name, array in load_base_weights(spec).items()}
    logits, _ = forward(spec, base, None, np.asarray(tokens))
    return logits


def jax_logits(spec: ModelSpec, tokens: np.ndarray) -> np.ndarray:
    """The JAX decoder's float32 logits, bare base model (slot 0): tokens [T] → [T, V]."""
    base = {k: jnp.asarray(v) for k, v in base_from_hf(spec, load_base_weights(spec)).items()}
    lora = {k: jnp.zeros(s, jnp.float32) for k, s in jax_params.lora_shapes(spec, slots=1, rank=1).items()}
    cache = tuple(jnp.zeros((spec.n_layers, 1, len(tokens), spec.n_kv_heads, spec.head_dim)) for _ in range(2))
    n = len(tokens)
    logits, _ = compiled.extend(
        spec, base, lora, jnp.asarray(tokens, jnp.int32)[None], jnp.zeros(1, jnp.int32), cache, jnp.zeros(n, jnp.int32)
    )
    return np.asarray(logits[0], dtype=np.float64)


IMPLEMENTATIONS: dict[str, Callable[[ModelSpec, np.ndarray], np.ndarray]] = {
    "emulator": emulator_logits,
    "jax": jax_logits,
}
"""Name → (spec, tokens [T]) → logits [T, V] of the base model at `spec.hf_path`."""


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory):
    """name → (directory, HF model), each built once per module."""
    root = tmp_path_factory.mktemp("hf-reference")
    built: dict[str, tuple[Path, torch.nn.Module]] = {}

    def get(name: str):
        if name not in built:
            built[name] = build_reference_model(name, root / name)
        return built[name]

    return get


@pytest.mark.parametrize("config", list(REFERENCE_CONFIGS))
@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_logits_match_transformers(implementation: str, config: str, reference) -> None:
    directory, model = reference(config)
    spec = spec_from_hf_directory(f"hf/{config}", directory)
    tokens = random_tokens(spec.vocab_size, N_SEQUENCES, LENGTH, seed=7)
    theirs = reference_logits(model, tokens)
    assert theirs.shape == (N_SEQUENCES, LENGTH, spec.vocab_size)
    assert theirs.std() > 0.5, "logits near-uniform: the comparison would prove little"
    ours = np.stack([np.asarray(IMPLEMENTATIONS[implementation](spec, row), dtype=np.float64) for row in tokens])
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("config", list(REFERENCE_CONFIGS))
def test_spec_reads_the_hf_config(config: str, reference) -> None:
    directory, model = reference(config)
    spec = spec_from_hf_directory(f"hf/{config}", directory)
    hf, wanted = model.config, REFERENCE_CONFIGS[config]
    assert spec.architecture == wanted["model_type"]
    assert spec.hf_path == str(directory) and spec.weights_seed is None
    assert (spec.vocab_size, spec.d_model, spec.n_layers, spec.d_ff) == (
        hf.vocab_size,
        hf.hidden_size,
        hf.num_hidden_layers,
        hf.intermediate_size,
    )
    assert (spec.n_heads, spec.n_kv_heads) == (hf.num_attention_heads, hf.num_key_value_heads)
    assert spec.head_dim == wanted.get("head_dim", hf.hidden_size // hf.num_attention_heads)
    assert spec.max_seq_len == hf.max_position_embeddings
    assert spec.rope_theta == wanted["rope_theta"]
    assert spec.rms_eps == wanted["rms_norm_eps"]
    assert spec.tie_embeddings == wanted["tie_word_embeddings"]
    if "rope_scaling" in wanted:
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        expected = {k: float(LLAMA3_ROPE_SCALING[k]) for k in keys}
        assert dict(spec.rope_scaling or ()) == expected
    else:
        assert spec.rope_scaling is None
    names = set(load_base_weights(spec))
    assert ("lm_head.weight" in names) != spec.tie_embeddings


def _other_rope_form(config: dict) -> tuple[dict, str]:
    """The same config.json in the other RoPE layout, and which key the original used:
    `rope_parameters` (transformers >= 5) ↔ `rope_theta` + `rope_scaling` (< 5)."""
    config = dict(config)
    if "rope_parameters" in config:
        params = dict(config.pop("rope_parameters"))
        config["rope_theta"] = params.pop("rope_theta")
        config["rope_scaling"] = params if params.get("rope_type", "default") != "default" else None
        return config, "rope_parameters"
    scaling = config.pop("rope_scaling", None) or {"rope_type": "default"}
    config["rope_parameters"] = {"rope_theta": config.pop("rope_theta", 10000.0), **scaling}
    return config, "rope_scaling"


@pytest.mark.parametrize("config", list(REFERENCE_CONFIGS))
def test_old_and_new_rope_config_forms_read_identically(config: str, reference, tmp_path: Path) -> None:
    directory, model = reference(config)
    original = json.loads((directory / "config.json").read_text())
    rewritten, form = _other_rope_form(original)
    assert form in original and form not in rewritten
    other = tmp_path / "other-form"
    shutil.copytree(directory, other)
    (other / "config.json").write_text(json.dumps(rewritten, indent=2))

    ours = spec_from_hf_directory(f"hf/{config}", directory)
    theirs = spec_from_hf_directory(f"hf/{config}", other)
    assert dataclasses.replace(theirs, hf_path=ours.hf_path, description=ours.description) == ours

    # transformers itself reads the rewritten file as the same model: the rewrite is faithful.
    reloaded = AutoModelForCausalLM.from_pretrained(other, dtype=torch.float32, attn_implementation="eager").eval()
    tokens = random_tokens(ours.vocab_size, 1, LENGTH, seed=3)[0]
    np.testing.assert_array_equal(reference_logits(reloaded, tokens), reference_logits(model, tokens))
