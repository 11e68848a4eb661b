"""Kernel checks for the GPU: the device's own ceilings, cuDNN attention against XLA's, and
whether multi-adapter LoRA through `jax.lax.ragged_dot` pays for adapter slots it does not use.

Every figure is device time per call of one kernel, measured by `device_time`: one compiled
loop runs the kernel `n` times back to back (an optimisation barrier chains each call to the
previous one, so nothing is hoisted or skipped), and the median of a few loops over `n` is
taken, so dispatch and compilation stay out of the number. Inputs are random (never zeros).

Each check returns table rows: dicts with a `case` name, figures (`*_ms`, `tflops`,
`gb_per_s`, `rel_err`, `x_dense`) and, where it decides something, a `verdict`; a case that
fails records its `error` instead, and the other cases still run.

Shapes: B rows, T tokens, H/K query/kv heads, E head dim, N tokens of a batch, D in, F out,
R LoRA rank, S adapter slots, G adapters with tokens in the batch.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Row = dict[str, Any]
Kernel = Callable[..., Any]
SAMPLES = 3
"""Timed loops per figure (the median is reported)."""
ATTENTION_AGREEMENT = 2e-2
"""Relative difference between cuDNN's and XLA's attention (outputs and gradients) that bf16
operands explain (a few units of their 2^-8 rounding); more means a wrong result."""


def device_time(kernel: Kernel, operand: jax.Array, consts: tuple[Any, ...], n: int) -> float:
    """Seconds per call of `kernel(operand, *consts)` on the device: one compiled loop of `n`
    chained calls, run once to compile and warm up, then `SAMPLES` times; the median over `n`."""

    def body(_: jax.Array, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        x, check = carry
        y = kernel(x, *consts)
        x, y = jax.lax.optimization_barrier((x, y))  # the next call waits for this one's output
        return x, check + jnp.ravel(jax.tree.leaves(y)[0])[0].astype(jnp.float32)

    def run() -> None:
        jax.block_until_ready(jax.lax.fori_loop(0, n, body, (operand, jnp.float32(0))))

    run()
    times = []
    for _ in range(SAMPLES):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times) / n


def random(rng: np.random.Generator, shape: tuple[int, ...], dtype: str, scale: float = 1.0) -> jax.Array:
    """A standard normal array of `shape` times `scale`, drawn on the host, on the device in `dtype`."""
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)).astype(dtype)


def rel_error(value: Any, reference: Any) -> float:
    """‖value − reference‖ / ‖reference‖ over every leaf, in float64 on the host."""
    pairs = zip(jax.tree.leaves(value), jax.tree.leaves(reference))
    diff = ref = 0.0
    for v, r in pairs:
        v64, r64 = np.asarray(v, np.float64), np.asarray(r, np.float64)
        diff += float(np.sum((v64 - r64) ** 2))
        ref += float(np.sum(r64**2))
    return float(np.sqrt(diff / ref)) if ref > 0 else float("inf")


def failure(case: str, error: BaseException) -> Row:
    """A row recording that `case` failed, with the error's type and the start of its message."""
    return {"case": case, "error": f"{type(error).__name__}: {str(error)[:300]}"}


# ---- ceilings ------------------------------------------------------------------------------


def ceilings(matmul: int, copy_elements: int, dtype: str, n: int) -> list[Row]:
    """The device's rates as measured here: a [matmul, matmul] @ [matmul, matmul] product in
    `dtype` (TFLOP/s) and an elementwise pass over `copy_elements` float32 values (GB/s,
    bytes read plus bytes written)."""
    rng = np.random.default_rng(0)
    rows: list[Row] = []
    try:
        a = random(rng, (matmul, matmul), dtype)
        b = random(rng, (matmul, matmul), dtype, scale=matmul**-0.5)
        seconds = device_time(lambda x, w: x @ w, a, (b,), n)
        rows.append(
            {"case": f"matmul {matmul}^3 {dtype}", "ms": seconds * 1e3, "tflops": 2 * matmul**3 / seconds / 1e12}
        )
    except Exception as error:  # noqa: BLE001 - a failed case is recorded and the others run
        rows.append(failure(f"matmul {matmul}^3 {dtype}", error))
    try:
        x = jnp.arange(copy_elements, dtype=jnp.float32)
        seconds = device_time(lambda v: v + 1.0, x, (), n)
        rows.append(
            {
                "case": f"copy {copy_elements * 4 / 2**20:.0f} MiB",
                "ms": seconds * 1e3,
                "gb_per_s": 8 * copy_elements / seconds / 1e9,
            }
        )
    except Exception as error:  # noqa: BLE001
        rows.append(failure("copy", error))
    return rows


