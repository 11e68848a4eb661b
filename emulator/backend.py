"""`EmulatorBackend`: the `bios.backend.Backend` protocol on the NumPy reference model.

Owns the adapters' state — float64 LoRA weights, gradient accumulators (L8), Adam moments
and step — and the float64 base weights, loaded lazily once per base model. Each work item
is validated and computed before any state changes, so a failing item (returned as its
`BiosError`) leaves every adapter untouched. The arithmetic lives in `emulator.model`,
`emulator.losses`, `emulator.optim` and `emulator.sampler`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

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
)
from bios.catalog import ModelSpec
from bios.errors import BiosError, ConflictError, InvalidRequestError, NotFoundError
from bios.weights import dropout_scale, init_lora_weights, load_base_weights, lora_shapes
from emulator.decode import KVCache, extend
from emulator.losses import LOSSES, elementwise_loss
from emulator.model import Lora, backward, forward, token_logprobs, token_logprobs_backward, top_logprobs
from emulator.optim import adam_step
from emulator.sampler import generate

Tensors = dict[str, np.ndarray]


@dataclass(slots=True)
class _Adapter:
    """One adapter's mutable state; every tensor dict is keyed like `bios.weights.lora_shapes`."""

    spec: AdapterSpec
    weights: Tensors
    grads: Tensors
    adam_m: Tensors
    adam_v: Tensors
    step: int


def _float64_copy(tensors: Tensors) -> Tensors:
    return {name: np.array(value, dtype=np.float64) for name, value in tensors.items()}


def _zeros_like(tensors: Tensors) -> Tensors:
    return {name: np.zeros_like(value) for name, value in tensors.items()}


def _check_tensors(what: str, given: Tensors, shapes: dict[str, tuple[int, int]]) -> None:
    """InvalidRequestError (field `state.WHAT`) unless `given` has exactly the adapter's names and shapes."""
    actual = {name: tuple(np.shape(value)) for name, value in given.items()}
    if actual != shapes:
        wrong = sorted(set(actual.items()) ^ set(shapes.items()))[:3]
        raise InvalidRequestError(
            f"state.{what} does not match the adapter's LoRA shapes (first differences: {wrong})", field=f"state.{what}"
        )


