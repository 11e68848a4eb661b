"""What reaches the compiled training programs and what comes back: rows of requests,
packed into bucketed batches, and their results gathered per request.

A forward_backward request contributes one `Row` per datum. Rows of many requests (and many
adapters) are sorted by adapter slot, cut into micro-batches that fit the token budget
(`micro_batches`, `token_budget`) and padded into a `Batch` whose row and token counts are
bucketed (`bucket`, the one shape-bucketing function of the backend), so a training loop
with varying batch sizes and lengths compiles a handful of programs. `Outputs` gathers each
request's rows back from the batches' results.

The decode loop's per-row settings (`DecodeRows`) and what a chunk of it returns (`Decoded`)
are declared here too. Shapes: B rows, T tokens, N = B*T, V vocab. Imports no other module of
the backend but sharding.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from backends.jax.sharding import batch_sharding
from bios.backend import ForwardBackwardOutput
from bios.catalog import ModelSpec
from bios.losses import LOSSES

MIN_TOKENS = 16
"""Smallest token bucket of a training batch."""
FINE_TOKENS = 128
"""Above this many tokens per row, rows are bucketed by quarter octaves (`token_bucket`)."""
PACK_TOKENS = 512
"""Several data are packed into batch rows longer than the longest datum only up to this many
tokens: attention's cost grows with the square of a row's length."""
CPU_ACTIVATION_BYTES = 2 << 30
"""Activations a forward_backward may keep on a device without memory statistics (CPU)."""
DEFAULT_TOKENS_PER_CALL = 16384
"""Micro-batch budget on devices without memory statistics (CPU)."""


def bucket(n: int, minimum: int = 1, multiple: int = 1, cap: int | None = None) -> int:
    """The smallest power of two >= max(n, minimum), rounded up to `multiple`, at most `cap` (if >= n)."""
    size = max(minimum, 1 << max(0, int(n - 1).bit_length()))
    size = -(-size // multiple) * multiple
    return max(n, min(size, cap)) if cap is not None else size


def token_bucket(n: int, cap: int | None = None) -> int:
    """Tokens per row of a training batch for rows of up to `n` tokens: a power of two from
    MIN_TOKENS to FINE_TOKENS, then quarter octaves (128, 160, 192, 224, 256, 320, ...), so a
    long row is padded by at most 25 %. At most `cap` (if >= n)."""
    size = bucket(n, MIN_TOKENS)
    if size > FINE_TOKENS:
        step = size // 8
        size = -(-n // step) * step
    return max(n, min(size, cap)) if cap is not None else size


@dataclass(frozen=True, slots=True)
class Row:
    """One datum of one forward_backward request: one row of a `Batch`."""

    slot: int
    """Adapter slot of its request (0: the bare base model)."""
    request: int
    """Index of its request among the requests being run."""
    datum: int
    """Index of the datum within its request."""
    tokens: np.ndarray
    """[T] int input tokens."""
    inputs: dict[str, np.ndarray]
    """The loss's per-token inputs by name, each [T], `target_tokens` included."""
    config: dict[str, float]
    """The loss's settings (its request's `loss_config`)."""
    dropout_rate: float = 0.0
    """LoRA dropout rate of its adapter; 0 without dropout (and always in a forward pass)."""
    dropout_seed: int = 0
    """uint32 seed of the row's dropout masks (meaningful only with a rate)."""

    @property
    def length(self) -> int:
        """Tokens of the datum, T."""
        return len(self.tokens)


@dataclass(frozen=True)
class Layout:
    """Where the rows of one micro-batch sit in its padded [B, T] batch: batch row j holds the
    rows `lanes[j]` (indices into the micro-batch) back to back, in that order; rows past
    `len(lanes)` are padding. Only rows of one adapter share a batch row, and a row with
    dropout has one to itself."""

    shape: tuple[int, int]
    """[B, T]: bucketed batch rows and tokens per batch row."""
    lanes: tuple[tuple[int, ...], ...]

    @property
    def packed(self) -> bool:
        """Some batch row holds several rows (attention must then keep them apart)."""
        return any(len(lane) > 1 for lane in self.lanes)

    @property
    def padded_tokens(self) -> int:
        """B·T, what the compiled program computes."""
        return self.shape[0] * self.shape[1]

    def places(self, rows: Sequence[Row]) -> list[tuple[int, int]]:
        """(batch row, first token) of each of `rows`, the rows this layout was made for."""
        places = [(0, 0)] * len(rows)
        for j, lane in enumerate(self.lanes):
            offset = 0
            for i in lane:
                places[i] = (j, offset)
                offset += rows[i].length
        return places


