"""`JaxBackend`: the Backend protocol on JAX — sharded base weights stored once, many LoRA
sessions side by side in slots, one compiled program per bucketed shape.

Requests of many sessions on one base model share one device call: their rows are sorted by
adapter slot, and the call reads and writes only the slots it uses, at their adapters' rank
(`SlotTable.active`), each row running with its own adapter (ops.py `per_row`).
"""

from __future__ import annotations

import functools
import struct
import zlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from backends.jax import compiled, optimizer, sampler
from backends.jax.batch import (
    Batch,
    Layout,
    Outputs,
    Row,
    activation_budget,
    free_memory,
    kept_activations,
    micro_batches,
    token_budget,
)
from backends.jax.compiled import host_all
from backends.jax.sharding import make_mesh, rows_multiple
from backends.jax.slots import Active, SlotTable
from backends.jax.weights import load_base
from bios.backend import (
    AdapterSpec,
    AdapterState,
    BackendConfig,
    ForwardBackwardOutput,
    ForwardBackwardWork,
    OptimStepOutput,
    OptimStepWork,
    ResultCallback,
    SampleOutput,
    SampleWork,
    TrainStepOutput,
)
from bios.catalog import ModelSpec
from bios.errors import BiosError, InvalidRequestError, NotFoundError
from bios.tokenizer import Tokenizer
from bios.weights import init_lora_weights

DEFAULT_SLOTS = 4
Output = TypeVar("Output")


@dataclass
class _Served:
    """One base model on the devices: its frozen weights and its adapter slots."""

    spec: ModelSpec
    base: dict[str, jax.Array]
    slots: SlotTable
    tokens_per_call: int
    """Micro-batch budget: padded rows x tokens per compiled call."""
    activation_budget: int
    """Bytes of activations per device a forward_backward may keep rather than recompute."""
    tokenizer: Tokenizer | None = None


