"""FLOP and byte accounting for LoRA training and decoding, and device peak figures (what
`bench/` reports utilisation against).

LoRA step FLOPs for T tokens through a model with N base parameters (matmul weights only):
  forward                       2·N·T
  backward through activations  2·N·T      (the base weights get no gradient)
  adapter weight gradients      2·T·Σ(in·R + R·out) over adapted projections, plus the
                                adapters' own forward and activation-backward, 4·T·Σ(in·R + R·out)
  attention                     forward 2·2·T·ctx·H·E per layer (QKᵀ and PV, causal: ctx ≈ T/2),
                                backward twice that
Decoding one token per row reads every base weight once plus each row's KV cache.
"""

from __future__ import annotations

from bios.catalog import ModelSpec

PEAKS = {  # dense bf16 FLOP/s and HBM bytes/s, from the vendors' data sheets
    "H100": (989e12, 3.35e12),
    "H200": (989e12, 4.8e12),
    "A100": (312e12, 2.039e12),
    "L40S": (362e12, 0.864e12),
}


def matmul_params(spec: ModelSpec) -> int:
    """Parameters that take part in matmuls: projections and the unembedding (not embeddings' lookup)."""
    shapes = spec.linear_shapes()
    per_layer = sum(i * o for m, (i, o) in shapes.items() if m != "lm_head")
    return spec.n_layers * per_layer + spec.d_model * spec.vocab_size


def adapter_params(spec: ModelSpec, rank: int, modules: tuple[str, ...]) -> int:
    shapes = spec.linear_shapes()
    layers = lambda m: 1 if m == "lm_head" else spec.n_layers
    return sum(layers(m) * rank * (shapes[m][0] + shapes[m][1]) for m in modules)


def lora_step_flops(spec: ModelSpec, batch: int, length: int, rank: int, modules: tuple[str, ...]) -> float:
    """FLOPs of one forward_backward on `batch` rows of `length` tokens (see module docstring)."""
    tokens = batch * length
    base = 4.0 * matmul_params(spec) * tokens
    adapters = 6.0 * adapter_params(spec, rank, modules) * tokens
    attention = 3 * 4.0 * spec.n_layers * batch * length * (length / 2) * spec.n_heads * spec.head_dim
    return base + adapters + attention


def decode_bytes(spec: ModelSpec, rows: int, context: int, weight_bytes: int) -> float:
    """Bytes read per decode step: all matmul weights once, plus K and V of `context` positions per row."""
    kv = 2 * spec.n_layers * context * spec.n_kv_heads * spec.head_dim * weight_bytes
    return matmul_params(spec) * weight_bytes + rows * kv


def device_peaks(device_kind: str) -> tuple[float, float] | None:
    """(FLOP/s, bytes/s) of a device whose `device_kind` names a known GPU, else None."""
    for name, peaks in PEAKS.items():
        if name in device_kind.upper():
            return peaks
    return None