# ---- attention -----------------------------------------------------------------------------


def attend(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str) -> jax.Array:
    """Causal attention: q [B, T, H, E], k and v [B, T, K, E] → [B, T, H, E], by `implementation`."""
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)


def attend_grads(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str) -> tuple[jax.Array, ...]:
    """Gradients of the sum of `attend`'s output with respect to q, k and v (forward + backward)."""
    total = lambda *qkv: jnp.sum(attend(*qkv, implementation=implementation).astype(jnp.float32))
    return jax.grad(total, argnums=(0, 1, 2))(q, k, v)


def attention_check(shape: tuple[int, int, int, int, int], dtype: str, n: int) -> list[Row]:
    """Causal grouped-query attention at `shape` = (B, T, H, K, E) through
    `jax.nn.dot_product_attention` with implementation "xla" and "cudnn": forward and
    forward + backward times, forward TFLOP/s, and cuDNN's relative error against XLA.
    The verdict says whether cuDNN runs here and how it compares."""
    b, t, h, k, e = shape
    rng = np.random.default_rng(1)
    q = random(rng, (b, t, h, e), dtype)  # [B, T, H, E]
    kv = (random(rng, (b, t, k, e), dtype), random(rng, (b, t, k, e), dtype))  # [B, T, K, E] each
    flops = 4 * b * t * t * h * e / 2  # QKᵀ and PV, half of the square under the causal mask
    rows: dict[str, Row] = {}
    outputs: dict[str, Any] = {}
    for implementation in ("xla", "cudnn"):
        case = f"attention {implementation}"
        forward = functools.partial(attend, implementation=implementation)
        backward = functools.partial(attend_grads, implementation=implementation)
        try:
            outputs[implementation] = (forward(q, *kv), backward(q, *kv))
            fwd_s = device_time(forward, q, kv, n)
            bwd_s = device_time(backward, q, kv, n)
            rows[implementation] = {
                "case": case,
                "fwd_ms": fwd_s * 1e3,
                "fwd_bwd_ms": bwd_s * 1e3,
                "tflops": flops / fwd_s / 1e12,
            }
        except Exception as error:  # noqa: BLE001 - cuDNN may be missing or refuse these inputs
            rows[implementation] = failure(case, error)
    cudnn, xla = rows["cudnn"], rows["xla"]
    if "error" in cudnn:
        cudnn["verdict"] = f"cuDNN attention does not run here: {cudnn['error'][:160]}"
    elif "error" not in xla:
        cudnn["rel_err"] = rel_error(outputs["cudnn"], outputs["xla"])
        cudnn["verdict"] = (
            f"cuDNN attention runs: forward {xla['fwd_ms'] / cudnn['fwd_ms']:.2f}x and forward+backward "
            f"{xla['fwd_bwd_ms'] / cudnn['fwd_bwd_ms']:.2f}x the speed of XLA's; "
            f"relative difference {cudnn['rel_err']:.1e}"
            + ("" if cudnn["rel_err"] < ATTENTION_AGREEMENT else ", MORE than bf16 rounding explains")
        )
    return [xla, cudnn]


# ---- multi-adapter LoRA ----------------------------------------------------------------------


def lora_ragged(x: jax.Array, a: jax.Array, b: jax.Array, sizes: jax.Array) -> jax.Array:
    """`(x A_s) B_s` per token by grouped matmul: x [N, D] sorted by slot; a [S, D, R]; b [S, R, F];
    sizes [S] tokens of each slot. Returns [N, F]."""
    return jax.lax.ragged_dot(jax.lax.ragged_dot(x, a, sizes), b, sizes)


