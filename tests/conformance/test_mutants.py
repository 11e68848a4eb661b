"""Every planted fault of conformance.mutants is caught, and the unmodified emulator is not.

Primary route: `conformance.run(mutant, profile="ci")` reports at least one failed property.
Fallback (also always run, it is fast): small targeted checks through the public API, each
comparing a backend with the emulator; every mutant must fail at least one, the emulator none.
Which property / check caught each mutant is printed (`pytest -s`) and kept in `CAUGHT_BY`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import bios
from bios import types
from conformance import run
from conformance.mutants import MUTANTS

MODEL = "bios/tiny"
ATOL = 1e-6
CAUGHT_BY: dict[str, list[str]] = {}


def _datum(tokens: list[int], inputs: dict[str, Any]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={"target_tokens": tokens[1:], **inputs}
    )


def _batch(seed: int, **extra: Callable[[np.random.Generator, int], list[float]]) -> list[types.Datum]:
    rng = np.random.default_rng(seed)
    data = []
    for n in (6, 11, 9):
        tokens = rng.integers(4, 4096, n).tolist()
        data.append(_datum(tokens, {name: make(rng, n - 1) for name, make in extra.items()}))
    return data


BATCH = _batch(1, weights=lambda rng, n: (rng.random(n) + 0.1).tolist())
PROBE = _batch(2)
PPO_BATCH = _batch(  # sampler logprobs 1 nat above / below lp ≈ -8.3: ratios ~0.37 / ~2.7, outside [0.8, 1.2]
    3,
    logprobs=lambda rng, n: (-8.3 + np.where(rng.random(n) < 0.5, 1.0, -1.0)).tolist(),
    advantages=lambda rng, n: np.where(rng.random(n) < 0.5, 1.0, -1.0).tolist(),
)
PROMPT = types.ModelInput.from_ints([11, 503, 77, 2048, 9])
ADAM = types.AdamParams(learning_rate=1e-2, weight_decay=0.1)


def _lp(result: types.ForwardBackwardResult) -> list[np.ndarray]:
    return [np.asarray(o["logprobs"].data, float) for o in result.loss_fn_outputs]


def _session(service: bios.ServiceClient) -> bios.TrainingClient:
    return service.create_lora_training_client(MODEL, rank=4, alpha=8.0, seed=1)


# --- observations: what each check records on one backend --------------------------------


def obs_loss_sum(service: bios.ServiceClient) -> dict:
    """L0: forward_backward's loss (a plain sum) on a weighted batch, and the sum of its elementwise terms."""
    result = _session(service).forward_backward(BATCH).result()
    return {
        "loss": result.loss,
        "sum_elementwise": sum(float(np.sum(o["elementwise_loss"].data)) for o in result.loss_fn_outputs),
    }


def obs_train_forward(service: bios.ServiceClient) -> dict:
    """L6, L8, O1–O5, M1: two accumulate-then-step rounds with weight decay, then forward logprobs."""
    client = _session(service)
    norms = []
    for _ in range(2):
        client.forward_backward(BATCH[:2])
        client.forward_backward(BATCH[2:])
        norms.append(client.optim_step(ADAM).result().metrics["grad_norm"])
    return {"grad_norms": norms, "logprobs": _lp(client.forward(PROBE).result()), "step": client.get_info().step}


def obs_ppo(service: bios.ServiceClient) -> dict:
    """L3: PPO loss and per-token terms where ratios fall outside the clip range on both sides."""
    result = _session(service).forward_backward(PPO_BATCH, "ppo").result()
    return {"loss": result.loss, "elementwise": [o["elementwise_loss"].data for o in result.loss_fn_outputs]}


def obs_resume(service: bios.ServiceClient) -> dict:
    """Checkpoints: save after two steps, resume in a new session, one more step, forward logprobs."""
    client = _session(service)
    for _ in range(2):
        client.train(BATCH, learning_rate=1e-2)
    resumed = service.create_training_client_from_state(client.save_state("two").result().path)
    resumed.train(BATCH, learning_rate=1e-2)
    return {"logprobs": _lp(resumed.forward(PROBE).result()), "step": resumed.get_info().step}


def obs_top_p(service: bios.ServiceClient) -> dict:
    """S1: seeded draws at temperature 1 with top_k=3, top_p=0.95 (the full top-3 set is needed)."""
    params = types.SamplingParams(max_tokens=6, temperature=1.0, top_k=3, top_p=0.95, seed=7)
    result = service.create_sampling_client(base_model=MODEL).sample(PROMPT, params, num_samples=6).result()
    return {"tokens": [s.tokens for s in result.sequences]}


def obs_sample_logprobs(service: bios.ServiceClient) -> dict:
    """S2: logprobs returned with seeded samples at temperature 0.5 are those of temperature 1."""
    params = types.SamplingParams(max_tokens=5, temperature=0.5, seed=3)
    result = service.create_sampling_client(base_model=MODEL).sample(PROMPT, params, num_samples=2).result()
    return {"tokens": [s.tokens for s in result.sequences], "logprobs": [s.logprobs for s in result.sequences]}


