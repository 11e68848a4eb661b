"""Incremental decoding with a KV cache (§Model, M1 without dropout).

The same arithmetic as `emulator.model.forward`, run position by position: a prefill over the
prompt, then one token per step, each attending to the cached keys and values of all earlier
positions. Caches are tuples of arrays that are never modified in place, so the samples of
one prompt share its prefill.
Shapes: n new tokens, t cached + new tokens, D, H, K, E, F, V as in docs/shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bios.catalog import ModelSpec
from bios.weights import module_path
from emulator.model import Lora, weight_of
from emulator.ops import cached_attention, linear, rms_norm, rope, rope_tables, silu


@dataclass(frozen=True, slots=True)
class KVCache:
    """Per layer, the rotated keys [t, K, E] and values [t, K, E] of positions 0..t-1."""

    keys: tuple[np.ndarray, ...]
    values: tuple[np.ndarray, ...]

    @property
    def length(self) -> int:
        return 0 if not self.keys else self.keys[0].shape[0]

    @classmethod
    def empty(cls, spec: ModelSpec) -> KVCache:
        blank = np.zeros((0, spec.n_kv_heads, spec.head_dim))
        return cls((blank,) * spec.n_layers, (blank,) * spec.n_layers)


def _linear(spec: ModelSpec, base: dict, lora: Lora | None, path: str, x: np.ndarray) -> np.ndarray:
    factors = None if lora is None else lora.factors(path, x.shape)
    return linear(x, weight_of(spec, base, path), base.get(f"{path}.bias"), factors)[0]


def extend(
    spec: ModelSpec, base: dict, lora: Lora | None, tokens: np.ndarray, past: KVCache
) -> tuple[np.ndarray, KVCache]:
    """Feed `tokens` [n] at positions past.length.. onward: (logits [n, V], the longer cache)."""
    start, n, eps = past.length, len(tokens), spec.rms_eps
    cos, sin = (table[start:] for table in rope_tables(spec, start + n))
    x = base["model.embed_tokens.weight"][np.asarray(tokens, dtype=np.int64)]
    keys, values = [], []
    for layer in range(spec.n_layers):
        prefix = f"model.layers.{layer}"
        h1, _ = rms_norm(x, base[f"{prefix}.input_layernorm.weight"], eps)
        q = _linear(spec, base, lora, module_path(layer, "q_proj"), h1).reshape(n, spec.n_heads, spec.head_dim)
        k = _linear(spec, base, lora, module_path(layer, "k_proj"), h1).reshape(n, spec.n_kv_heads, spec.head_dim)
        v = _linear(spec, base, lora, module_path(layer, "v_proj"), h1).reshape(n, spec.n_kv_heads, spec.head_dim)
        if spec.qk_norm:
            q, _ = rms_norm(q, base[f"{prefix}.self_attn.q_norm.weight"], eps)
            k, _ = rms_norm(k, base[f"{prefix}.self_attn.k_norm.weight"], eps)
        keys.append(np.concatenate([past.keys[layer], rope(k, cos, sin)]))
        values.append(np.concatenate([past.values[layer], v]))
        attended = cached_attention(rope(q, cos, sin), keys[-1], values[-1], start)
        x = x + _linear(spec, base, lora, module_path(layer, "o_proj"), attended.reshape(n, -1))
        h2, _ = rms_norm(x, base[f"{prefix}.post_attention_layernorm.weight"], eps)
        gate = _linear(spec, base, lora, module_path(layer, "gate_proj"), h2)
        up = _linear(spec, base, lora, module_path(layer, "up_proj"), h2)
        x = x + _linear(spec, base, lora, module_path(layer, "down_proj"), silu(gate) * up)
    hidden, _ = rms_norm(x, base["model.norm.weight"], eps)
    return _linear(spec, base, lora, "lm_head", hidden), KVCache(tuple(keys), tuple(values))