class JaxBackend:
    """The Backend protocol on JAX. Options (`BackendConfig.options`, all strings, all optional):

    - `dtype`: float32 | bfloat16 (default float32 on CPU, bfloat16 elsewhere): the dtype of the
      base weights, of the inputs of the matmuls against them and of the KV cache; the residual
      stream, norms, softmaxes, logits and all LoRA and optimizer state stay float32 (ops.py).
    - `devices`: how many of `jax.devices()` to use (default all).
    - `model_parallel`: devices per tensor-parallel group (default 1).
    - `slots`: initial adapter capacity per base model (default 4; doubles when full).
    - `tokens_per_call`: micro-batch budget in tokens (default: derived from the devices' free
      memory once a model is loaded).
    - `decode_rows`: rows of the continuous-batching decode pool (default 64).
    - `weights_init`: "weights" (the seed or the model's files, default) or "device" (random
      weights drawn on the devices, for benchmarking large configurations).
    - `compilation_cache_dir`: a directory for JAX's persistent compilation cache; every
      program is stored there, however quick to compile (`jax_persistent_cache_min_compile_time_secs`
      = 0), so a later process skips compiling. This sets JAX's process-wide configuration.
      Without it the backend leaves JAX's configuration alone: JAX itself then still honours
      its JAX_COMPILATION_CACHE_DIR variable, for programs slower than a second to compile.
    - `coordinator`, `num_processes`, `process_id`, `distributed`: serve from several processes
      (backends/jax/multihost.py; read by the entry point, not by this class).

    The backend never reads the environment.
    """

    name = "jax"
    checkpoint_format = "orbax"

    def __init__(self, config: BackendConfig) -> None:
        options = config.options
        if options.get("compilation_cache_dir"):
            compiled.use_persistent_cache(options["compilation_cache_dir"])
        self.catalog = config.catalog
        devices = jax.devices()[: int(options.get("devices", len(jax.devices())))]
        self.mesh = make_mesh(int(options.get("model_parallel", 1)), devices)
        platform = jax.devices()[0].platform
        self.dtype = jnp.dtype(options.get("dtype", "float32" if platform == "cpu" else "bfloat16"))
        self.initial_slots = int(options.get("slots", DEFAULT_SLOTS))
        self.tokens_per_call = int(options["tokens_per_call"]) if "tokens_per_call" in options else None
        self.weights_init = options.get("weights_init", "weights")
        self.decode_rows = int(options.get("decode_rows", sampler.MAX_ROWS))
        self._served: dict[str, _Served] = {}
        self._owner: dict[str, str] = {}

    # ---- models and adapters -----------------------------------------------------------------

    def _model(self, name: str) -> _Served:
        if name not in self._served:
            spec = self.catalog.get(name)
            base = load_base(spec, self.mesh, self.dtype, self.weights_init)
            slots = SlotTable(spec, self.mesh, self.initial_slots, spec.max_lora_rank)
            free = free_memory()
            budget = self.tokens_per_call or token_budget(spec, self.mesh.shape["data"], free)
            self._served[name] = _Served(spec, base, slots, budget, activation_budget(free))
        return self._served[name]

    def create_adapter(self, spec: AdapterSpec, state: AdapterState | None = None) -> None:
        served = self._model(spec.base_model)
        if spec.rank > served.slots.rank:
            raise InvalidRequestError(
                f"rank {spec.rank} exceeds {served.slots.rank} for {spec.base_model}", field="rank"
            )
        if state is None:
            weights, moments, step = init_lora_weights(served.spec, spec.target_modules, spec.rank, spec.seed), None, 0
        else:
            weights, step = state.weights, state.step
            moments = (state.adam_m, state.adam_v) if state.adam_m else None
        served.slots.add(spec, weights, moments, step)
        self._owner[spec.adapter_id] = spec.base_model

    def delete_adapter(self, adapter_id: str) -> None:
        base_model = self._owner.pop(adapter_id, None)
        if base_model is not None:
            self._served[base_model].slots.remove(adapter_id)

    def export_state(self, adapter_id: str) -> AdapterState:
        if adapter_id not in self._owner:
            raise NotFoundError(f"adapter {adapter_id!r} does not exist", field="adapter_id")
        return self._served[self._owner[adapter_id]].slots.export(adapter_id)

    def _slot(self, adapter_id: str | None, base_model: str) -> int:
        """The slot of `adapter_id` on `base_model` (0 for the bare model); typed errors otherwise."""
        if adapter_id is None:
            return 0
        if adapter_id not in self._owner:
            raise NotFoundError(f"adapter {adapter_id!r} does not exist", field="adapter_id")
        if self._owner[adapter_id] != base_model:
            raise InvalidRequestError(
                f"adapter {adapter_id!r} belongs to {self._owner[adapter_id]}, not {base_model}", field="base_model"
            )
        return self._served[base_model].slots.slot(adapter_id)

    # ---- forward / backward ------------------------------------------------------------------

    def forward_backward(
        self, work: Sequence[ForwardBackwardWork], on_result: ResultCallback | None = None
    ) -> list[ForwardBackwardOutput | BiosError]:
        report: _Reporter[ForwardBackwardOutput] = _Reporter(len(work), on_result)
        groups: dict[tuple[str, str, bool], list[tuple[int, int]]] = defaultdict(list)
        for index, item in enumerate(work):
            try:
                if item.backward and item.adapter_id is None:
                    raise InvalidRequestError(
                        "forward_backward needs an adapter; the bare base model has no gradient", field="adapter_id"
                    )
                self._model(item.base_model)
                groups[(item.base_model, item.loss_fn, item.backward)].append(
                    (index, self._slot(item.adapter_id, item.base_model))
                )
            except BiosError as error:
                report(index, error)
        for (base_model, loss_fn, backward), members in groups.items():
            self._run_losses(
                self._served[base_model],
                loss_fn,
                backward,
                [(work[i], slot) for i, slot in members],
                report.part([i for i, _ in members]),
            )
        return report.results()

    def _run_losses(
        self,
        served: _Served,
        loss_fn: str,
        backward: bool,
        items: list[tuple[ForwardBackwardWork, int]],
        report: Callable[[int, ForwardBackwardOutput], None],
    ) -> None:
        """Run `items` (work, slot) in token-budgeted micro-batches; report each once all its rows ran."""
        outputs = Outputs([len(work.tokens) for work, _ in items], report)
        for chunk, plan in self._micro_batches(served, items, backward):
            active = served.slots.active(row.slot for row in chunk)
            batch = Batch.pack(chunk, plan, loss_fn, self.mesh, active.index)
            slots, lora = jnp.asarray(active.slots), served.slots.lora
            if backward:
                served.slots.accumulator, lp, el = compiled.forward_backward(
                    served.spec,
                    served.base,
                    lora,
                    served.slots.accumulator,
                    slots,
                    batch,
                    loss_fn,
                    active.rank,
                    remat=self._remat(served, batch),
                )
            else:
                lp, el = compiled.forward(served.spec, served.base, lora, slots, batch, loss_fn, active.rank)
            outputs.add(chunk, plan, *host_all(lp, el))

    def _micro_batches(
        self, served: _Served, items: Sequence[tuple[ForwardBackwardWork, int]], backward: bool
    ) -> list[tuple[list[Row], Layout]]:
        """The rows of `items` (work, slot), sorted by slot, cut into token-budgeted micro-batches."""
        rows = sorted(
            (
                self._row(served, work, slot, i, d, backward)
                for i, (work, slot) in enumerate(items)
                for d in range(len(work.tokens))
            ),
            key=lambda row: row.slot,
        )
        return micro_batches(rows, served.tokens_per_call, rows_multiple(self.mesh), served.spec.max_seq_len)

    def _remat(self, served: _Served, batch: Batch) -> bool:
        """Whether a gradient of `batch` recomputes activations instead of keeping them."""
        n_rows, length = batch.tokens.shape
        return kept_activations(served.spec, n_rows, length, self.mesh.shape["data"]) > served.activation_budget

    @staticmethod
    def _row(served: _Served, work: ForwardBackwardWork, slot: int, request: int, datum: int, backward: bool) -> Row:
        """Datum `datum` of `work` as a batch row. With `backward`, a row of an adapter with a
        dropout rate gets that rate and a mask seed from (adapter seed, step, datum)."""
        rate, seed = 0.0, 0
        if backward and work.adapter_id is not None:
            spec = served.slots.adapters[work.adapter_id][1]
            rate = spec.dropout
            seed = zlib.crc32(struct.pack("<qqq", spec.seed, served.slots.steps[work.adapter_id], datum))
        return Row(slot, request, datum, work.tokens[datum], work.inputs[datum], work.loss_config, rate, seed)

    # ---- optimizer -----------------------------------------------------------------------------

    def optim_step(
        self, work: Sequence[OptimStepWork], on_result: ResultCallback | None = None
    ) -> list[OptimStepOutput | BiosError]:
        report: _Reporter[OptimStepOutput] = _Reporter(len(work), on_result)
        pending: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for index, item in enumerate(work):
            if item.adapter_id not in self._owner:
                report(index, NotFoundError(f"adapter {item.adapter_id!r} does not exist", field="adapter_id"))
                continue
            base_model = self._owner[item.adapter_id]
            pending[base_model].append((index, self._served[base_model].slots.slot(item.adapter_id)))
        for base_model, members in pending.items():
            slots = self._served[base_model].slots
            while members:  # one call per round of distinct slots
                round_: list[tuple[int, int]] = []
                rest: list[tuple[int, int]] = []
                seen: set[int] = set()
                for index, slot in members:
                    (rest if slot in seen else round_).append((index, slot))
                    seen.add(slot)
                members = rest
                self._optim_round(slots, [(work[i], i, slot) for i, slot in round_], report)
        return report.results()

    def _optim_round(
        self,
        slots: SlotTable,
        round_: list[tuple[OptimStepWork, int, int]],
        report: Callable[[int, OptimStepOutput], None],
    ) -> None:
        active = slots.active(slot for _, _, slot in round_)
        slots.lora, slots.opt_state, slots.accumulator, grad_norms, counts = compiled.optim_step(
            slots.lora,
            slots.opt_state,
            slots.accumulator,
            _hyperparameters(active, [(item, slot) for item, _, slot in round_]),
            jnp.asarray(active.slots),
            active.rank,
        )
        norms, steps = host_all(grad_norms, counts)
        _report_steps(slots, active, round_, norms, steps, report)

    # ---- fused training step -------------------------------------------------------------------

    def train_step(self, work: Sequence[tuple[ForwardBackwardWork, OptimStepWork]]) -> list[TrainStepOutput]:
        """bios.backend FusedTraining: as one program (`compiled.train_step`) when every pair is a
        valid backward pass of one loss whose rows fit one micro-batch; otherwise forward_backward,
        then optim_step for the pairs whose forward_backward succeeded."""
        fused = self._fusable(work)
        if fused is None:
            outputs = self.forward_backward([forward for forward, _ in work])
            succeeded = [i for i, output in enumerate(outputs) if not isinstance(output, BiosError)]
            stepped = dict(zip(succeeded, self.optim_step([work[i][1] for i in succeeded]), strict=True))
            return [(output, stepped.get(i)) for i, output in enumerate(outputs)]
        served, items, (chunk, plan) = fused
        slots = served.slots
        active = slots.active(slot for _, slot in items)
        batch = Batch.pack(chunk, plan, work[0][0].loss_fn, self.mesh, active.index)
        slots.lora, slots.opt_state, slots.accumulator, lp, el, grad_norms, counts = compiled.train_step(
            served.spec,
            served.base,
            slots.lora,
            slots.opt_state,
            slots.accumulator,
            jnp.asarray(active.slots),
            batch,
            _hyperparameters(active, [(step, slot) for (_, step), (_, slot) in zip(work, items, strict=True)]),
            work[0][0].loss_fn,
            active.rank,
            remat=self._remat(served, batch),
        )
        logprobs, elementwise, norms, counted = host_all(lp, el, grad_norms, counts)
        forwards: dict[int, ForwardBackwardOutput] = {}
        Outputs([len(forward.tokens) for forward, _ in items], forwards.__setitem__).add(
            chunk, plan, logprobs, elementwise
        )
        steps: dict[int, OptimStepOutput] = {}
        round_ = [(step, i, slot) for i, ((_, step), (_, slot)) in enumerate(zip(work, items, strict=True))]
        _report_steps(slots, active, round_, norms, counted, steps.__setitem__)
        return [(forwards[i], steps[i]) for i in range(len(work))]

    def _fusable(
        self, work: Sequence[tuple[ForwardBackwardWork, OptimStepWork]]
    ) -> tuple[_Served, list[tuple[ForwardBackwardWork, int]], tuple[list[Row], Layout]] | None:
        """(the model, each forward_backward with its slot, the one micro-batch of their rows) when
        `work` can run as one program; None otherwise."""
        forwards = [forward for forward, _ in work]
        first = forwards[0]
        if any(f.base_model != first.base_model or f.loss_fn != first.loss_fn or not f.backward for f in forwards):
            return None
        if any(f.adapter_id is None or f.adapter_id != step.adapter_id for f, step in work):
            return None
        try:
            served = self._model(first.base_model)
            items = [(f, self._slot(f.adapter_id, f.base_model)) for f in forwards]
        except BiosError:
            return None
        batches = self._micro_batches(served, items, backward=True)
        return (served, items, batches[0]) if len(batches) == 1 else None

    # ---- sampling ------------------------------------------------------------------------------

    def sample(
        self, work: Sequence[SampleWork], on_result: ResultCallback | None = None
    ) -> list[SampleOutput | BiosError]:
        report: _Reporter[SampleOutput] = _Reporter(len(work), on_result)
        groups: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for index, item in enumerate(work):
            try:
                self._model(item.base_model)
                groups[item.base_model].append((index, self._slot(item.adapter_id, item.base_model)))
            except BiosError as error:
                report(index, error)
        for base_model, members in groups.items():
            served = self._served[base_model]
            active = served.slots.active(slot for _, slot in members)
            sampler.sample(
                served.spec,
                served.base,
                compiled.compact(served.slots.lora, jnp.asarray(active.slots), active.rank),
                [(work[i], active.index[slot]) for i, slot in members],
                functools.partial(self._tokenizer, served),
                self.dtype,
                report.part([i for i, _ in members]),
                self.decode_rows,
            )
        return report.results()

    def _tokenizer(self, served: _Served) -> Tokenizer:
        if served.tokenizer is None:
            served.tokenizer = served.spec.tokenizer()
        return served.tokenizer

    def close(self) -> None:
        self._served.clear()
        self._owner.clear()

    # ---- read-only views (tests, benchmarks) ---------------------------------------------------

    def describe(self, base_model: str) -> ServedModel:
        """What a loaded base model holds; NotFoundError if it is not loaded."""
        if base_model not in self._served:
            raise NotFoundError(f"base model {base_model!r} is not loaded", field="base_model")
        served = self._served[base_model]
        adapters = tuple(sorted(served.slots.adapters))
        return ServedModel(served.tokens_per_call, served.slots.capacity, served.slots.rank, adapters)

    def lora_arrays(self, adapter_id: str) -> dict[str, np.ndarray]:
        """Host copies of the adapter's LoRA factors exactly as served: every module, padded to the
        model's maximum rank R (`lora.<module>.a` [L, in, R], `lora.lm_head.b` [R, V], ...)."""
        if adapter_id not in self._owner:
            raise NotFoundError(f"adapter {adapter_id!r} does not exist", field="adapter_id")
        return self._served[self._owner[adapter_id]].slots.arrays(adapter_id)


