"""The simulator's latency and capacity cost model: how long a forward_backward, an optim_step
or a sample takes on a group of devices, and how much memory it needs.

Durations are seconds on the whole device group, from the FLOP and byte counts of
`bios.accounting` and the efficiencies of `profiles`. The formulas are written out in
docs/simulator.md ("Cost model"); each method names its line there.

Imports only the contract layer (`bios.accounting`, `bios.catalog`) and `profiles`: no jax, no engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bios.accounting import adapter_params, decode_bytes, lora_step_flops, matmul_params
from bios.catalog import ModelSpec
from emulator.simulator.profiles import Efficiency, Figure, Hardware

ALLOCATOR_HEADROOM = Figure(
    0.9,
    "assumption: about a tenth of device memory goes to the "
    "runtime, the allocator's fragmentation and workspace buffers",
)
"""Fraction of device memory that weights, activations and caches may fill."""

ADAM_BYTES_PER_PARAM = 7 * 4
"""Adam on fp32 adapter parameters reads param, grad, m, v and writes param, m, v: 7 fp32 values."""

ACTIVATION_BYTES_PER_TOKEN_PER_WIDTH = 34
"""Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models":
a layer stores 34·D bytes per token in 16-bit activations; flash attention drops the 5·H·T/D term."""


@dataclass(frozen=True, slots=True)
class DeviceGroup:
    """`devices` copies of `hardware` cooperating on every pass, at `efficiency`."""

    hardware: Hardware
    devices: int
    efficiency: Efficiency

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise ValueError(f"devices must be >= 1, got {self.devices}")

    @property
    def peak_flops(self) -> float:
        """Dense bf16 FLOP/s of the whole group."""
        return self.hardware.peak_flops.value * self.devices

    @property
    def hbm_bytes_per_s(self) -> float:
        """Memory bandwidth of the whole group, bytes/s."""
        return self.hardware.hbm_bytes_per_s.value * self.devices

    @property
    def memory_bytes(self) -> float:
        """Device memory of the whole group, bytes."""
        return self.hardware.memory_bytes.value * self.devices


class CostModel:
    """Durations (seconds) and memory (bytes) of Bios's requests for `model` on `group`.

    Assumes ideal scaling: the group's devices split every pass between them (data or tensor
    parallel) with no loss, so a pass takes the single-device time divided by `devices`;
    communication is not modelled. Base weights are `weight_bytes` each (2 = bf16); LoRA
    parameters and their Adam state are fp32. Module names that `model` has no linear layer for
    are ignored. Pure: no state besides its arguments.
    """

    def __init__(self, group: DeviceGroup, model: ModelSpec, weight_bytes: int = 2) -> None:
        self.group = group
        self.model = model
        self.weight_bytes = weight_bytes

    # -- training ---------------------------------------------------------------------------

    def _modules(self, modules: Sequence[str]) -> tuple[str, ...]:
        shapes = self.model.linear_shapes()
        return tuple(m for m in modules if m in shapes)

    def adapter_params(self, rank: int, modules: Sequence[str]) -> int:
        """LoRA parameters of `rank` on `modules` (every layer; lm_head once), as bios.accounting counts them."""
        return adapter_params(self.model, rank, self._modules(modules))

    def _weight_read_s(self) -> float:
        """Seconds to read every matmul weight once at decode_mbu (the roofline's memory side)."""
        bandwidth = self.group.hbm_bytes_per_s * self.group.efficiency.decode_mbu.value
        return matmul_params(self.model) * self.weight_bytes / bandwidth

    def _attention_forward_flops(self, length: float) -> float:
        """Causal QKᵀ and PV of one sequence of `length` tokens: 2·2·L·T·(T/2)·H·E."""
        spec = self.model
        return 4.0 * spec.n_layers * length * (length / 2) * spec.n_heads * spec.head_dim

    def forward_flops(self, lengths: Sequence[int], rank: int, modules: Sequence[str], backward: bool) -> float:
        """FLOPs of one pass over sequences of `lengths` tokens (docs/simulator.md, C1/C2).

        backward: Σᵢ lora_step_flops(spec, 1, Tᵢ, rank, modules); forward only: Σᵢ 2·W·Tᵢ + 2·P·Tᵢ
        + causal attention forward, with W = matmul parameters and P = adapter parameters.
        """
        mods = self._modules(modules)
        if backward:
            return float(sum(lora_step_flops(self.model, 1, t, rank, mods) for t in lengths))
        n, p = matmul_params(self.model), adapter_params(self.model, rank, mods)
        return float(sum(2.0 * n * t + 2.0 * p * t + self._attention_forward_flops(t) for t in lengths))

    def forward_backward_s(self, lengths: Sequence[int], rank: int, modules: tuple[str, ...], backward: bool) -> float:
        """Seconds of one forward (and, if `backward`, backward) pass over sequences of `lengths`
        tokens with LoRA `rank` on `modules` (C3): the roofline
        max(FLOPs / (peak·train_mfu), weight bytes / (bandwidth·decode_mbu)), since a small batch
        is bound by reading the base weights once. 0.0 when there are no tokens."""
        if sum(lengths) == 0:
            return 0.0
        flops = self.forward_flops(lengths, rank, modules, backward)
        return max(flops / (self.group.peak_flops * self.group.efficiency.train_mfu.value), self._weight_read_s())

    def optim_step_s(self, adapter_params: int) -> float:
        """Seconds of Adam on `adapter_params` fp32 parameters (C4): 7·4·P bytes at optimizer_mbu."""
        bandwidth = self.group.hbm_bytes_per_s * self.group.efficiency.optimizer_mbu.value
        return ADAM_BYTES_PER_PARAM * adapter_params / bandwidth

    def step_s(self, batch: int, length: int, rank: int, modules: Sequence[str]) -> float:
        """The projected training step: forward_backward on `batch` rows of `length` tokens, then
        optim_step on the adapter's parameters (C5)."""
        mods = tuple(modules)
        fb = self.forward_backward_s([length] * batch, rank, mods, backward=True)
        return fb + self.optim_step_s(self.adapter_params(rank, mods))

    # -- sampling ---------------------------------------------------------------------------

    def prefill_s(self, prompt_len: int) -> float:
        """Seconds to prefill one prompt of `prompt_len` tokens (C6): the roofline
        max((2·W·T + causal attention) / (peak·prefill_mfu), weight bytes / (bandwidth·decode_mbu))."""
        if prompt_len <= 0:
            return 0.0
        flops = 2.0 * matmul_params(self.model) * prompt_len + self._attention_forward_flops(prompt_len)
        return max(flops / (self.group.peak_flops * self.group.efficiency.prefill_mfu.value), self._weight_read_s())

    def decode_step_s(self, batch_rows: int, context: float) -> float:
        """Seconds of one decode step for `batch_rows` rows at `context` cached positions (C7): the
        roofline max(decode_bytes / (bandwidth·decode_mbu), 2·W·rows / (peak·prefill_mfu))."""
        eff = self.group.efficiency
        read = decode_bytes(self.model, batch_rows, context, self.weight_bytes)  # type: ignore[arg-type]  # mean context
        memory = read / (self.group.hbm_bytes_per_s * eff.decode_mbu.value)
        compute = 2.0 * matmul_params(self.model) * batch_rows / (self.group.peak_flops * eff.prefill_mfu.value)
        return max(memory, compute)

    def sample_s(self, prompt_len: int, rows: int, new_tokens: int, batch_rows: int | None = None) -> float:
        """Seconds to sample `rows` continuations of `new_tokens` tokens from one prompt of
        `prompt_len` tokens (C8): one prefill, then `new_tokens` decode steps of `batch_rows` rows
        (default `rows`; larger when the step is shared with other requests) at the mean context
        prompt_len + new_tokens/2."""
        rows_in_step = rows if batch_rows is None else batch_rows
        if new_tokens <= 0 or rows_in_step <= 0:
            return self.prefill_s(prompt_len)
        context = prompt_len + new_tokens / 2
        return self.prefill_s(prompt_len) + new_tokens * self.decode_step_s(rows_in_step, context)

    # -- memory -----------------------------------------------------------------------------

    @property
    def weights_bytes(self) -> float:
        """Bytes of the base model's weights: n_params · weight_bytes."""
        return float(self.model.n_params * self.weight_bytes)

    @property
    def free_memory_bytes(self) -> float:
        """Bytes left for activations and KV caches: memory · ALLOCATOR_HEADROOM − weights (M3).
        Negative when the weights alone do not fit."""
        return self.group.memory_bytes * ALLOCATOR_HEADROOM.value - self.weights_bytes

    def training_memory_bytes(self, lengths: Sequence[int]) -> float:
        """Activation bytes of one forward_backward over sequences of `lengths` tokens (M1):
        34·D bytes per token per layer × L layers × Σ lengths."""
        spec = self.model
        return float(ACTIVATION_BYTES_PER_TOKEN_PER_WIDTH * spec.d_model * spec.n_layers * sum(lengths))

    def sample_memory_bytes(self, prompt_len: int, rows: int, max_tokens: int) -> float:
        """KV-cache bytes of `rows` rows of up to prompt_len + max_tokens positions (M2):
        2·L·K·E·weight_bytes per position."""
        spec = self.model
        per_position = 2 * spec.n_layers * spec.n_kv_heads * spec.head_dim * self.weight_bytes
        return float(per_position * (prompt_len + max_tokens) * rows)

    def describe(self) -> str:
        """One line: "Llama-3.1-8B on 8×H100 (train MFU 0.54, decode MBU 0.60)"."""
        eff = self.group.efficiency
        name = self.model.name.rstrip("/").rsplit("/", 1)[-1]
        return (
            f"{name} on {self.group.devices}×{self.group.hardware.name} "
            f"(train MFU {eff.train_mfu.value:.2f}, decode MBU {eff.decode_mbu.value:.2f})"
        )
