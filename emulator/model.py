"""The decoder of docs/losses.md §Model with LoRA (M1): a forward pass that keeps its
intermediates, the token log-probabilities (L6), and the hand-written backward pass from
d loss / d logprobs to d loss / d LoRA factors.

One datum at a time, vectorised over its tokens. Weights are float64 dicts keyed by Hugging
Face names: base tensors `[out, in]` (`model.layers.0.self_attn.q_proj.weight`), LoRA factors
`A: [in, R]`, `B: [R, out]` (`model.layers.0.self_attn.q_proj.lora_A`).
Shapes: T tokens, D model width, H query heads, K kv heads, E head dim, F ffn width, V vocab, R rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from bios.catalog import ModelSpec
from bios.weights import module_path
from emulator.ops import (
    LinearCache,
    LoraFactors,
    attention,
    attention_backward,
    linear,
    linear_backward,
    log_softmax,
    rms_norm,
    rms_norm_backward,
    rope,
    rope_backward,
    rope_tables,
    silu,
    silu_backward,
)

Dropout = Callable[[str, tuple[int, ...]], np.ndarray]
"""(module path, input shape [T, in]) → the inverted-dropout multiplier of that input (M1)."""


@dataclass(frozen=True, slots=True)
class Lora:
    """An adapter as the model sees it (M1): factors by name, scale alpha/rank, optional dropout."""

    weights: dict[str, np.ndarray]
    scale: float
    dropout: Dropout | None = None

    def factors(self, path: str, input_shape: tuple[int, ...]) -> LoraFactors | None:
        """The LoRA term of module `path` for an input of `input_shape` [T, in]; None if not adapted."""
        a = self.weights.get(f"{path}.lora_A")
        if a is None:
            return None
        mask = None if self.dropout is None else self.dropout(path, input_shape)
        return LoraFactors(a, self.weights[f"{path}.lora_B"], self.scale, mask)


@dataclass(slots=True)
class ForwardCache:
    """Intermediates of one datum's forward pass, read by `backward`.

    linears: module path → (its LoRA term, its `LinearCache`); layers: per layer, the named
    activations of §Model; final_x [T, D] / final_inv_rms [T, 1]: the input of the last norm.
    """

    cos: np.ndarray
    sin: np.ndarray
    linears: dict[str, tuple[LoraFactors | None, LinearCache]] = field(default_factory=dict)
    layers: list[dict[str, np.ndarray]] = field(default_factory=list)
    final_x: np.ndarray | None = None
    final_inv_rms: np.ndarray | None = None


def _unembedding(spec: ModelSpec, base: dict[str, np.ndarray]) -> np.ndarray:
    """The lm_head weight [V, D]: `embed_tokens.weight` when embeddings are tied."""
    return base["model.embed_tokens.weight"] if spec.tie_embeddings else base["lm_head.weight"]


def weight_of(spec: ModelSpec, base: dict[str, np.ndarray], path: str) -> np.ndarray:
    """The base weight [out, in] of the linear at `path`."""
    return _unembedding(spec, base) if path == "lm_head" else base[f"{path}.weight"]


def _apply(spec: ModelSpec, base: dict, lora: Lora | None, cache: ForwardCache, path: str, x: np.ndarray) -> np.ndarray:
    """M1 on the linear at `path`: x [T, in] → y [T, out], recording what the backward needs."""
    factors = None if lora is None else lora.factors(path, x.shape)
    y, lin_cache = linear(x, weight_of(spec, base, path), base.get(f"{path}.bias"), factors)
    cache.linears[path] = (factors, lin_cache)
    return y


def _apply_backward(
    spec: ModelSpec, base: dict, cache: ForwardCache, path: str, dy: np.ndarray, grads: dict[str, np.ndarray]
) -> np.ndarray:
    """M1 backward of the linear at `path`: dy [T, out] → dx [T, in]; stores dA, dB in `grads`."""
    factors, lin_cache = cache.linears[path]
    dx, da, db = linear_backward(dy, weight_of(spec, base, path), factors, lin_cache)
    if da is not None and db is not None:
        grads[f"{path}.lora_A"] = da
        grads[f"{path}.lora_B"] = db
    return dx


def _layer(
    spec: ModelSpec, base: dict, lora: Lora | None, cache: ForwardCache, layer: int, x: np.ndarray
) -> np.ndarray:
    """§Model, one decoder layer: attention block then SwiGLU block, both residual. x: [T, D] → [T, D]."""
    t, h, kv, e, eps = x.shape[0], spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.rms_eps
    prefix = f"model.layers.{layer}"
    act: dict[str, np.ndarray] = {"x_in": x}
    h1, act["inv_rms_in"] = rms_norm(x, base[f"{prefix}.input_layernorm.weight"], eps)
    act["q"] = _apply(spec, base, lora, cache, module_path(layer, "q_proj"), h1).reshape(t, h, e)
    act["k"] = _apply(spec, base, lora, cache, module_path(layer, "k_proj"), h1).reshape(t, kv, e)
    act["v"] = _apply(spec, base, lora, cache, module_path(layer, "v_proj"), h1).reshape(t, kv, e)
    q, k = act["q"], act["k"]
    if spec.qk_norm:
        q, act["inv_rms_q"] = rms_norm(q, base[f"{prefix}.self_attn.q_norm.weight"], eps)
        k, act["inv_rms_k"] = rms_norm(k, base[f"{prefix}.self_attn.k_norm.weight"], eps)
    act["q_rope"], act["k_rope"] = rope(q, cache.cos, cache.sin), rope(k, cache.cos, cache.sin)
    attended, act["probs"] = attention(act["q_rope"], act["k_rope"], act["v"])
    x = x + _apply(spec, base, lora, cache, module_path(layer, "o_proj"), attended.reshape(t, h * e))
    act["x_mid"] = x
    h2, act["inv_rms_post"] = rms_norm(x, base[f"{prefix}.post_attention_layernorm.weight"], eps)
    act["gate"] = _apply(spec, base, lora, cache, module_path(layer, "gate_proj"), h2)
    act["up"] = _apply(spec, base, lora, cache, module_path(layer, "up_proj"), h2)
    x = x + _apply(spec, base, lora, cache, module_path(layer, "down_proj"), silu(act["gate"]) * act["up"])
    cache.layers.append(act)
    return x


def _layer_backward(
    spec: ModelSpec, base: dict, cache: ForwardCache, layer: int, dx: np.ndarray, grads: dict[str, np.ndarray]
) -> np.ndarray:
    """§Model, one decoder layer backward: d loss / d layer output [T, D] → d loss / d layer input [T, D]."""
    act, prefix = cache.layers[layer], f"model.layers.{layer}"
    t, h, kv, e = dx.shape[0], spec.n_heads, spec.n_kv_heads, spec.head_dim
    d_hidden = _apply_backward(spec, base, cache, module_path(layer, "down_proj"), dx, grads)
    d_gate = silu_backward(d_hidden * act["up"], act["gate"])
    d_up = d_hidden * silu(act["gate"])
    dh2 = _apply_backward(spec, base, cache, module_path(layer, "gate_proj"), d_gate, grads)
    dh2 = dh2 + _apply_backward(spec, base, cache, module_path(layer, "up_proj"), d_up, grads)
    post_w = base[f"{prefix}.post_attention_layernorm.weight"]
    dx = dx + rms_norm_backward(dh2, act["x_mid"], post_w, act["inv_rms_post"])
    d_attended = _apply_backward(spec, base, cache, module_path(layer, "o_proj"), dx, grads).reshape(t, h, e)
    dq, dk, dv = attention_backward(d_attended, act["q_rope"], act["k_rope"], act["v"], act["probs"])
    dq, dk = rope_backward(dq, cache.cos, cache.sin), rope_backward(dk, cache.cos, cache.sin)
    if spec.qk_norm:
        dq = rms_norm_backward(dq, act["q"], base[f"{prefix}.self_attn.q_norm.weight"], act["inv_rms_q"])
        dk = rms_norm_backward(dk, act["k"], base[f"{prefix}.self_attn.k_norm.weight"], act["inv_rms_k"])
    dh1 = _apply_backward(spec, base, cache, module_path(layer, "q_proj"), dq.reshape(t, h * e), grads)
    dh1 = dh1 + _apply_backward(spec, base, cache, module_path(layer, "k_proj"), dk.reshape(t, kv * e), grads)
    dh1 = dh1 + _apply_backward(spec, base, cache, module_path(layer, "v_proj"), dv.reshape(t, kv * e), grads)
    in_w = base[f"{prefix}.input_layernorm.weight"]
    return dx + rms_norm_backward(dh1, act["x_in"], in_w, act["inv_rms_in"])


def _trunk(spec: ModelSpec, base: dict, lora: Lora | None, tokens: np.ndarray) -> tuple[np.ndarray, ForwardCache]:
    """§Model up to the final norm: tokens [T] → normalised hidden states [T, D], and the cache."""
    cache = ForwardCache(*rope_tables(spec, len(tokens)))
    x = base["model.embed_tokens.weight"][np.asarray(tokens, dtype=np.int64)]
    for layer in range(spec.n_layers):
        x = _layer(spec, base, lora, cache, layer, x)
    cache.final_x = x
    hidden, cache.final_inv_rms = rms_norm(x, base["model.norm.weight"], spec.rms_eps)
    return hidden, cache


def forward(spec: ModelSpec, base: dict, lora: Lora | None, tokens: np.ndarray) -> tuple[np.ndarray, ForwardCache]:
    """§Model with M1: tokens [T] → logits [T, V] (position t predicts token t+1), and the cache.

    `lora` None runs the bare base model.
    """
    hidden, cache = _trunk(spec, base, lora, tokens)
    return _apply(spec, base, lora, cache, "lm_head", hidden), cache


def token_logprobs(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """L6 `lp[t] = logits[t, target[t]] - logsumexp(logits[t, :])`. logits: [T, V], targets: [T] → [T]."""
    return log_softmax(logits)[np.arange(len(targets)), targets]


def top_logprobs(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The `k` most likely tokens of each row, most likely first (ties: lower id first), and
    their logprobs. logits: [T, V] → (ids [T, k] int64, logprobs [T, k])."""
    lp = log_softmax(logits)
    ids = np.argsort(-lp, axis=-1, kind="stable")[:, :k]
    return ids.astype(np.int64), np.take_along_axis(lp, ids, axis=-1)