def layout(rows: Sequence[Row], multiple: int, max_tokens: int) -> Layout:
    """The layout of `rows` (at least one) with the fewer padded tokens B·T of two: batch rows
    as long as the longest row, each holding as many rows as fit; or, when the rows' total fits
    in PACK_TOKENS and `max_tokens`, batch rows as long as that total (all rows of one adapter
    in one). T is a `token_bucket` (never shorter than the longest row; at most `max_tokens`
    unless a row is longer); rows are packed first-fit by decreasing length; B is a power of two
    and a multiple of `multiple` (the data-parallel devices). Only two widths are tried, so a
    training loop meets few shapes. Deterministic in `rows`. Pure."""
    widths = [token_bucket(max(row.length for row in rows), cap=max_tokens)]
    total = token_bucket(sum(row.length for row in rows))
    if widths[0] < total <= min(PACK_TOKENS, max_tokens):
        widths.append(total)
    plans = [
        Layout((bucket(len(lanes), multiple=multiple), width), lanes)
        for width in widths
        for lanes in [_first_fit(rows, width)]
    ]
    return min(plans, key=lambda plan: plan.padded_tokens)


def _first_fit(rows: Sequence[Row], width: int) -> tuple[tuple[int, ...], ...]:
    """Rows packed into lanes of `width` tokens: by slot, longest first (ties in order), each
    into the first lane of its slot with room; rows with dropout alone."""
    lanes: list[list[int]] = []
    room: list[int] = []
    first_of_slot = 0
    slot = None
    for i in sorted(range(len(rows)), key=lambda i: (rows[i].slot, -rows[i].length, i)):
        row = rows[i]
        if row.slot != slot:
            slot, first_of_slot = row.slot, len(lanes)
        fits = [] if row.dropout_rate > 0 else [j for j in range(first_of_slot, len(lanes)) if room[j] >= row.length]
        if fits:
            lanes[fits[0]].append(i)
            room[fits[0]] -= row.length
        else:
            lanes.append([i])
            room.append(0 if row.dropout_rate > 0 else width - row.length)
    return tuple(tuple(lane) for lane in lanes)


@dataclass(frozen=True)
class Batch:
    """A padded batch laid out by a `Layout`: rows B, tokens T (both bucketed), N = B*T.

    tokens, targets: [B, T] int32; positions: [B, T] int32, each token's position in its own
    datum (RoPE); mask: [B, T] float32 (0 on padding); inputs: the loss's per-token inputs
    [B, T]; config: the loss's settings, per token [B, T]; adapter: [B] int32, each row's
    adapter among the active slots of the call (slots.py `Active`).
    segments: [B, T] int32, which of its row's data each token belongs to (-1 on padding), so
    attention keeps packed data apart; None when every row holds one datum (plain causal).
    With LoRA dropout, dropout_seed [B] uint32 seeds each row's masks and dropout_rate [B] is
    its adapter's rate (both None when no row of the batch uses dropout).
    """

    tokens: jax.Array
    targets: jax.Array
    positions: jax.Array
    mask: jax.Array
    inputs: dict[str, jax.Array]
    config: dict[str, jax.Array]
    adapter: jax.Array
    segments: jax.Array | None = None
    dropout_seed: jax.Array | None = None
    dropout_rate: jax.Array | None = None

    @classmethod
    def pack(cls, rows: Sequence[Row], plan: Layout, loss_fn: str, mesh: Mesh, adapter: dict[int, int]) -> Batch:
        """`rows` placed as `plan` says and split by batch rows over `mesh`. Batch row j has the
        adapter `adapter[slot]` of its rows' slot; padding rows have mask 0 and the last used
        row's adapter. Pure."""
        spec = LOSSES[loss_fn]
        names = [n for n in spec.inputs if n != "target_tokens"]
        b, t = plan.shape
        tokens, targets, positions = (np.zeros((b, t), np.int32) for _ in range(3))
        segments, mask = np.full((b, t), -1, np.int32), np.zeros((b, t), np.float32)
        inputs = {name: np.zeros((b, t), np.float32) for name in names}
        config = {key: np.zeros((b, t), np.float32) for key in spec.config}
        slots = np.full(b, adapter[rows[plan.lanes[-1][0]].slot], np.int32)
        seeds, rates = np.zeros(b, np.uint32), np.zeros(b, np.float32)
        for i, (j, start) in enumerate(plan.places(rows)):
            row = rows[i]
            span = slice(start, start + row.length)
            tokens[j, span], targets[j, span], mask[j, span] = row.tokens, row.inputs["target_tokens"], 1.0
            positions[j, span], segments[j, span] = np.arange(row.length), plan.lanes[j].index(i)
            slots[j], seeds[j], rates[j] = adapter[row.slot], row.dropout_seed, row.dropout_rate
            for name in names:
                inputs[name][j, span] = row.inputs[name]
            for key in config:
                config[key][j, span] = row.config[key]

        dropout = bool(rates.any())
        host = {
            "tokens": tokens,
            "targets": targets,
            "positions": positions,
            "mask": mask,
            "inputs": inputs,
            "config": config,
            "adapter": slots,
            "segments": segments if plan.packed else None,
            "dropout_seed": seeds if dropout else None,
            "dropout_rate": rates if dropout else None,
        }
        shardings = jax.tree.map(lambda array: batch_sharding(array.shape, mesh), host)
        return cls(**jax.device_put(host, shardings))  # one transfer for every array


