"""Adam(W) of docs/losses.md, O1–O5, on an adapter's tensors (dicts of float64 arrays keyed
by LoRA factor name, `A: [in, R]`, `B: [R, out]`). Pure functions: nothing is updated in place.
"""

from __future__ import annotations

import math

import numpy as np

Tensors = dict[str, np.ndarray]


def global_norm(grads: Tensors) -> float:
    """O1 `grad_norm = sqrt(Σ_tensors Σ g²)` over every tensor of the adapter."""
    return math.sqrt(sum(float(np.sum(g * g)) for g in grads.values()))


def clip_by_global_norm(grads: Tensors, norm: float, clip_norm: float) -> Tensors:
    """O2 if `c > 0` and `grad_norm > c`: `g ← g · c / grad_norm`; otherwise g unchanged."""
    if clip_norm > 0 and norm > clip_norm:
        return {name: g * (clip_norm / norm) for name, g in grads.items()}
    return grads


def update_moments(
    m: np.ndarray, v: np.ndarray, g: np.ndarray, beta1: float, beta2: float
) -> tuple[np.ndarray, np.ndarray]:
    """O3 `m ← β1·m + (1-β1)·g`, `v ← β2·v + (1-β2)·g²`. All arrays one tensor's shape."""
    return beta1 * m + (1.0 - beta1) * g, beta2 * v + (1.0 - beta2) * g * g


def bias_correct(m: np.ndarray, v: np.ndarray, beta1: float, beta2: float, step: int) -> tuple[np.ndarray, np.ndarray]:
    """O4 `m̂ = m / (1 - β1^t)`, `v̂ = v / (1 - β2^t)` at step t (1 for the first update)."""
    return m / (1.0 - beta1**step), v / (1.0 - beta2**step)


def apply_update(
    theta: np.ndarray, m_hat: np.ndarray, v_hat: np.ndarray, learning_rate: float, eps: float, weight_decay: float
) -> np.ndarray:
    """O5 `θ ← θ - η · (m̂ / (sqrt(v̂) + ε) + λ·θ)` (decoupled weight decay)."""
    return theta - learning_rate * (m_hat / (np.sqrt(v_hat) + eps) + weight_decay * theta)


def adam_step(
    weights: Tensors,
    grads: Tensors,
    m: Tensors,
    v: Tensors,
    step: int,
    *,
    learning_rate: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    grad_clip_norm: float,
) -> tuple[Tensors, Tensors, Tensors, float]:
    """O1–O5 for update number `step` (1 for the first): returns (weights, m, v, grad_norm),
    grad_norm measured before clipping."""
    norm = global_norm(grads)
    clipped = clip_by_global_norm(grads, norm, grad_clip_norm)
    new_w, new_m, new_v = {}, {}, {}
    for name, theta in weights.items():
        new_m[name], new_v[name] = update_moments(m[name], v[name], clipped[name], beta1, beta2)
        m_hat, v_hat = bias_correct(new_m[name], new_v[name], beta1, beta2, step)
        new_w[name] = apply_update(theta, m_hat, v_hat, learning_rate, eps, weight_decay)
    return new_w, new_m, new_v, norm