def lora_dense(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """The same arithmetic as one adapter's plain matmuls: x [N, D] @ a [D, R] @ b [R, F] → [N, F]."""
    return (x @ a) @ b


def lora_gathered(x: jax.Array, a: jax.Array, b: jax.Array, active: jax.Array) -> jax.Array:
    """Only the active slots' adapters: gather them, then one batched matmul. x [N, D] holds
    N/G tokens of each of the G slots in `active` [G], in that order. Returns [N, F]."""
    xg = x.reshape(active.shape[0], -1, x.shape[-1])  # [G, N/G, D]
    y = jnp.einsum("gnr,grf->gnf", jnp.einsum("gnd,gdr->gnr", xg, a[active]), b[active])  # [G, N/G, F]
    return y.reshape(x.shape[0], -1)


def ragged_check(shape: tuple[int, int, int, int, int], groups: tuple[int, ...], dtype: str, n: int) -> list[Row]:
    """LoRA deltas of N tokens at `shape` = (N, D, F, R, S) spread over G adapters (each of
    `groups`), in `dtype`: `lora_ragged` and `lora_gathered` against `lora_dense`, the plain
    matmuls of the same useful work; times also as multiples of the dense time (`x_dense`).
    A last row's verdict says whether ragged_dot costs as if every slot were computed."""
    tokens, d_in, d_out, rank, slots = shape
    rng = np.random.default_rng(2)
    x = random(rng, (tokens, d_in), dtype)  # [N, D]
    a = random(rng, (slots, d_in, rank), dtype, scale=d_in**-0.5)  # [S, D, R]
    b = random(rng, (slots, rank, d_out), dtype, scale=rank**-0.5)  # [S, R, F]
    label = f"lora {dtype}"
    try:
        dense = device_time(lora_dense, x, (a[1], b[1]), n)
    except Exception as error:  # noqa: BLE001 - a failed case is recorded and the others run
        return [failure(f"{label} dense (real work)", error)]
    rows: list[Row] = [{"case": f"{label} dense (real work)", "ms": dense * 1e3, "x_dense": 1.0}]
    ragged: dict[int, float] = {}
    gathered: dict[int, float] = {}
    for g in groups:
        active = jnp.arange(1, g + 1, dtype=jnp.int32)  # slot 0 is the bare model's
        sizes = jnp.zeros(slots, jnp.int32).at[active].set(tokens // g)  # [S]
        adapters = f"{g} adapter{'s' if g > 1 else ''}"
        ragged_row = _timed(f"{label} ragged_dot, {adapters}", lora_ragged, x, (a, b, sizes), n, dense, ragged, g)
        gathered_row = _timed(
            f"{label} gather+bmm, {adapters}", lora_gathered, x, (a, b, active), n, dense, gathered, g
        )
        if g in ragged and g in gathered:
            ragged_row["rel_err"] = rel_error(lora_ragged(x, a, b, sizes), lora_gathered(x, a, b, active))
        rows += [ragged_row, gathered_row]
    if ragged:
        most, fewest = max(ragged), min(ragged)
        ratio = ragged[most] / dense
        alternative = f"; gather+bmm {gathered[most] / dense:.1f}x" if most in gathered else ""
        verdict = (
            f"ragged_dot {'looks dense-padded' if ratio > 2.0 else 'is not padded'}: {most} adapters cost "
            f"{ratio:.1f}x the dense matmul of the same work ({fewest}: {ragged[fewest] / dense:.1f}x; "
            f"{slots} slots allocated){alternative}"
        )
        rows.append({"case": f"{label} verdict", "verdict": verdict})
    return rows


def _timed(
    case: str,
    kernel: Kernel,
    x: jax.Array,
    consts: tuple[Any, ...],
    n: int,
    dense: float,
    into: dict[int, float],
    g: int,
) -> Row:
    """The row of `case`: `kernel`'s time, also as a multiple of `dense`, stored in `into[g]`; or its error."""
    try:
        into[g] = device_time(kernel, x, consts, n)
    except Exception as error:  # noqa: BLE001 - a failed case is recorded and the others run
        return failure(case, error)
    return {"case": case, "ms": into[g] * 1e3, "x_dense": into[g] / dense}