def obs_stop_string(service: bios.ServiceClient) -> dict:
    """S3: a stop string spanning two generated tokens ends the completion right after the second.

    The string is the last character of the greedy completion's k-th token's text and the
    first of the (k+1)-th, so no single token contains it; a correct sampler stops at k+1 tokens.
    """
    sampler = service.create_sampling_client(base_model=MODEL)
    tokenizer = sampler.get_tokenizer()
    free = sampler.sample(PROMPT, types.SamplingParams(max_tokens=16, temperature=0.0)).result().sequences[0].tokens
    for k in range(1, len(free) - 1):
        head, longer = tokenizer.decode(free[:k]), tokenizer.decode(free[: k + 1])
        if head and len(longer) > len(head) and longer.startswith(head) and "\ufffd" not in longer:
            stop = head[-1] + longer[len(head)]
            if stop not in head and not tokenizer.decode([free[k]]).endswith(stop):
                break
    else:
        pytest.fail(f"no token boundary in {free} to plant a stop string across")
    got = (
        sampler.sample(PROMPT, types.SamplingParams(max_tokens=16, temperature=0.0, stop=[stop])).result().sequences[0]
    )
    return {"tokens": got.tokens, "stop_reason": got.stop_reason, "expected_length": k + 1, "length": len(got.tokens)}


CHECKS: dict[str, Callable[[bios.ServiceClient], dict]] = {
    "loss_sum": obs_loss_sum,
    "train_forward": obs_train_forward,
    "ppo_clip": obs_ppo,
    "resume_moments": obs_resume,
    "top_p": obs_top_p,
    "sample_logprobs": obs_sample_logprobs,
    "stop_string": obs_stop_string,
}


def _differences(got: dict, expected: dict) -> list[str]:
    """Keys whose values differ (floats beyond ATOL + 1e-6 relative, everything else exactly)."""
    wrong = []
    for key, e in expected.items():
        g = got[key]
        try:
            same = (
                all(
                    np.allclose(np.asarray(a, float), np.asarray(b, float), atol=ATOL, rtol=1e-6)
                    for a, b in zip(g, e, strict=True)
                )
                if isinstance(e, list)
                else bool(np.isclose(g, e, atol=ATOL, rtol=1e-6))
            )
        except (ValueError, TypeError):
            same = g == e
        if not same:
            wrong.append(f"{key}: {g!r:.80} != reference {e!r:.80}")
    return wrong


def failed_checks(backend: str) -> dict[str, list[str]]:
    """Check name → what differed, for every fallback check `backend` fails against the emulator."""
    candidate, reference = bios.ServiceClient(backend=backend), bios.ServiceClient(backend="emulator")
    failed = {}
    for name, observe in CHECKS.items():
        got = observe(candidate)
        wrong = _differences(got, observe(reference))
        if name == "stop_string" and (got["stop_reason"], got["length"]) != ("stop", got["expected_length"]):
            wrong.append(f"stopped after {got['length']} tokens ({got['stop_reason']}), not {got['expected_length']}")
        if wrong:
            failed[name] = wrong
    return failed


# --- tests -------------------------------------------------------------------------------


def test_at_least_eight_mutants_each_with_a_factory():
    import conformance.mutants as mutants

    assert len(MUTANTS) >= 8
    for name, description in MUTANTS.items():
        assert callable(getattr(mutants, name)) and description


def test_the_emulator_passes_every_fallback_check():
    assert failed_checks("emulator") == {}


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_mutant_is_caught_by_a_fallback_check(name):
    failed = failed_checks(f"conformance.mutants:{name}")
    CAUGHT_BY.setdefault(name, []).extend(f"check:{check}" for check in failed)
    print(f"\n{name}: caught by fallback checks {sorted(failed)}")
    assert failed, f"mutant {name} ({MUTANTS[name]}) passed every fallback check"


TARGETS: dict[str, str] = {
    "mean_reduction": "forward_matches_reference",
    "shifted_targets": "forward_matches_reference",
    "alpha_scale": "forward_matches_reference",
    "ppo_no_min": "gradient_accumulation_equals_union",
    "grad_not_cleared": "optim_step_matches_reference",
    "no_bias_correction": "optim_step_matches_reference",
    "coupled_weight_decay": "optim_step_matches_reference",
    "drops_moments": "save_load_round_trip",
    "top_p_one_short": "whole_top_p_set_is_reachable",
    "stop_token_boundary": "seeded_sampling_repeats_and_honours_stops",
    "tempered_logprobs": "samples_in_reference_kept_set",
}
"""Mutant → an `only=` filter selecting the property that catches it (observed with the ci
profile), so each mutant costs one property; the whole suite runs if that one misses it."""


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_mutant_is_caught_by_the_conformance_suite(name):
    backend = f"conformance.mutants:{name}"
    report = run(backend, profile="ci", only=TARGETS[name])
    if not report.failed:  # the targeted property missed it (or was renamed): the whole suite must not
        report = run(backend, profile="ci")
    CAUGHT_BY.setdefault(name, []).extend(f"property:{p}" for p in report.failed)
    print(f"\n{name}: failed properties {report.failed}")
    assert report.failed, f"mutant {name} ({MUTANTS[name]}) passed the whole ci conformance suite"


@pytest.mark.slow
def test_the_emulator_passes_the_properties_that_catch_mutants():
    for only in sorted(set(TARGETS.values())):
        report = run("emulator", profile="ci", only=only)
        assert report.results, f"no property matches {only!r}"
        assert report.failed == [], report.failed