class EmulatorBackend:
    """The reference backend: float64 NumPy, one datum at a time, formulas of docs/losses.md.

    `tokenizer_for(model_spec)` gives the object whose `decode` checks stop strings; it
    defaults to `ModelSpec.tokenizer` and is called at most once per base model.
    """

    name = "emulator"

    def __init__(self, config: BackendConfig, tokenizer_for: Callable[[ModelSpec], Any] | None = None) -> None:
        self._catalog = config.catalog
        self._tokenizer_for = tokenizer_for or ModelSpec.tokenizer
        self._base: dict[ModelSpec, Tensors] = {}
        self._tokenizers: dict[ModelSpec, Any] = {}
        self._adapters: dict[str, _Adapter] = {}

    # --- what tests may read ---------------------------------------------------------------

    def base_weights(self, base_model: str) -> Tensors:
        """The float64 base weights the emulator runs `base_model` with (shared: do not modify)."""
        return self._model(base_model)[1]

    def adapter_ids(self) -> list[str]:
        """The adapters that exist now."""
        return sorted(self._adapters)

    def pending_gradient(self, adapter_id: str) -> Tensors:
        """A copy of the gradient accumulated for `adapter_id` since its last optim_step."""
        return {name: grad.copy() for name, grad in self._adapter(adapter_id).grads.items()}

    # --- lookups -------------------------------------------------------------------------

    def _model(self, base_model: str) -> tuple[ModelSpec, Tensors]:
        """The spec and float64 base weights of `base_model` (NotFoundError if not in the catalog)."""
        spec = self._catalog.get(base_model)
        if spec not in self._base:
            self._base[spec] = _float64_copy(load_base_weights(spec))
        return spec, self._base[spec]

    def _adapter(self, adapter_id: str, base_model: str | None = None) -> _Adapter:
        """Adapter `adapter_id`; NotFoundError if unknown, InvalidRequestError if on another base model."""
        adapter = self._adapters.get(adapter_id)
        if adapter is None:
            raise NotFoundError(f"adapter_id: unknown adapter {adapter_id!r}", field="adapter_id")
        if base_model is not None and adapter.spec.base_model != base_model:
            raise InvalidRequestError(
                f"base_model: adapter {adapter_id!r} belongs to {adapter.spec.base_model!r}, not {base_model!r}",
                field="base_model",
            )
        return adapter

    def _decode(self, model: ModelSpec) -> Callable[[Sequence[int]], str]:
        """Decode with `model`'s tokenizer, loaded on first use and cached."""

        def decode(tokens: Sequence[int]) -> str:
            if model not in self._tokenizers:
                self._tokenizers[model] = self._tokenizer_for(model)
            return self._tokenizers[model].decode(list(tokens))

        return decode

    # --- adapters ------------------------------------------------------------------------

    def create_adapter(self, spec: AdapterSpec, state: AdapterState | None = None) -> None:
        """A fresh adapter (M1: A uniform from `spec.seed`, B zero) or one resumed from `state`
        (weights, moments and step copied as float64; missing moments start at zero)."""
        if spec.adapter_id in self._adapters:
            raise ConflictError(f"adapter_id: adapter {spec.adapter_id!r} already exists", field="adapter_id")
        model = self._catalog.get(spec.base_model)
        unknown = sorted(set(spec.target_modules) - set(model.linear_shapes()))
        if unknown:
            raise InvalidRequestError(f"target_modules: unknown modules {unknown}", field="target_modules")
        shapes = lora_shapes(model, spec.target_modules, spec.rank)
        if state is None:
            weights, step = _float64_copy(init_lora_weights(model, spec.target_modules, spec.rank, spec.seed)), 0
            adam_m, adam_v = _zeros_like(weights), _zeros_like(weights)
        else:
            _check_tensors("weights", state.weights, shapes)
            for what, moments in (("adam_m", state.adam_m), ("adam_v", state.adam_v)):
                if moments:
                    _check_tensors(what, moments, shapes)
            weights, step = _float64_copy(state.weights), state.step
            adam_m = _float64_copy(state.adam_m) if state.adam_m else _zeros_like(weights)
            adam_v = _float64_copy(state.adam_v) if state.adam_v else _zeros_like(weights)
        self._adapters[spec.adapter_id] = _Adapter(spec, weights, _zeros_like(weights), adam_m, adam_v, step)

    def delete_adapter(self, adapter_id: str) -> None:
        self._adapters.pop(adapter_id, None)

    def export_state(self, adapter_id: str) -> AdapterState:
        """Copies of the weights, Adam moments (float64) and step; the pending gradient is not included."""
        adapter = self._adapter(adapter_id)
        return AdapterState(
            adapter.spec,
            adapter.step,
            _float64_copy(adapter.weights),
            _float64_copy(adapter.adam_m),
            _float64_copy(adapter.adam_v),
        )

    # --- training ------------------------------------------------------------------------

    def forward_backward(
        self, work: Sequence[ForwardBackwardWork], on_result: ResultCallback | None = None
    ) -> list[ForwardBackwardOutput | BiosError]:
        return _each(work, self._forward_backward, on_result)

    def _dropout(self, adapter: _Adapter, datum: int) -> Callable[[str, tuple[int, ...]], np.ndarray]:
        """M1 dropout masks of datum `datum` at the adapter's current step, per module path and input shape."""
        spec = adapter.spec
        return lambda path, shape: dropout_scale(spec.seed, adapter.step, datum, path, shape, spec.dropout).astype(
            np.float64
        )

    def _forward_backward(self, item: ForwardBackwardWork) -> ForwardBackwardOutput:
        """L0–L6 for every datum of `item`, then (if `item.backward`) L8: one addition to the accumulator."""
        model, base = self._model(item.base_model)
        adapter = None if item.adapter_id is None else self._adapter(item.adapter_id, item.base_model)
        if item.loss_fn not in LOSSES:
            raise InvalidRequestError(f"loss_fn: unknown loss {item.loss_fn!r}", field="loss_fn")
        if item.backward and adapter is None:
            raise InvalidRequestError("adapter_id: the bare base model has no trainable weights", field="adapter_id")
        train_dropout = item.backward and adapter is not None and adapter.spec.dropout > 0
        grads = None if adapter is None or not item.backward else _zeros_like(adapter.weights)
        logprobs, losses = [], []
        shared: dict[bytes, np.ndarray] = {}  # without a backward pass, data with the same tokens share one forward
        for datum, (tokens, inputs) in enumerate(zip(item.tokens, item.inputs)):
            lora = None
            if adapter is not None:
                dropout = self._dropout(adapter, datum) if train_dropout else None
                lora = Lora(adapter.weights, adapter.spec.scale, dropout)
            if grads is not None:
                logits, cache = forward(model, base, lora, tokens)
            else:
                key = np.asarray(tokens, dtype=np.int64).tobytes()
                if key not in shared:
                    shared[key], _ = forward(model, base, lora, tokens)
                logits = shared[key]
            targets = np.asarray(inputs["target_tokens"], dtype=np.int64)
            lp = token_logprobs(logits, targets)
            loss, d_lp = elementwise_loss(item.loss_fn, lp, inputs, item.loss_config)
            logprobs.append(lp)
            losses.append(loss)
            if grads is not None:
                for name, grad in backward(model, base, cache, token_logprobs_backward(logits, targets, d_lp)).items():
                    grads[name] += grad
        if grads is not None and adapter is not None:
            for name, grad in grads.items():
                adapter.grads[name] += grad
        total = float(sum(np.sum(loss) for loss in losses))
        return ForwardBackwardOutput(total, tuple(logprobs), tuple(losses), {"loss:sum": total})

    def optim_step(
        self, work: Sequence[OptimStepWork], on_result: ResultCallback | None = None
    ) -> list[OptimStepOutput | BiosError]:
        return _each(work, self._optim_step, on_result)

    def _optim_step(self, item: OptimStepWork) -> OptimStepOutput:
        """O1–O5 on the accumulated gradient, then the accumulator is zeroed (L8) and step += 1."""
        adapter = self._adapter(item.adapter_id)
        step = adapter.step + 1
        weights, adam_m, adam_v, norm = adam_step(
            adapter.weights,
            adapter.grads,
            adapter.adam_m,
            adapter.adam_v,
            step,
            learning_rate=item.learning_rate,
            beta1=item.beta1,
            beta2=item.beta2,
            eps=item.eps,
            weight_decay=item.weight_decay,
            grad_clip_norm=item.grad_clip_norm,
        )
        adapter.weights, adapter.adam_m, adapter.adam_v = weights, adam_m, adam_v
        adapter.grads, adapter.step = _zeros_like(weights), step
        return OptimStepOutput(step, norm)

    # --- sampling ------------------------------------------------------------------------

    def sample(
        self, work: Sequence[SampleWork], on_result: ResultCallback | None = None
    ) -> list[SampleOutput | BiosError]:
        return _each(work, self._sample, on_result)

    def _sample(self, item: SampleWork) -> SampleOutput:
        """S1–S3 for each of `item.num_samples` completions; sample j draws from `default_rng([seed, j])`."""
        model, base = self._model(item.base_model)
        adapter = None if item.adapter_id is None else self._adapter(item.adapter_id, item.base_model)
        lora = None if adapter is None else Lora(adapter.weights, adapter.spec.scale)
        prompt = np.asarray(item.prompt, dtype=np.int64)
        logits, prefix = extend(model, base, lora, prompt, KVCache.empty(model))
        prompt_logprobs = topk = None
        if item.prompt_logprobs:
            prompt_logprobs = np.concatenate([[np.nan], token_logprobs(logits[:-1], prompt[1:])])
        if item.topk_prompt_logprobs:
            topk = top_logprobs(logits[:-1], item.topk_prompt_logprobs)

        def stepper() -> Callable[[int], np.ndarray]:
            cache = prefix

            def step(token: int) -> np.ndarray:
                nonlocal cache
                step_logits, cache = extend(model, base, lora, np.array([token]), cache)
                return step_logits[0]

            return step

        sequences = tuple(
            generate(
                stepper(),
                logits[-1],
                len(prompt),
                max_tokens=item.max_tokens,
                max_seq_len=model.max_seq_len,
                temperature=item.temperature,
                top_k=item.top_k,
                top_p=item.top_p,
                stop_token_ids=item.stop_token_ids,
                stop_strings=item.stop_strings,
                decode=self._decode(model),
                rng=np.random.default_rng() if item.seed is None else np.random.default_rng([item.seed, j]),
            )
            for j in range(item.num_samples)
        )
        return SampleOutput(sequences, prompt_logprobs, topk)

    def close(self) -> None:
        """Drop every adapter, cached base weight and tokenizer."""
        self._adapters.clear()
        self._base.clear()
        self._tokenizers.clear()


def _each(work: Sequence[Any], run: Callable[[Any], Any], on_result: ResultCallback | None) -> list[Any]:
    """`run` on every item, reporting each to `on_result` as it completes; an item's `BiosError`
    becomes its result and does not stop the others."""
    results = []
    for index, item in enumerate(work):
        try:
            results.append(run(item))
        except BiosError as error:
            results.append(error)
        if on_result is not None:
            on_result(index, results[-1])
    return results
