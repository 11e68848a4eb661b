"""Every planted fault of conformance.mutants is caught by the conformance suite's ci profile,
by the property `CAUGHT_BY` names (that the unmodified emulator passes every property is shown
by tests/server/test_conformance_remote.py, a server on the emulator against the emulator).

Each mutant costs one property run (the one that catches it); which one, and the error it
reports, is printed with `pytest -s`.
"""

from __future__ import annotations

import pytest

from conformance import run
from conformance.mutants import MUTANTS

CAUGHT_BY: dict[str, str] = {
    "mean_reduction": "prop_forward_matches_reference",
    "shifted_targets": "prop_forward_matches_reference",
    "alpha_scale": "prop_forward_matches_reference",
    "weights_as_mask": "prop_forward_matches_reference",
    "ppo_no_min": "prop_gradient_accumulation_equals_union",
    "grad_not_cleared": "prop_optim_step_matches_reference",
    "no_bias_correction": "prop_optim_step_matches_reference",
    "coupled_weight_decay": "prop_optim_step_matches_reference",
    "clip_per_tensor": "prop_optim_step_matches_reference",
    "dropout_no_rescale": "prop_dropout_gradient_is_unbiased",
    "dropout_shared_mask": "prop_dropout_only_in_training_with_fresh_masks",
    "dropout_in_forward": "prop_dropout_only_in_training_with_fresh_masks",
    "drops_moments": "prop_save_load_round_trip_is_exact",
    "resume_restarts_step": "prop_save_load_round_trip_is_exact",
    "top_p_one_short": "prop_draws_follow_reference_distribution",
    "top_p_before_top_k": "prop_draws_follow_reference_distribution",
    "top_p_before_temperature": "prop_draws_follow_reference_distribution",
    "temperature_twice": "prop_draws_follow_reference_distribution",
    "tempered_logprobs": "prop_sample_logprobs_are_reference_logprobs",
    "stop_token_boundary": "prop_seeded_sampling_repeats_and_honours_stops",
    "stop_token_dropped": "prop_seeded_sampling_repeats_and_honours_stops",
}
"""Mutant → the property that catches it under the ci profile."""


def test_every_mutant_has_a_factory_and_a_catching_property():
    import conformance.mutants as mutants

    assert len(MUTANTS) >= 20
    assert set(CAUGHT_BY) == set(MUTANTS)
    for name, description in MUTANTS.items():
        assert callable(getattr(mutants, name)) and description


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_mutant_is_caught_by_its_property(name):
    report = run(f"conformance.mutants:{name}", profile="ci", only=CAUGHT_BY[name])
    assert [r.name for r in report.results] == [CAUGHT_BY[name]]
    result = report.results[0]
    print(f"\n{name}: {result.name} failed after {result.examples} examples, {result.seconds:.1f} s: {result.error}")
    assert report.failed == [CAUGHT_BY[name]], f"mutant {name} ({MUTANTS[name]}) passed {CAUGHT_BY[name]}"
