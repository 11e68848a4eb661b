"""A stateful conformance test: random sequences of public-API calls on a candidate backend
and, in lockstep, on a shadow session of the reference emulator.

`machine_for(backend)` gives a `hypothesis.stateful.RuleBasedStateMachine` subclass
(`BackendMachine` configured for `backend`), usable as a unittest `TestCase` via its
`.TestCase` attribute or run with `hypothesis.stateful.run_state_machine_as_test`. Every rule
does the same thing to both sides and compares what comes back; after every rule, each live
session pair must agree on `forward` logprobs of a fixed probe batch (atol 1e-5) and on
`get_info().step`. Every rule `note()`s a one-line repro of what it did.

Sessions, checkpoints and sampler snapshots live in Bundles, so the machine reaches states a
scripted test does not: loading a checkpoint into a session of another rank, sampling a
snapshot after its session trained on, a rejected request between accumulation and step.
Only the public API (`bios.ServiceClient`) is used; dropout stays 0, since masks agree across
backends only in distribution.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from hypothesis import HealthCheck, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import bios
from bios import types

MODEL = "bios/tiny"
VOCAB = 4096
REFERENCE = "emulator"
LOGPROB_ATOL = 1e-5
LOSS_RTOL = 1e-5
LOSS_ATOL = 1e-5
TIE_ATOL = 1e-4
"""Greedy decoding may pick a different token where two logits are this close (float32 vs float64)."""
MAX_SESSIONS = 3

PROFILES: dict[str, settings] = {
    "ci": settings(
        max_examples=5,
        stateful_step_count=8,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
    ),
    "thorough": settings(
        max_examples=60,
        stateful_step_count=20,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
    ),
}


@dataclass
class Pair:
    """The same object on the candidate and the reference, and its label in repro notes."""

    candidate: Any
    reference: Any
    label: str


def _datum(tokens: list[int], inputs: dict[str, Any]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={"target_tokens": tokens[1:], **inputs}
    )


def batch(seed: int, loss_fn: str = "cross_entropy", size: int = 2) -> list[types.Datum]:
    """`size` random data of 2..12 tokens for `loss_fn` (cross_entropy or importance_sampling), from `seed`."""
    rng = np.random.default_rng(seed)
    data = []
    for _ in range(size):
        n = int(rng.integers(3, 13))
        tokens = rng.integers(4, VOCAB, n).tolist()
        if loss_fn == "cross_entropy":
            inputs = {"weights": (rng.random(n - 1) * (rng.random(n - 1) > 0.2)).tolist()}
        else:
            inputs = {
                "logprobs": (-8.3 + rng.normal(0, 0.3, n - 1)).tolist(),
                "advantages": rng.normal(0, 1, n - 1).tolist(),
            }
        data.append(_datum(tokens, inputs))
    return data


PROBE = batch(2024, size=2)
PROMPT = types.ModelInput.from_ints([11, 503, 77, 2048, 9])
_BAD_REQUESTS: dict[str, Callable[[Any], Any]] = {
    "token id out of range": lambda c: c.forward_backward([_datum([5, VOCAB + 3, 7], {})]).result(),
    "unknown loss_fn": lambda c: c.forward_backward(batch(1), "no_such_loss").result(),
    "misaligned loss inputs": lambda c: c.forward_backward([_datum([5, 6, 7, 8], {"weights": [1.0]})]).result(),
    "importance_sampling without advantages": lambda c: c.forward_backward(
        [_datum([5, 6, 7], {"logprobs": [-8.0, -8.0]})], "importance_sampling"
    ).result(),
    "unknown checkpoint": lambda c: c.load_state("bios://session-000000000000/weights/missing"),
}


def _close(got: float, expected: float) -> bool:
    return bool(np.isclose(got, expected, rtol=LOSS_RTOL, atol=LOSS_ATOL))


def _assert_logprobs(got: list[list[float]], expected: list[list[float]], what: str) -> None:
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        np.testing.assert_allclose(
            np.asarray(g, float), np.asarray(e, float), atol=LOGPROB_ATOL, rtol=0, err_msg=f"{what}, datum {i}"
        )


def _assert_fb(got: types.ForwardBackwardResult, expected: types.ForwardBackwardResult, what: str) -> None:
    assert _close(got.loss, expected.loss), f"{what}: loss {got.loss!r} != reference {expected.loss!r}"
    lp = lambda r: [o["logprobs"].data for o in r.loss_fn_outputs]
    _assert_logprobs(lp(got), lp(expected), what)


def _assert_samples(got: types.SampleResult, expected: types.SampleResult, what: str) -> None:
    """Greedy completions agree token for token, up to a first divergence at a near-tie."""
    for g, e in zip(got.sequences, expected.sequences, strict=True):
        for i, (gt, et) in enumerate(zip(g.tokens, e.tokens)):
            if gt != et:
                assert abs(g.logprobs[i] - e.logprobs[i]) <= TIE_ATOL, f"{what}: token {i} is {gt}, reference {et}"
                return
            assert abs(g.logprobs[i] - e.logprobs[i]) <= LOGPROB_ATOL, f"{what}: logprob of token {i}"
        assert (g.tokens, g.stop_reason) == (e.tokens, e.stop_reason), (
            f"{what}: {g.tokens} {g.stop_reason} != {e.tokens} {e.stop_reason}"
        )


lora_configs = st.builds(
    types.LoraConfig,
    rank=st.sampled_from([1, 2, 4]),
    alpha=st.sampled_from([None, 3.0]),
    target_modules=st.sampled_from(
        [None, ("q_proj", "v_proj"), ("down_proj", "lm_head"), ("o_proj", "up_proj", "lm_head")]
    ),
    seed=st.integers(0, 3),
)
adam_params = st.builds(
    types.AdamParams,
    learning_rate=st.sampled_from([1e-4, 1e-3, 5e-3]),
    beta1=st.sampled_from([0.0, 0.9]),
    beta2=st.sampled_from([0.95, 0.999]),
    weight_decay=st.sampled_from([0.0, 0.1]),
    grad_clip_norm=st.sampled_from([0.0, 1.0]),
)
loss_fns = st.sampled_from(["cross_entropy", "importance_sampling"])
seeds = st.integers(0, 2**16)


class BackendMachine(RuleBasedStateMachine):
    """Candidate `backend` against the reference, rule by rule; see the module docstring."""

    backend: str = REFERENCE

    sessions = Bundle("sessions")
    checkpoints = Bundle("checkpoints")
    samplers = Bundle("samplers")

    def __init__(self) -> None:
        super().__init__()
        self.candidate = bios.ServiceClient(backend=self.backend)
        self.reference = bios.ServiceClient(backend=REFERENCE)
        self.live: list[Pair] = []
        self._labels = itertools.count()

    def _both(self, call: Callable[[Any], Any], pair: Pair) -> tuple[Any, Any]:
        return call(pair.candidate), call(pair.reference)

    def _new_session(self, make: Callable[[bios.ServiceClient], bios.TrainingClient]) -> Pair:
        pair = Pair(make(self.candidate), make(self.reference), f"s{next(self._labels)}")
        self.live.append(pair)
        return pair

    # ---- sessions ----------------------------------------------------------------------------

    @initialize(target=sessions, config=lora_configs)
    def first_session(self, config: types.LoraConfig) -> Pair:
        return self._new_lora_session(config)

    @precondition(lambda self: len(self.live) < MAX_SESSIONS)
    @rule(target=sessions, config=lora_configs)
    def create_session(self, config: types.LoraConfig) -> Pair:
        return self._new_lora_session(config)

    def _new_lora_session(self, config: types.LoraConfig) -> Pair:
        pair = self._new_session(lambda s: s.create_lora_training_client(MODEL, lora_config=config))
        note(f"{pair.label} = service.create_lora_training_client({MODEL!r}, lora_config={config!r})")
        return pair

    # ---- training ----------------------------------------------------------------------------

    @rule(session=sessions, seed=seeds, loss_fn=loss_fns, size=st.integers(1, 3))
    def forward_backward(self, session: Pair, seed: int, loss_fn: str, size: int) -> None:
        note(f"{session.label}.forward_backward(batch({seed}, {loss_fn!r}, {size}), {loss_fn!r})")
        data = batch(seed, loss_fn, size)
        got, expected = self._both(lambda c: c.forward_backward(data, loss_fn).result(), session)
        _assert_fb(got, expected, f"{session.label}.forward_backward")

    @rule(session=sessions, adam=adam_params)
    def optim_step(self, session: Pair, adam: types.AdamParams) -> None:
        note(f"{session.label}.optim_step({adam!r})")
        got, expected = self._both(lambda c: c.optim_step(adam).result(), session)
        assert got.step == expected.step, f"optim_step: step {got.step} != reference {expected.step}"
        g, e = got.metrics["grad_norm"], expected.metrics["grad_norm"]
        assert _close(g, e), f"optim_step: grad_norm {g!r} != reference {e!r}"

    @rule(session=sessions, seed=seeds, loss_fn=loss_fns, learning_rate=st.sampled_from([1e-3, 5e-3]))
    def train(self, session: Pair, seed: int, loss_fn: str, learning_rate: float) -> None:
        note(f"{session.label}.train(batch({seed}, {loss_fn!r}), {loss_fn!r}, learning_rate={learning_rate})")
        data = batch(seed, loss_fn)
        got, expected = self._both(lambda c: c.train(data, loss_fn=loss_fn, learning_rate=learning_rate), session)
        assert _close(got.loss, expected.loss), f"train: loss {got.loss!r} != reference {expected.loss!r}"
        assert got.step == expected.step, f"train: step {got.step} != reference {expected.step}"

    # ---- sampling ----------------------------------------------------------------------------

    @rule(session=sessions, max_tokens=st.integers(1, 6))
    def sample_greedy(self, session: Pair, max_tokens: int) -> None:
        note(f"{session.label}.sample(PROMPT, SamplingParams(max_tokens={max_tokens}, temperature=0))")
        params = types.SamplingParams(max_tokens=max_tokens, temperature=0.0)
        got, expected = self._both(lambda c: c.sample(PROMPT, params).result(), session)
        _assert_samples(got, expected, f"{session.label}.sample")

    @rule(target=samplers, session=sessions)
    def snapshot(self, session: Pair) -> Pair:
        name = f"snap{next(self._labels)}"
        pair = Pair(
            *self._both(lambda c: c.save_weights_and_get_sampling_client(name), session), f"{session.label}_{name}"
        )
        note(f"{pair.label} = {session.label}.save_weights_and_get_sampling_client({name!r})")
        return pair

    @rule(sampler=samplers, max_tokens=st.integers(1, 6))
    def sample_snapshot(self, sampler: Pair, max_tokens: int) -> None:
        note(
            f"{sampler.label}.sample(PROMPT, SamplingParams(max_tokens={max_tokens}, "
            "temperature=0)); .compute_logprobs(PROMPT)"
        )
        params = types.SamplingParams(max_tokens=max_tokens, temperature=0.0)
        got, expected = self._both(lambda c: c.sample(PROMPT, params).result(), sampler)
        _assert_samples(got, expected, f"{sampler.label}.sample")
        got_lp, expected_lp = self._both(lambda c: c.compute_logprobs(PROMPT).result(), sampler)
        assert got_lp[0] is None and expected_lp[0] is None
        _assert_logprobs([got_lp[1:]], [expected_lp[1:]], f"{sampler.label}.compute_logprobs")

    # ---- checkpoints -------------------------------------------------------------------------

    @rule(target=checkpoints, session=sessions)
    def save_state(self, session: Pair) -> Pair:
        name = f"ckpt{next(self._labels)}"
        got, expected = self._both(lambda c: c.save_state(name).result(), session)
        assert got.step == expected.step, f"save_state: step {got.step} != reference {expected.step}"
        pair = Pair(got.path, expected.path, f"{session.label}_{name}")
        note(f"{pair.label} = {session.label}.save_state({name!r}).result().path")
        return pair

    @rule(session=sessions, checkpoint=checkpoints)
    def load_state(self, session: Pair, checkpoint: Pair) -> None:
        note(f"{session.label}.load_state_with_optimizer({checkpoint.label})")
        session.candidate.load_state_with_optimizer(checkpoint.candidate)
        session.reference.load_state_with_optimizer(checkpoint.reference)

    @precondition(lambda self: len(self.live) < MAX_SESSIONS)
    @rule(target=sessions, checkpoint=checkpoints)
    def resume(self, checkpoint: Pair) -> Pair:
        pair = Pair(
            self.candidate.create_training_client_from_state_with_optimizer(checkpoint.candidate),
            self.reference.create_training_client_from_state_with_optimizer(checkpoint.reference),
            f"s{next(self._labels)}",
        )
        self.live.append(pair)
        note(f"{pair.label} = service.create_training_client_from_state_with_optimizer({checkpoint.label})")
        return pair

    # ---- errors ------------------------------------------------------------------------------

    @rule(session=sessions, which=st.sampled_from(sorted(_BAD_REQUESTS)))
    def bad_request(self, session: Pair, which: str) -> None:
        note(f"{session.label}: bad request ({which}), expect the same BiosError on both")
        errors: list[bios.BiosError | None] = []
        for client in (session.candidate, session.reference):
            try:
                _BAD_REQUESTS[which](client)
            except bios.BiosError as error:
                errors.append(error)
            else:
                errors.append(None)
        got, expected = errors
        assert expected is not None, f"the reference accepted the bad request {which!r}"
        assert type(got) is type(expected), (
            f"{which}: {type(got).__name__} != reference {type(expected).__name__} ({expected})"
        )

    # ---- invariant ---------------------------------------------------------------------------

    @invariant()
    def sessions_agree(self) -> None:
        for pair in self.live:
            got, expected = self._both(lambda c: c.get_info().step, pair)
            assert got == expected, f"{pair.label}: step {got} != reference {expected}"
            got, expected = self._both(lambda c: c.forward(PROBE).result(), pair)
            lp = lambda r: [o["logprobs"].data for o in r.loss_fn_outputs]
            _assert_logprobs(lp(got), lp(expected), f"{pair.label}: forward(PROBE)")
            assert _close(got.loss, expected.loss), (
                f"{pair.label}: forward(PROBE) loss {got.loss!r} != {expected.loss!r}"
            )


def machine_for(backend: str, profile: str = "ci") -> type[BackendMachine]:
    """`BackendMachine` driving `backend` (a backend name or `module:factory`) against the
    emulator, with the `profile`'s settings ("ci": 5 examples of 8 steps; "thorough")."""
    machine: type[BackendMachine] = type(
        f"BackendMachine_{backend.replace(':', '_').replace('.', '_')}", (BackendMachine,), {"backend": backend}
    )
    machine.TestCase.settings = PROFILES[profile]
    return machine


def run_machine(backend: str, profile: str = "ci") -> None:
    """Run the machine for `backend` with the `profile`'s settings; raises on the first disagreement."""
    run_state_machine_as_test(machine_for(backend, profile), settings=PROFILES[profile])


__all__ = ["PROBE", "PROFILES", "PROMPT", "BackendMachine", "batch", "machine_for", "run_machine"]
