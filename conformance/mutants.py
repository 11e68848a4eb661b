"""Planted faults: the reference backend with exactly one rule of docs/losses.md broken.

Each mutant is a subclass of `emulator.backend.EmulatorBackend` that changes one thing, the
kind of mistake a real backend makes (a mean instead of a sum, a missing bias correction, an
off-by-one). A conformance suite that passes any of them is too weak. Each is a backend
factory: `bios.ServiceClient(backend="conformance.mutants:mean_reduction")`; `MUTANTS` maps
every factory name to the rule it breaks.

Faults are planted without touching any shared module: `_rebind` copies one emulator function
with some of the globals it calls replaced, so the unmodified emulator in the same process
(the shadow a suite compares against) keeps its own arithmetic.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from bios.backend import (
    AdapterSpec,
    AdapterState,
    BackendConfig,
    ForwardBackwardOutput,
    ForwardBackwardWork,
    OptimStepWork,
    SampleOutput,
    SampleWork,
)
from emulator import losses as _losses
from emulator import model as _model
from emulator import optim as _optim
from emulator import sampler as _sampler
from emulator.backend import EmulatorBackend
from emulator.ops import log_softmax

MUTANTS: dict[str, str] = {}
"""Factory name → the rule it breaks (label of docs/losses.md) and how."""


def _rebind(func: Callable, **globals_: object) -> Callable:
    """A copy of `func` whose global names in `globals_` refer to the given objects instead."""
    namespace = {**func.__globals__, **globals_}
    copy = types.FunctionType(func.__code__, namespace, func.__name__, func.__defaults__, func.__closure__)
    copy.__kwdefaults__, copy.__doc__ = func.__kwdefaults__, func.__doc__
    return copy


def _mutant(name: str, description: str) -> Callable[[type[EmulatorBackend]], type[EmulatorBackend]]:
    """Register the decorated class as mutant `name`: a module-level factory of that name."""

    def register(cls: type[EmulatorBackend]) -> type[EmulatorBackend]:
        def factory(config: BackendConfig) -> EmulatorBackend:
            return cls(config)

        factory.__name__ = factory.__qualname__ = name
        factory.__doc__ = f"Mutant backend `{name}`: {description}"
        cls.name = f"mutant:{name}"
        MUTANTS[name] = description
        globals()[name] = factory
        return cls

    return register


_emu_fb, _emu_opt, _emu_sample = EmulatorBackend._forward_backward, EmulatorBackend._optim_step, EmulatorBackend._sample


# --- losses and gradients ---------------------------------------------------------------


@_mutant("mean_reduction", "L0: loss and gradient are the mean over the batch's tokens, not the sum")
class MeanReduction(EmulatorBackend):
    def _forward_backward(self, item: ForwardBackwardWork) -> ForwardBackwardOutput:
        adapter = self._adapters.get(item.adapter_id) if item.adapter_id is not None else None
        before = {k: g.copy() for k, g in adapter.grads.items()} if adapter is not None and item.backward else None
        out = super()._forward_backward(item)
        n = max(1, sum(len(t) for t in item.tokens))
        if before is not None and adapter is not None:
            adapter.grads = {k: before[k] + (g - before[k]) / n for k, g in adapter.grads.items()}
        return ForwardBackwardOutput(out.loss / n, out.logprobs, out.elementwise_loss, {"loss:sum": out.loss / n})


def _next_position_logprobs(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    return _model.token_logprobs(np.roll(logits, -1, axis=0), targets)


def _next_position_backward(logits: np.ndarray, targets: np.ndarray, d_lp: np.ndarray) -> np.ndarray:
    return np.roll(_model.token_logprobs_backward(np.roll(logits, -1, axis=0), targets, d_lp), 1, axis=0)


@_mutant("shifted_targets", "L6: log p(target[t]) is read at position t+1 (off-by-one alignment; the last wraps to 0)")
class ShiftedTargets(EmulatorBackend):
    _forward_backward = _rebind(
        _emu_fb, token_logprobs=_next_position_logprobs, token_logprobs_backward=_next_position_backward
    )


def _clipped_alone(r: np.ndarray, adv: np.ndarray, config: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    inside = (r >= config["clip_low_threshold"]) & (r <= config["clip_high_threshold"])
    return -_losses._clip(r, config) * adv, np.where(inside, -r * adv, 0.0)


_NO_MIN = {name: _rebind(_losses.LOSSES[name], _clipped_surrogate=_clipped_alone) for name in ("ppo", "gspo")}


@_mutant(
    "ppo_no_min",
    "L3 (and L9, its sequence-ratio form): PPO uses the clipped term alone, without min(r·A, clip(r)·A) "
    "(one-sided clipping)",
)
class PpoNoMin(EmulatorBackend):
    _forward_backward = _rebind(
        _emu_fb, elementwise_loss=_rebind(_losses.elementwise_loss, LOSSES={**_losses.LOSSES, **_NO_MIN})
    )


def _binary_weights_cross_entropy(
    lp: np.ndarray, inputs: dict[str, np.ndarray], config: dict[str, float]
) -> tuple[np.ndarray, np.ndarray]:
    mask = (inputs["weights"] > 0).astype(np.float64)
    return -mask * lp, -mask


@_mutant("weights_as_mask", "L1: cross_entropy treats its weights as a 0/1 loss mask (any w > 0 counts as 1)")
class WeightsAsMask(EmulatorBackend):
    _forward_backward = _rebind(
        _emu_fb,
        elementwise_loss=_rebind(
            _losses.elementwise_loss, LOSSES={**_losses.LOSSES, "cross_entropy": _binary_weights_cross_entropy}
        ),
    )


@_mutant("grad_not_cleared", "L8: optim_step applies the accumulated gradient but does not zero it")
class GradNotCleared(EmulatorBackend):
    def _optim_step(self, item: OptimStepWork):
        grads = self._adapter(item.adapter_id).grads
        out = super()._optim_step(item)
        self._adapters[item.adapter_id].grads = grads
        return out


# --- optimizer ---------------------------------------------------------------------------


@_mutant("no_bias_correction", "O4: Adam without bias correction (m̂ = m, v̂ = v)")
class NoBiasCorrection(EmulatorBackend):
    _optim_step = _rebind(_emu_opt, adam_step=_rebind(_optim.adam_step, bias_correct=lambda m, v, *_: (m, v)))


def _coupled_l2_adam(weights, grads, m, v, step, *, weight_decay: float, **params):
    grads = {name: g + weight_decay * weights[name] for name, g in grads.items()}
    return _optim.adam_step(weights, grads, m, v, step, weight_decay=0.0, **params)


@_mutant("coupled_weight_decay", "O5: weight decay as L2 added to the gradient before Adam, not decoupled (AdamW)")
class CoupledWeightDecay(EmulatorBackend):
    _optim_step = _rebind(_emu_opt, adam_step=_coupled_l2_adam)


def _clip_each_tensor(grads: dict[str, np.ndarray], norm: float, clip_norm: float) -> dict[str, np.ndarray]:
    return {
        name: _optim.clip_by_global_norm({name: g}, float(np.linalg.norm(g)), clip_norm)[name]
        for name, g in grads.items()
    }


@_mutant(
    "clip_per_tensor", "O2: each tensor's gradient is clipped to grad_clip_norm by its own norm, not the global one"
)
class ClipPerTensor(EmulatorBackend):
    _optim_step = _rebind(_emu_opt, adam_step=_rebind(_optim.adam_step, clip_by_global_norm=_clip_each_tensor))


# --- model -------------------------------------------------------------------------------


def _alpha_lora(weights: dict[str, np.ndarray], scale: float, dropout=None) -> _model.Lora:
    rank = next(a.shape[1] for name, a in weights.items() if name.endswith("lora_A"))
    return _model.Lora(weights, scale * rank, dropout)


@_mutant("alpha_scale", "M1: LoRA term scaled by alpha instead of alpha / rank")
class AlphaScale(EmulatorBackend):
    _forward_backward = _rebind(_emu_fb, Lora=_alpha_lora)
    _sample = _rebind(_emu_sample, Lora=_alpha_lora)


@_mutant("dropout_no_rescale", "M1: dropout zeroes inputs but does not scale the kept ones by 1/(1 - p)")
class DropoutNoRescale(EmulatorBackend):
    def _dropout(self, adapter, datum):
        masks = super()._dropout(adapter, datum)
        return lambda path, shape: (masks(path, shape) > 0).astype(np.float64)


@_mutant("dropout_shared_mask", "M1: every datum of a batch gets the same dropout masks (the datum index is ignored)")
class DropoutSharedMask(EmulatorBackend):
    def _dropout(self, adapter, datum):
        return super()._dropout(adapter, 0)


@_mutant("dropout_in_forward", "M1: dropout masks are applied in forward as well, not only in forward_backward")
class DropoutInForward(EmulatorBackend):
    def _forward_backward(self, item: ForwardBackwardWork) -> ForwardBackwardOutput:
        adapter = self._adapters.get(item.adapter_id) if item.adapter_id is not None else None
        if item.backward or adapter is None or adapter.spec.dropout == 0:
            return super()._forward_backward(item)
        grads = {k: g.copy() for k, g in adapter.grads.items()}
        out = super()._forward_backward(replace(item, backward=True))
        adapter.grads = grads
        return out


# --- state -------------------------------------------------------------------------------


@_mutant("drops_moments", "state: create_adapter from a saved state ignores adam_m / adam_v (moments restart at 0)")
class DropsMoments(EmulatorBackend):
    def create_adapter(self, spec: AdapterSpec, state: AdapterState | None = None) -> None:
        super().create_adapter(spec, None if state is None else replace(state, adam_m={}, adam_v={}))


@_mutant("resume_restarts_step", "state: a session created from a saved state starts again at step 0")
class ResumeRestartsStep(EmulatorBackend):
    def create_adapter(self, spec: AdapterSpec, state: AdapterState | None = None) -> None:
        super().create_adapter(spec, None if state is None else replace(state, step=0))


# --- sampling ----------------------------------------------------------------------------


def _sampler_with(next_token: Callable) -> Callable:
    """The emulator's `_sample` drawing each token with `next_token` instead of S1's."""
    return _rebind(_emu_sample, generate=_rebind(_sampler.generate, next_token=next_token))


def _kept_set_one_short(z: np.ndarray, top_k: int, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    ids, probs = _sampler.kept_set(z, top_k, top_p)
    if len(ids) > 1:
        ids, probs = ids[:-1], probs[:-1] / probs[:-1].sum()
    return ids, probs


@_mutant("top_p_one_short", "S1: top-p keeps one token fewer than the smallest prefix reaching top_p")
class TopPOneShort(EmulatorBackend):
    _sample = _sampler_with(_rebind(_sampler.next_token, kept_set=_kept_set_one_short))


def _stop_on_token_boundary(generated, stop_token_ids, stop_strings, decode) -> bool:
    if generated[-1] in stop_token_ids:
        return True
    last = decode([generated[-1]])
    return any(last.endswith(s) for s in stop_strings)


@_mutant(
    "stop_token_boundary",
    "S3: a stop string is seen only when the last token's own text ends with it, not across tokens",
)
class StopTokenBoundary(EmulatorBackend):
    _sample = _rebind(_emu_sample, generate=_rebind(_sampler.generate, is_stop=_stop_on_token_boundary))


def _tempered_generate(step, first_logits, prompt_length, *, temperature: float, **params):
    t = temperature if temperature > 0 else 1.0
    generate = _rebind(_sampler.generate, log_softmax=lambda z: log_softmax(z / t))
    return generate(step, first_logits, prompt_length, temperature=temperature, **params)


@_mutant("tempered_logprobs", "S2: returned sample logprobs are taken from the temperature-scaled logits")
class TemperedLogprobs(EmulatorBackend):
    _sample = _rebind(_emu_sample, generate=_tempered_generate)


def _kept_top_p_first(z: np.ndarray, top_k: int, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    ids, probs = _sampler.kept_set(z, -1, top_p)
    if top_k != -1:
        ids, probs = ids[:top_k], probs[:top_k] / probs[:top_k].sum()
    return ids, probs


@_mutant("top_p_before_top_k", "S1: top-p is applied to the whole vocabulary first, then top-k")
class TopPBeforeTopK(EmulatorBackend):
    _sample = _sampler_with(_rebind(_sampler.next_token, kept_set=_kept_top_p_first))


def _next_token_tempered_twice(z_raw, temperature, top_k, top_p, rng):
    z = z_raw if temperature == 0 else z_raw / temperature
    return _sampler.next_token(z, temperature, top_k, top_p, rng)


@_mutant("temperature_twice", "S1: the logits are divided by the temperature twice")
class TemperatureTwice(EmulatorBackend):
    _sample = _sampler_with(_next_token_tempered_twice)


def _next_token_top_p_unscaled(z_raw, temperature, top_k, top_p, rng):
    if temperature == 0:
        return _sampler.next_token(z_raw, temperature, top_k, top_p, rng)
    ids, _ = _sampler.kept_set(z_raw, top_k, top_p)
    z = z_raw[ids] / temperature
    probs = np.exp(z - z.max())
    index = int(np.searchsorted(np.cumsum(probs / probs.sum()), rng.random(), side="right"))
    return int(ids[min(index, len(ids) - 1)])


@_mutant(
    "top_p_before_temperature",
    "S1: the top-k/top-p set is chosen from the unscaled logits, the temperature applied after",
)
class TopPBeforeTemperature(EmulatorBackend):
    _sample = _sampler_with(_next_token_top_p_unscaled)


@_mutant("stop_token_dropped", "S3: a stop token ends the sequence but is left out of its tokens")
class StopTokenDropped(EmulatorBackend):
    def _sample(self, item: SampleWork) -> SampleOutput:
        out = super()._sample(item)
        stops = set(item.stop_token_ids)
        sequences = tuple(
            replace(seq, tokens=seq.tokens[:-1], logprobs=seq.logprobs[:-1])
            if seq.stop_reason == "stop" and len(seq.tokens) > 1 and int(seq.tokens[-1]) in stops
            else seq
            for seq in out.sequences
        )
        return SampleOutput(sequences, out.prompt_logprobs)
