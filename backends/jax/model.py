"""The decoder (Llama 3 / Qwen2 / Qwen3) as pure functions over two dicts of arrays: the
frozen base weights and the LoRA state of the A adapters a call uses (params.py's layout with
the slot axis holding those A adapters, `[L, A, in, R]`; compiled.py compacts it).

Layers are stacked and run under `jax.lax.scan`; the unembedding and log-softmax run over
chunks of tokens. With `remat` (when a batch's activations would not fit) a gradient recomputes
each layer and each chunk, so neither every layer's activations nor the `[tokens, vocab]`
logits are kept at once. Nothing here holds state; compiled.py jits the entry points (`hidden_states`
with `token_logprobs` for training, `extend` for sampling).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from backends.jax.ops import (
    Routing,
    apply_rope,
    attention,
    lora_delta,
    lora_down,
    lora_input,
    project,
    rms_norm,
    rope_inv_freq,
    rope_tables,
)
from bios.catalog import ModelSpec

LOGPROB_CHUNK = 256
"""Tokens per chunk of the unembedding + log-softmax."""
SITES = {
    name: index
    for index, name in enumerate(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
    )
}
"""A number per adaptable module, folded into its dropout masks."""


def _layer_params(base: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return {k.removeprefix("layers."): v for k, v in base.items() if k.startswith("layers.")}


def _layer_lora(lora: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return {k: v for k, v in lora.items() if k.startswith("lora.") and not k.startswith("lora.lm_head")}


def _attention_inputs(
    spec: ModelSpec, p: dict, lo: dict, x: jax.Array, cos: jax.Array, sin: jax.Array, routing: Routing
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q [B, T, H, E] and k, v [B, T, K, E] of one layer's input x [B, T, D]: normed, projected
    (with LoRA), q and k normed per head (qwen3) and rotated."""
    b, t, _ = x.shape
    h = rms_norm(x, p["input_layernorm"], spec.rms_eps)

    def proj(name: str, width: int) -> jax.Array:
        bias = p.get(f"{name}.bias")  # qwen2
        pair = (lo[f"lora.{name}.a"], lo[f"lora.{name}.b"])
        return project(h, p[name], bias, pair, routing, SITES[name]).reshape(b, t, width, spec.head_dim)

    q, k, v = proj("q_proj", spec.n_heads), proj("k_proj", spec.n_kv_heads), proj("v_proj", spec.n_kv_heads)
    if spec.qk_norm:
        q, k = rms_norm(q, p["q_norm"], spec.rms_eps), rms_norm(k, p["k_norm"], spec.rms_eps)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def _attention_output(
    spec: ModelSpec,
    p: dict,
    lo: dict,
    x: jax.Array,
    q: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    mask: jax.Array | None,
    routing: Routing,
) -> jax.Array:
    """x [B, T, D] plus the o_proj of q [B, T, H, E] attending to keys, values [B, C, K, E]
    (mask [B, 1, T, C], or None for causal self-attention over the T tokens)."""
    b, t, _ = x.shape
    out = attention(q, keys, values, mask).reshape(b, t, spec.n_heads * spec.head_dim)
    return x + project(out, p["o_proj"], None, (lo["lora.o_proj.a"], lo["lora.o_proj.b"]), routing, SITES["o_proj"])