jax.tree_util.register_dataclass(
    Batch,
    data_fields=[
        "tokens",
        "targets",
        "positions",
        "mask",
        "inputs",
        "config",
        "adapter",
        "segments",
        "dropout_seed",
        "dropout_rate",
    ],
    meta_fields=[],
)


def micro_batches(rows: Sequence[Row], budget: int, multiple: int, max_tokens: int) -> list[tuple[list[Row], Layout]]:
    """`rows` cut into consecutive runs, each with its `layout`, whose padded tokens B·T stay
    within `budget` (a run too large is halved until it fits; a row longer than the budget runs
    alone)."""
    done: list[tuple[list[Row], Layout]] = []
    pending = [list(rows)]
    while pending:
        run = pending.pop()
        plan = layout(run, multiple, max_tokens)
        if plan.padded_tokens <= budget or len(run) == 1:
            done.append((run, plan))
        else:
            half = len(run) // 2
            pending += [run[half:], run[:half]]
    return done


class Outputs:
    """Each request's per-datum results as its rows' micro-batches finish; a request is
    reported (with its loss, the sum over its data) as soon as its last row has run."""

    def __init__(self, data: list[int], report: Callable[[int, ForwardBackwardOutput], None]) -> None:
        self.data, self.remaining, self.report = data, list(data), report
        self.logprobs: dict[tuple[int, int], np.ndarray] = {}
        self.elementwise: dict[tuple[int, int], np.ndarray] = {}

    def add(self, rows: list[Row], plan: Layout, logprobs: np.ndarray, elementwise: np.ndarray) -> None:
        """Take the results of a batch of `rows` laid out by `plan`: logprobs, elementwise [B, T] (host arrays)."""
        for row, (j, start) in zip(rows, plan.places(rows), strict=True):
            key, span = (row.request, row.datum), slice(start, start + row.length)
            self.logprobs[key], self.elementwise[key] = logprobs[j, span], elementwise[j, span]
            self.remaining[row.request] -= 1
            if self.remaining[row.request] == 0:
                self._finish(row.request)

    def _finish(self, request: int) -> None:
        lps = tuple(self.logprobs.pop((request, d)) for d in range(self.data[request]))
        els = tuple(self.elementwise.pop((request, d)) for d in range(self.data[request]))
        loss = float(sum(e.astype(np.float64).sum() for e in els))
        self.report(
            request, ForwardBackwardOutput(loss=loss, logprobs=lps, elementwise_loss=els, metrics={"loss:sum": loss})
        )


