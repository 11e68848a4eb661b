"""The emulator's decoder (docs/losses.md §Model, M1, L6): forward against a naive loop
implementation, causality, RoPE scaling, and the hand-written backward against central
finite differences for every loss and architecture."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bios.catalog import ModelSpec
from bios.weights import dropout_scale, generate_base_weights, init_lora_weights
from emulator.decode import KVCache, extend
from emulator.losses import elementwise_loss
from emulator.model import Lora, backward, forward, token_logprobs, token_logprobs_backward
from emulator.ops import rope_inv_freq

ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SCALING = (
    ("factor", 8.0),
    ("high_freq_factor", 4.0),
    ("low_freq_factor", 1.0),
    ("original_max_position_embeddings", 128.0),
)


def tiny_spec(architecture: str = "llama", **overrides: object) -> ModelSpec:
    shape = dict(vocab_size=50, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=24, weights_seed=3)
    shape.update(overrides)
    return ModelSpec(name=f"test/{architecture}", architecture=architecture, **shape)  # type: ignore[arg-type]


CONFIGS = {
    "llama": (tiny_spec("llama"), ALL_MODULES),
    "llama_tied_lm_head": (tiny_spec("llama", tie_embeddings=True), ALL_MODULES + ("lm_head",)),
    "llama_rope_scaling_lm_head": (tiny_spec("llama", rope_scaling=SCALING, rope_theta=100.0), ("q_proj", "lm_head")),
    "qwen2": (tiny_spec("qwen2"), ALL_MODULES),
    "qwen3": (tiny_spec("qwen3", n_kv_heads=1), ALL_MODULES + ("lm_head",)),
}


def base_weights(spec: ModelSpec) -> dict[str, np.ndarray]:
    return {name: value.astype(np.float64) for name, value in generate_base_weights(spec).items()}


def trained_lora(spec: ModelSpec, modules: tuple[str, ...], rank: int = 3) -> dict[str, np.ndarray]:
    """LoRA factors with B made non-zero, as after some training."""
    rng = np.random.default_rng(7)
    weights = {name: value.astype(np.float64) for name, value in init_lora_weights(spec, modules, rank, 5).items()}
    return {name: (0.3 * rng.standard_normal(w.shape) if name.endswith("lora_B") else w) for name, w in weights.items()}


# --- a naive, loop-by-loop reading of §Model --------------------------------------------


def naive_inv_freq(spec: ModelSpec) -> list[float]:
    """transformers' llama3 rope scaling written per frequency, as in its first release."""
    freqs = [1.0 / spec.rope_theta ** (2 * i / spec.head_dim) for i in range(spec.head_dim // 2)]
    if spec.rope_scaling is None:
        return freqs
    cfg = dict(spec.rope_scaling)
    old, factor = cfg["original_max_position_embeddings"], cfg["factor"]
    low, high = cfg["low_freq_factor"], cfg["high_freq_factor"]
    scaled = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            scaled.append(f)
        elif wavelen > old / low:
            scaled.append(f / factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            scaled.append((1 - smooth) * f / factor + smooth * f)
    return scaled


def naive_logits(spec: ModelSpec, base: dict, lora: dict, scale: float, tokens: list[int]) -> np.ndarray:
    h_heads, k_heads, e, eps = spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.rms_eps

    def norm(x, w):
        return x / math.sqrt(sum(v * v for v in x) / len(x) + eps) * w

    def lin(path, x):
        w = base["model.embed_tokens.weight"] if path == "lm_head" and spec.tie_embeddings else base[f"{path}.weight"]
        y = w @ x + base.get(f"{path}.bias", 0.0)
        if f"{path}.lora_A" in lora:
            y = y + scale * ((x @ lora[f"{path}.lora_A"]) @ lora[f"{path}.lora_B"])
        return y

    freqs = naive_inv_freq(spec)

    def rotate(vec, pos):
        out = np.empty(e)
        for i in range(e // 2):
            c, s = math.cos(pos * freqs[i]), math.sin(pos * freqs[i])
            out[i] = vec[i] * c - vec[i + e // 2] * s
            out[i + e // 2] = vec[i + e // 2] * c + vec[i] * s
        return out

    xs = [base["model.embed_tokens.weight"][t].copy() for t in tokens]
    for layer in range(spec.n_layers):
        p = f"model.layers.{layer}"
        qs, ks, vs = [], [], []
        for pos, x in enumerate(xs):
            h = norm(x, base[f"{p}.input_layernorm.weight"])
            q = lin(f"{p}.self_attn.q_proj", h).reshape(h_heads, e)
            k = lin(f"{p}.self_attn.k_proj", h).reshape(k_heads, e)
            if spec.qk_norm:
                q = np.stack([norm(qh, base[f"{p}.self_attn.q_norm.weight"]) for qh in q])
                k = np.stack([norm(kh, base[f"{p}.self_attn.k_norm.weight"]) for kh in k])
            qs.append([rotate(qh, pos) for qh in q])
            ks.append([rotate(kh, pos) for kh in k])
            vs.append(lin(f"{p}.self_attn.v_proj", h).reshape(k_heads, e))
        new_xs = []
        for t, x in enumerate(xs):
            heads = []
            for head in range(h_heads):
                kv = head // (h_heads // k_heads)
                scores = [float(qs[t][head] @ ks[s][kv]) / math.sqrt(e) for s in range(t + 1)]
                top = max(scores)
                weights = [math.exp(sc - top) for sc in scores]
                heads.append(sum(w * vs[s][kv] for s, w in enumerate(weights)) / sum(weights))
            x = x + lin(f"{p}.self_attn.o_proj", np.concatenate(heads))
            h2 = norm(x, base[f"{p}.post_attention_layernorm.weight"])
            gate = lin(f"{p}.mlp.gate_proj", h2)
            act = gate / (1 + np.exp(-gate)) * lin(f"{p}.mlp.up_proj", h2)
            new_xs.append(x + lin(f"{p}.mlp.down_proj", act))
        xs = new_xs
    return np.stack([lin("lm_head", norm(x, base["model.norm.weight"])) for x in xs])


@pytest.mark.parametrize("config", list(CONFIGS))
def test_forward_matches_naive_loops(config):
    spec, modules = CONFIGS[config]
    base, lora = base_weights(spec), trained_lora(spec, modules)
    tokens = [3, 17, 42, 0, 9, 9, 31]
    logits, _ = forward(spec, base, Lora(lora, 2.0), np.array(tokens))
    np.testing.assert_allclose(logits, naive_logits(spec, base, lora, 2.0, tokens), rtol=1e-10, atol=1e-10)
    prefill, cache = extend(spec, base, Lora(lora, 2.0), np.array(tokens[:4]), KVCache.empty(spec))
    steps = [prefill]
    for token in tokens[4:]:
        step, cache = extend(spec, base, Lora(lora, 2.0), np.array([token]), cache)
        steps.append(step)
    np.testing.assert_allclose(np.concatenate(steps), logits, rtol=1e-12, atol=1e-12)
    assert cache.length == len(tokens)


def test_zero_b_adapter_equals_base_model():
    spec, modules = CONFIGS["qwen3"]
    base = base_weights(spec)
    fresh = {k: v.astype(np.float64) for k, v in init_lora_weights(spec, modules, 4, 0).items()}
    tokens = np.array([1, 2, 3, 4, 5])
    adapted, _ = forward(spec, base, Lora(fresh, 4.0), tokens)
    np.testing.assert_array_equal(adapted, forward(spec, base, None, tokens)[0])


def test_llama3_rope_scaling_hits_all_three_bands():
    spec = CONFIGS["llama_rope_scaling_lm_head"][0]
    plain = 1.0 / spec.rope_theta ** (np.arange(0, spec.head_dim, 2) / spec.head_dim)
    scaled = rope_inv_freq(spec)
    np.testing.assert_allclose(scaled, naive_inv_freq(spec), rtol=1e-15)
    wavelengths = 2 * np.pi / plain  # ≈ 6.3, 19.9, 62.8, 198.7 against the bands 128/4 = 32 and 128/1 = 128
    assert wavelengths[1] < 32 < wavelengths[2] < 128 < wavelengths[3]
    np.testing.assert_array_equal(scaled[:2], plain[:2])  # high frequency: kept
    assert plain[2] / 8 < scaled[2] < plain[2]  # medium: interpolated
    np.testing.assert_allclose(scaled[3], plain[3] / 8)  # low frequency: divided by factor


@pytest.mark.parametrize("config", ["llama", "qwen2", "qwen3"])
def test_causality(config):
    spec, modules = CONFIGS[config]
    base, lora = base_weights(spec), Lora(trained_lora(spec, modules), 2.0)
    tokens = np.array([5, 6, 7, 8, 9, 10, 11, 12])
    changed = tokens.copy()
    changed[5] = 44
    a, _ = forward(spec, base, lora, tokens)
    b, _ = forward(spec, base, lora, changed)
    np.testing.assert_allclose(a[:5], b[:5], rtol=0, atol=1e-12)
    assert np.abs(a[5:] - b[5:]).max() > 1e-3


# --- backward against central finite differences ----------------------------------------

LOSS_CONFIGS = {
    "cross_entropy": {},
    "importance_sampling": {},
    "ppo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    "cispo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    "dro": {"beta": 0.05},
}


def datum_inputs(spec: ModelSpec, base: dict, lora: Lora, tokens: np.ndarray, targets: np.ndarray) -> dict:
    """Loss inputs whose sampler logprobs sit around the current ones, so PPO sees both branches."""
    rng = np.random.default_rng(11)
    logits, _ = forward(spec, base, lora, tokens)
    lp = token_logprobs(logits, targets)
    return {
        "target_tokens": targets,
        "weights": rng.uniform(-1.0, 2.0, len(tokens)),
        "logprobs": lp + rng.normal(0.0, 0.4, len(tokens)),
        "advantages": rng.normal(0.0, 1.0, len(tokens)),
    }


def total_loss(spec, base, lora: Lora, tokens, inputs, loss_fn, frozen_clip=None) -> float:
    """L0 for one datum; for CISPO (L4) `frozen_clip` holds sg(clip(r)) from the unperturbed weights."""
    logits, _ = forward(spec, base, lora, tokens)
    lp = token_logprobs(logits, inputs["target_tokens"])
    if loss_fn == "cispo":
        return float(np.sum(-frozen_clip * lp * inputs["advantages"]))
    return float(np.sum(elementwise_loss(loss_fn, lp, inputs, LOSS_CONFIGS[loss_fn])[0]))


def cispo_clip(spec, base, lora: Lora, tokens, inputs) -> np.ndarray:
    logits, _ = forward(spec, base, lora, tokens)
    ratio = np.exp(token_logprobs(logits, inputs["target_tokens"]) - inputs["logprobs"])
    return np.clip(ratio, LOSS_CONFIGS["cispo"]["clip_low_threshold"], LOSS_CONFIGS["cispo"]["clip_high_threshold"])


def analytic_grads(spec, base, lora: Lora, tokens, inputs, loss_fn) -> dict[str, np.ndarray]:
    logits, cache = forward(spec, base, lora, tokens)
    lp = token_logprobs(logits, inputs["target_tokens"])
    _, d_lp = elementwise_loss(loss_fn, lp, inputs, LOSS_CONFIGS[loss_fn])
    return backward(spec, base, cache, token_logprobs_backward(logits, inputs["target_tokens"], d_lp))


def check_against_finite_differences(spec, base, weights, scale, tokens, inputs, loss_fn, dropout=None):
    grads = analytic_grads(spec, base, Lora(weights, scale, dropout), tokens, inputs, loss_fn)
    frozen = cispo_clip(spec, base, Lora(weights, scale, dropout), tokens, inputs)
    assert set(grads) == set(weights)
    rng = np.random.default_rng(0)
    step = 1e-5
    for name, value in weights.items():
        picks = [tuple(rng.integers(0, n) for n in value.shape) for _ in range(3)]
        numeric, exact = [], []
        for index in picks:
            shifted = {}
            for sign in (1.0, -1.0):
                perturbed = dict(weights)
                perturbed[name] = value.copy()
                perturbed[name][index] += sign * step
                shifted[sign] = total_loss(spec, base, Lora(perturbed, scale, dropout), tokens, inputs, loss_fn, frozen)
            numeric.append((shifted[1.0] - shifted[-1.0]) / (2 * step))
            exact.append(grads[name][index])
        numeric, exact = np.array(numeric), np.array(exact)
        assert np.linalg.norm(exact) > 1e-8, name
        rel = np.linalg.norm(numeric - exact) / np.linalg.norm(exact)
        assert rel < 1e-6, (name, rel, numeric, exact)


@pytest.mark.parametrize("loss_fn", list(LOSS_CONFIGS))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_backward_matches_finite_differences(config, loss_fn):
    spec, modules = CONFIGS[config]
    base, weights = base_weights(spec), trained_lora(spec, modules)
    tokens, targets = np.array([3, 17, 42, 0, 9, 31, 25]), np.array([17, 42, 0, 9, 31, 25, 8])
    inputs = datum_inputs(spec, base, Lora(weights, 2.0), tokens, targets)
    check_against_finite_differences(spec, base, weights, 2.0, tokens, inputs, loss_fn)


def test_backward_with_dropout_matches_finite_differences():
    spec, modules = CONFIGS["llama_tied_lm_head"]
    base, weights = base_weights(spec), trained_lora(spec, modules)

    def dropout(path, shape):
        return dropout_scale(1, 0, 0, path, shape, 0.3).astype(np.float64)

    tokens, targets = np.array([3, 17, 42, 0, 9]), np.array([17, 42, 0, 9, 31])
    inputs = datum_inputs(spec, base, Lora(weights, 2.0), tokens, targets)
    dropped, _ = forward(spec, base, Lora(weights, 2.0, dropout), tokens)
    assert not np.allclose(dropped, forward(spec, base, Lora(weights, 2.0), tokens)[0])
    check_against_finite_differences(spec, base, weights, 2.0, tokens, inputs, "cross_entropy", dropout)


def test_logprob_backward_is_onehot_minus_softmax():
    logits = np.array([[1.0, 2.0, 0.5], [0.0, 0.0, 0.0]])
    targets = np.array([1, 2])
    d = token_logprobs_backward(logits, targets, np.array([2.0, -1.0]))
    p = np.exp(logits[0]) / np.exp(logits[0]).sum()
    np.testing.assert_allclose(d[0], 2.0 * (np.array([0.0, 1.0, 0.0]) - p))
    np.testing.assert_allclose(d[1], -1.0 * (np.array([0.0, 0.0, 1.0]) - 1 / 3))
    np.testing.assert_allclose(token_logprobs(logits, targets), [np.log(p[1]), np.log(1 / 3)])