def token_logprobs_backward(logits: np.ndarray, targets: np.ndarray, d_lp: np.ndarray) -> np.ndarray:
    """L6, backward: `d logits[t] = d_lp[t] · (onehot(target[t]) - softmax(logits[t]))`.

    logits: [T, V], targets, d_lp: [T]. Returns d logits [T, V].
    """
    d_logits = -np.exp(log_softmax(logits)) * d_lp[:, None]
    d_logits[np.arange(len(targets)), targets] += d_lp
    return d_logits


def backward(spec: ModelSpec, base: dict, cache: ForwardCache, d_logits: np.ndarray) -> dict[str, np.ndarray]:
    """L6 through §Model and M1: d loss / d logits [T, V] → d loss / d every LoRA factor
    (`A: [in, R]`, `B: [R, out]`) of the adapter the forward ran with, by name."""
    grads: dict[str, np.ndarray] = {}
    d_hidden = _apply_backward(spec, base, cache, "lm_head", d_logits, grads)
    assert cache.final_x is not None and cache.final_inv_rms is not None, "backward of a forward that did not finish"
    dx = rms_norm_backward(d_hidden, cache.final_x, base["model.norm.weight"], cache.final_inv_rms)
    for layer in reversed(range(spec.n_layers)):
        dx = _layer_backward(spec, base, cache, layer, dx, grads)
    return grads