def free_memory() -> int | None:
    """Bytes free on this process's first device (the devices of a mesh are alike), or None where
    the device keeps no memory statistics (CPU). With several processes, every process must call
    this together: they agree on the smallest figure (a collective)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    free = stats["bytes_limit"] - stats.get("bytes_in_use", 0) if "bytes_limit" in stats else -1
    if jax.process_count() > 1:
        free = int(np.min(multihost_utils.process_allgather(np.int64(free))))
    return None if free < 0 else free


def token_budget(spec: ModelSpec, data_parallel: int, free: int | None) -> int:
    """Tokens per forward_backward call that fit in half the `free` bytes of a device.

    Per token and device, the scanned, rematerialised decoder keeps each layer's input
    (L·D values of the residual stream, float32 whatever the weights' dtype) and one layer's
    recomputed activations (q, k, v, attention output, gate, up, hidden: about
    D + (H+2K)·E + 3·F values, counted as float32) plus their gradients. Devices without
    memory statistics (CPU, `free` None) get DEFAULT_TOKENS_PER_CALL.
    """
    if free is None:
        return DEFAULT_TOKENS_PER_CALL
    layer = spec.d_model + (spec.n_heads + 2 * spec.n_kv_heads) * spec.head_dim + 3 * spec.d_ff
    per_token = 2 * 4 * (spec.n_layers * spec.d_model + layer)
    fit = int(0.5 * free / per_token) * data_parallel
    return max(1024, 1 << (fit.bit_length() - 1))


def activation_budget(free: int | None) -> int:
    """Bytes of activations a forward_backward may keep per device for its backward pass, rather
    than recompute them: half the `free` bytes, or CPU_ACTIVATION_BYTES where there are no memory
    statistics (CPU)."""
    return CPU_ACTIVATION_BYTES if free is None else free // 2


def kept_activations(spec: ModelSpec, rows: int, length: int, data_parallel: int) -> int:
    """Bytes per device that a forward_backward of `rows` x `length` tokens keeps for its backward
    pass when nothing is recomputed, float32: per token and layer about 4·D + (2H+2K)·E + 3·F
    values (inputs of every norm, projection and nonlinearity) and H·length attention weights,
    and per token its 2·V logits and probabilities."""
    per_layer = (
        4 * spec.d_model + 2 * (spec.n_heads + spec.n_kv_heads) * spec.head_dim + 3 * spec.d_ff + spec.n_heads * length
    )
    per_token = spec.n_layers * per_layer + 2 * spec.vocab_size
    return 4 * per_token * rows * length // data_parallel


class DecodeRows(NamedTuple):
    """Every decode row's settings for one chunk of `compiled.decode` (a pytree of arrays)."""

    busy: jax.Array
    """[B] bool: the row generates a sample (free rows start done)."""
    temperature: jax.Array
    """[B] float32 (0: greedy)."""
    top_k: jax.Array
    """[B] int32 in 1..V."""
    top_p: jax.Array
    """[B] float32 in (0, 1]."""
    keys: jax.Array
    """[B] random keys: each row's request key."""
    sample_index: jax.Array
    """[B] int32 sample index within the request (folded into the key)."""
    generated: jax.Array
    """[B] int32 tokens the row generated before this chunk."""
    position: jax.Array
    """[B] int32 prompt length + generated - 1: where the row's last fed token sits in the cache."""
    slot: jax.Array
    """[B] int32 adapter slot."""
    limit: jax.Array
    """[B] int32 tokens the row may generate in all."""
    stop: jax.Array
    """[B, M] int32: the row's stop token ids, padded with -1."""
    wanted: jax.Array
    """[] int32: return once this many rows are done (B: only when all are)."""


class Decoded(NamedTuple):
    """What one chunk of `compiled.decode` produced, row by row."""

    tokens: jax.Array
    """[B, chunk] int32: row r's new tokens in tokens[r, :lengths[r]]."""
    logprobs: jax.Array
    """[B, chunk] float32: their S2 logprobs."""
    lengths: jax.Array
    """[B] int32 tokens each row generated in this chunk."""
    done: jax.Array
    """[B] bool: the row stopped (stop token id, or its limit), or was free."""
    logits: jax.Array
    """[B, V] float32: the next-token logits of the rows still running."""