def _mlp_block(spec: ModelSpec, p: dict, lo: dict, x: jax.Array, routing: Routing) -> jax.Array:
    h = rms_norm(x, p["post_attention_layernorm"], spec.rms_eps)
    gate = project(
        h, p["gate_proj"], None, (lo["lora.gate_proj.a"], lo["lora.gate_proj.b"]), routing, SITES["gate_proj"]
    )
    up = project(h, p["up_proj"], None, (lo["lora.up_proj.a"], lo["lora.up_proj.b"]), routing, SITES["up_proj"])
    hidden = (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(up.dtype)
    return x + project(
        hidden, p["down_proj"], None, (lo["lora.down_proj.a"], lo["lora.down_proj.b"]), routing, SITES["down_proj"]
    )


def hidden_states(
    spec: ModelSpec,
    base: dict[str, jax.Array],
    lora: dict[str, jax.Array],
    tokens: jax.Array,
    positions: jax.Array,
    segments: jax.Array | None,
    routing: Routing,
    remat: bool = True,
) -> jax.Array:
    """Tokens [B, T] at their positions [B, T] in their own data → final-normed hidden [B, T, D]
    in the weights' dtype (the residual stream itself is float32: ops.py, Precision).

    segments: None when each row is one datum from position 0 (plain causal attention); else
    [B, T] int32 saying which of its row's data each token belongs to, and a token attends only
    to the earlier tokens of its own datum. With `remat`, a gradient keeps only each layer's
    input and recomputes the layer's activations."""
    cos, sin = rope_tables(rope_inv_freq(spec), positions)
    x = base["embed_tokens"][tokens].astype(jnp.float32)
    mask = None if segments is None else _segment_mask(segments)

    def layer(x: jax.Array, params: tuple[dict, dict, jax.Array]) -> tuple[jax.Array, None]:
        p, lo, index = params
        route = routing.at_layer(index)
        q, k, v = _attention_inputs(spec, p, lo, x, cos, sin, route)
        x = _attention_output(spec, p, lo, x, q, k, v, mask, route)
        return _mlp_block(spec, p, lo, x, route), None

    scanned = jax.checkpoint(layer) if remat else layer
    x, _ = jax.lax.scan(scanned, x, (_layer_params(base), _layer_lora(lora), jnp.arange(spec.n_layers)))
    return rms_norm(x, base["norm"], spec.rms_eps)


def _segment_mask(segments: jax.Array) -> jax.Array:
    """[B, 1, T, T] bool: token t sees token s of its row when s <= t and both are of one datum."""
    t = segments.shape[1]
    causal = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
    return (causal[None] & (segments[:, :, None] == segments[:, None, :]))[:, None]


def _unembedding(base: dict[str, jax.Array]) -> jax.Array:
    """[D, V]: `lm_head`, or the transposed `embed_tokens` when tied."""
    return base["lm_head"] if "lm_head" in base else base["embed_tokens"].T


def token_logprobs(
    base: dict[str, jax.Array],
    lora: dict[str, jax.Array],
    hidden: jax.Array,
    targets: jax.Array,
    routing: Routing,
    chunk: int = LOGPROB_CHUNK,
    remat: bool = True,
) -> jax.Array:
    """L6 `log softmax(logits)[target]` for hidden [B, T, D] and targets [B, T] → [B, T] float32.

    Computed over chunks of at most `chunk` tokens; with `remat` each is recomputed in the backward
    pass, so the [B*T, V] logits never exist at once. The lm_head LoRA `u B` of each token is one product
    with the A adapters' B factors side by side ([A*R, V]), u placed in its adapter's block.
    """
    b, t, d = hidden.shape
    n = b * t
    pieces = -(-n // chunk)
    chunk = -(-n // pieces)  # pieces of at most `chunk` tokens, as even as the tokens allow
    pad = pieces * chunk - n
    flat_h = jnp.pad(hidden.reshape(n, d), ((0, pad), (0, 0)))
    flat_y = jnp.pad(targets.reshape(n), (0, pad))
    dropped = lora_input(hidden, routing, SITES["lm_head"])  # not in a layer: no layer fold
    u = _blocks(lora_down(dropped, lora["lora.lm_head.a"], routing), routing).reshape(n, -1)
    u = jnp.pad(u, ((0, pad), (0, 0)))  # [N, A*R]
    w = _unembedding(base)
    lora_b = lora["lora.lm_head.b"].reshape(-1, w.shape[1])  # [A*R, V]

    def chunk_logprobs(args: tuple[jax.Array, ...]) -> jax.Array:
        h, y, uc = args
        logits = jnp.einsum("cd,dv->cv", h, w.astype(h.dtype), preferred_element_type=jnp.float32)
        logits = logits + jnp.einsum("cr,rv->cv", uc, lora_b)
        return jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0] - jax.nn.logsumexp(logits, axis=1)

    mapped = jax.checkpoint(chunk_logprobs) if remat else chunk_logprobs
    if pieces == 1:
        return mapped((flat_h, flat_y, u))[:n].reshape(b, t)
    split = (flat_h.reshape(-1, chunk, d), flat_y.reshape(-1, chunk), u.reshape(-1, chunk, u.shape[-1]))
    return jax.lax.map(mapped, split).reshape(-1)[:n].reshape(b, t)


def _blocks(u: jax.Array, routing: Routing) -> jax.Array:
    """u [B, T, R] of each row's adapter → [B, T, A*R], u in the row's adapter's block, zeros elsewhere."""
    if routing.onehot is None:
        return u
    return (routing.onehot[:, None, :, None] * u[:, :, None, :]).reshape(*u.shape[:2], -1)


def extend(
    spec: ModelSpec,
    base: dict[str, jax.Array],
    lora: dict[str, jax.Array],
    tokens: jax.Array,
    start: jax.Array,
    cache: tuple[jax.Array, jax.Array],
    routing: Routing,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Feed tokens [B, T] at positions start[b].. of each row, reading and writing the KV cache
    (keys, values: [L, B, C, K, E]), row b with its adapter `routing.adapter[b]` among the A of
    `lora` (compiled.routing). Returns (logits [B, T, V] float32, the updated cache); the
    cache is updated in place when donated, and entries past its capacity C are not written."""
    b, t = tokens.shape
    capacity = cache[0].shape[2]
    positions = start[:, None] + jnp.arange(t)[None, :]
    cos, sin = rope_tables(rope_inv_freq(spec), positions)
    visible = jnp.arange(capacity)[None, None, :] <= positions[:, :, None]  # [B, T, C]
    x = base["embed_tokens"][tokens].astype(jnp.float32)
    rows = jnp.arange(b)[:, None]

    def layer(carry: tuple, params: tuple) -> tuple[tuple, None]:
        # The cache rides in the carry and only the new tokens' entries are written, in place:
        # as scanned input and output it would be copied whole at every call.
        x, keys, values = carry
        p, lo, index = params
        q, k, v = _attention_inputs(spec, p, lo, x, cos, sin, routing)
        keys = keys.at[index, rows, positions].set(k.astype(keys.dtype), mode="drop")
        values = values.at[index, rows, positions].set(v.astype(values.dtype), mode="drop")
        x = _attention_output(spec, p, lo, x, q, keys[index], values[index], visible[:, None], routing)
        return (_mlp_block(spec, p, lo, x, routing), keys, values), None

    layers = (_layer_params(base), _layer_lora(lora), jnp.arange(spec.n_layers))
    (x, keys, values), _ = jax.lax.scan(layer, (x, *cache), layers)
    hidden = rms_norm(x, base["norm"], spec.rms_eps)
    logits = jnp.einsum(
        "btd,dv->btv", hidden, _unembedding(base).astype(hidden.dtype), preferred_element_type=jnp.float32
    )
    return logits + lora_delta(hidden, lora["lora.lm_head.a"], lora["lora.lm_head.b"], routing), (keys, values)