@dataclass(frozen=True, slots=True)
class ServedModel:
    """A loaded base model, as `JaxBackend.describe` reports it."""

    tokens_per_call: int
    """Micro-batch budget: padded rows x tokens per compiled call."""
    slot_capacity: int
    """Adapter slots S allocated (slot 0 is the bare model's)."""
    rank: int
    """Largest LoRA rank R a slot holds."""
    adapters: tuple[str, ...]
    """Ids of the adapters it serves, sorted."""


def _hyperparameters(active: Active, members: list[tuple[OptimStepWork, int]]) -> dict[str, jax.Array]:
    """Each place of `active.slots`' Adam hyperparameters [A] (optimizer.HYPERPARAMETERS), from the
    (work, slot) `members` stepped; a padding place repeats the last slot's."""
    hyper = {name: np.zeros(len(active.slots), np.float32) for name in optimizer.HYPERPARAMETERS}
    for item, slot in sorted(members, key=lambda member: member[1]):  # the padding repeats the last
        for name in hyper:
            hyper[name][active.index[slot] :] = getattr(item, name)
    return jax.device_put(hyper)


def _report_steps(
    slots: SlotTable,
    active: Active,
    round_: list[tuple[OptimStepWork, int, int]],
    norms: np.ndarray,
    steps: np.ndarray,
    report: Callable[[int, OptimStepOutput], None],
) -> None:
    """Record and report the step of every (work, index, slot) of `round_`, given the grad norms
    and step counts [A] of `active`'s places."""
    for item, index, slot in round_:
        place = active.index[slot]
        slots.steps[item.adapter_id] = int(steps[place])
        report(index, OptimStepOutput(step=int(steps[place]), grad_norm=float(norms[place])))


class _Reporter(Generic[Output]):
    """Stores each item's result at its index and passes it on to the caller's `on_result`."""

    def __init__(self, count: int, on_result: ResultCallback | None) -> None:
        self._results: list[Output | BiosError | None] = [None] * count
        self._on_result = on_result

    def __call__(self, index: int, output: Output | BiosError) -> None:
        self._results[index] = output
        if self._on_result is not None:
            self._on_result(index, output)

    def part(self, indices: Sequence[int]) -> Callable[[int, Output], None]:
        """A reporter for the items at `indices`, which it numbers 0, 1, ..."""

        def report(local: int, output: Output) -> None:
            self(indices[local], output)

        return report

    def results(self) -> list[Output | BiosError]:
        """Every item's result, in order; RuntimeError if one was never reported (a bug)."""
        done = [result for result in self._results if result is not None]
        if len(done) != len(self._results):
            raise RuntimeError("a work item was left without a result")
        return done
