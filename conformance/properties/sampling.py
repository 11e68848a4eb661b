"""Sampling (docs/losses.md S1–S3): greedy decoding, membership of each draw in the reference's
top-k/top-p kept set, the frequencies of draws against the reference's distribution, the
returned logprobs, seeds, stop tokens, stop strings and max_tokens.

Design: the reference's whole next-token distribution for a prefix costs one `forward` on V
data (one per candidate continuation; ~3 s for V = 4096 on the emulator), so one property
computes it once per example, for the prompt, and checks every sample's *first* token against
it: membership of the kept set at random settings (top-k rank and top-p mass, with float32
slack), and frequencies of a few hundred draws at settings chosen to expose misorderings
(conformance.filters, conformance.statistics). Later tokens are checked more cheaply: their
returned logprobs must equal the reference's `forward` over prompt+completion (S2), which also
pins down that they were drawn from the right prefix.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from bios import types
from conformance import strategies as cs
from conformance import tolerances as tol
from conformance.filters import choose_filters
from conformance.harness import Pair, continuation_logprobs, next_token_logprobs
from conformance.properties import conformance_property
from conformance.statistics import fit_problem

_WARM = lambda spec: cs.datum_batches(spec, "cross_entropy", 2, 17)


def _trained_twins(pair: Pair, lora: types.LoraConfig, warm: list) -> tuple:
    """Twin sessions after one identical step, so that the adapter changes the distribution."""
    twins = pair.twins(lora)
    for client in twins:
        client.train(warm, learning_rate=2e-2)
    return twins


def _check_lengths_and_stops(seq: types.SampledSequence, params: types.SamplingParams, tokenizer, max_new: int) -> None:
    """S3 on one sequence: stops exactly at the first stop token/string (the model's EOS when
    `stop` is None), else at max_tokens (None: at the end of the context, `max_new` tokens)."""
    eos = tokenizer.eos_token_id
    ids = params.stop_token_ids() if params.stop is not None else (() if eos is None else (eos,))
    strings, decode = params.stop_strings(), tokenizer.decode
    limit = max_new if params.max_tokens is None else min(params.max_tokens, max_new)
    assert 1 <= len(seq.tokens) <= limit, f"{len(seq.tokens)} tokens for max_tokens {params.max_tokens}"
    assert len(seq.logprobs) == len(seq.tokens), "one logprob per token"

    def stops_at(i: int) -> bool:
        return seq.tokens[i] in ids or (bool(strings) and any(s in decode(seq.tokens[: i + 1]) for s in strings))

    first = next((i for i in range(len(seq.tokens)) if stops_at(i)), None)
    if seq.stop_reason == "stop":
        assert first == len(seq.tokens) - 1, (
            f"stop_reason 'stop' but the first stop is at {first} of {len(seq.tokens)} tokens"
        )
    else:
        assert first is None, (
            f"a stop sequence ends at token {first} but generation went on to {len(seq.tokens)} ({seq.stop_reason})"
        )
        assert len(seq.tokens) == limit, f"stopped for length at {len(seq.tokens)}, max_tokens {params.max_tokens}"


@conformance_property(
    lora=cs.lora_configs, warm=_WARM, prompt=cs.prompts, params=lambda spec: cs.sampling_params(spec, greedy=True)
)
def prop_greedy_samples_match_reference(pair: Pair, lora, warm, prompt, params) -> None:
    """Greedy completions equal the reference's token for token (up to a near-tie), with the same stop reason."""
    candidate, reference = _trained_twins(pair, lora, warm)
    got = candidate.sample(types.ModelInput.from_ints(prompt), params, num_samples=1).result().sequences[0]
    expected = reference.sample(types.ModelInput.from_ints(prompt), params, num_samples=1).result().sequences[0]
    for i, (g, e) in enumerate(zip(got.tokens, expected.tokens)):
        if g != e:
            lp = next_token_logprobs(reference, prompt + expected.tokens[:i], [e, g])
            pair.close(f"greedy near-tie at token {i}", lp[0] - lp[1], 0.0, tol.GREEDY_MARGIN)
            return  # a genuine near-tie: the sequences legitimately diverge from here
    assert got.tokens == expected.tokens, f"greedy tokens {got.tokens} != reference {expected.tokens}"
    assert got.stop_reason == expected.stop_reason, f"stop_reason {got.stop_reason} != reference {expected.stop_reason}"
    pair.close("greedy sample logprobs", got.logprobs, expected.logprobs, tol.SAMPLE_LOGPROB_ATOL)


def _kept_set_ok(lp: np.ndarray, token: int, params: types.SamplingParams) -> str | None:
    """Why `token` is outside the reference's kept set (S1) for next-token logprobs lp [V], or None.

    Tokens within KEPT_SET_LOGIT_SLACK / KEPT_SET_MASS_SLACK of the boundary pass either way.
    """
    z = lp / params.temperature
    above = z > z[token] + tol.KEPT_SET_LOGIT_SLACK  # [V] tokens surely ranked before `token`
    if params.top_k != -1 and above.sum() >= params.top_k:
        return f"token {token} has reference rank >= {int(above.sum())} but top_k = {params.top_k}"
    order = np.argsort(-z, kind="stable")
    if params.top_k != -1:
        order = order[: params.top_k]
    probs = np.exp(z[order] - z[order[0]])
    probs /= probs.sum()
    mass_above = float(probs[above[order]].sum())
    if mass_above >= params.top_p + tol.KEPT_SET_MASS_SLACK:
        return f"token {token}: reference mass of more likely tokens {mass_above:.6f} >= top_p {params.top_p}"
    return None


@conformance_property(
    lora=cs.lora_configs,
    warm=_WARM,
    prompt=lambda spec: cs.prompts(spec, 6),
    params=lambda spec: cs.sampling_params(spec, greedy=False, max_tokens=6),
    n=lambda spec: st.integers(1, 6),
)
def prop_sample_logprobs_are_reference_logprobs(pair: Pair, lora, warm, prompt, params, n) -> None:
    """num_samples sequences come back, and every sampled token's returned logprob equals the
    reference's forward logprob of it after the prompt and the tokens before it (S2)."""
    candidate, reference = _trained_twins(pair, lora, warm)
    result = candidate.sample(types.ModelInput.from_ints(prompt), params, num_samples=n).result()
    assert len(result.sequences) == n, f"{len(result.sequences)} sequences for num_samples {n}"
    for seq in result.sequences:
        expected = continuation_logprobs(reference, prompt, seq.tokens)
        pair.close("sample logprobs vs reference forward", seq.logprobs, expected, tol.SAMPLE_LOGPROB_ATOL)


@conformance_property(
    lora=cs.lora_configs,
    warm=_WARM,
    prompt=cs.prompts,
    params=lambda spec: cs.sampling_params(spec, max_tokens=16),
    n=lambda spec: st.integers(1, 4),
)
def prop_seeded_sampling_repeats_and_honours_stops(pair: Pair, lora, warm, prompt, params, n) -> None:
    """The same seed gives the same samples; each stops exactly at its first stop token or stop
    string (kept), else at max_tokens (S3). A stop token planted from a completion drawn without
    stops ends the same draw right after its first occurrence, and is kept."""
    client = pair.session(lora)
    client.train(warm, learning_rate=2e-2)
    sampler = client.save_weights_and_get_sampling_client(pair.name("seed"))
    model_input = types.ModelInput.from_ints(prompt)
    first = client.sample(model_input, params, num_samples=n).result()
    second = client.sample(model_input, params, num_samples=n).result()
    third = sampler.sample(model_input, params, num_samples=n).result()
    for other, where in ((second, "training client again"), (third, "sampling client")):
        assert [s.tokens for s in other.sequences] == [s.tokens for s in first.sequences], (
            f"same seed, other tokens ({where})"
        )
        pair.close(
            f"seeded logprobs ({where})",
            [x for s in other.sequences for x in s.logprobs],
            [x for s in first.sequences for x in s.logprobs],
            tol.EXACT,
        )
        assert [s.stop_reason for s in other.sequences] == [s.stop_reason for s in first.sequences]
    tokenizer = client.get_tokenizer()
    for seq in first.sequences:
        _check_lengths_and_stops(seq, params, tokenizer, pair.spec["max_seq_len"] - len(prompt))
    free = client.sample(model_input, params.model_copy(update={"stop": []})).result().sequences[0].tokens
    planted = free[len(free) // 2]
    end = free.index(planted) + 1
    stopped = client.sample(model_input, params.model_copy(update={"stop": [planted]})).result().sequences[0]
    assert (stopped.tokens, stopped.stop_reason) == (free[:end], "stop"), (
        f"with stop token {planted} (first drawn at {end - 1} of {free}): {stopped.tokens} {stopped.stop_reason}"
    )


FIT_DRAWS = 256
"""Draws per fit test: two requests of 128 samples (the most one request may ask for)."""


@conformance_property(
    lora=cs.lora_configs,
    warm=_WARM,
    prompt=lambda spec: cs.prompts(spec, 6),
    params=lambda spec: cs.sampling_params(spec, greedy=False, max_tokens=1),
    seed=lambda spec: st.integers(0, 2**30),
)
def prop_draws_follow_reference_distribution(pair: Pair, lora, warm, prompt, params, seed) -> None:
    """S1 in distribution, from the reference's whole next-token distribution for the prompt:
    tokens drawn at random settings are all in its top-k/top-p set; tokens drawn at a
    temperature alone, and at temperature, top-k and top-p together, are distributed as it says
    (every draw kept, frequencies fit by Pearson's test). Those two settings are chosen from the
    distribution so that a sampler applying the filters in another order, top-p before the
    temperature, the temperature twice or not at all, or cutting top-p a token short or long,
    draws visibly differently (conformance.filters)."""
    candidate, reference = _trained_twins(pair, lora, warm)
    lp = next_token_logprobs(reference, prompt, range(pair.spec["vocab_size"]))
    model_input = types.ModelInput.from_ints(prompt)
    for seq in candidate.sample(model_input, params, num_samples=8).result().sequences:
        problem = _kept_set_ok(lp, seq.tokens[0], params)
        assert problem is None, f"at {params}: {problem}"
    for both in (False, True):
        filters = choose_filters(lp, FIT_DRAWS, top_k_and_top_p=both)
        chosen = types.SamplingParams(
            max_tokens=1, temperature=filters.temperature, top_k=filters.top_k, top_p=filters.top_p
        )
        drawn = [
            s.tokens[0]
            for offset in (0, 1)
            for s in candidate.sample(
                model_input, chosen.model_copy(update={"seed": seed + offset}), num_samples=FIT_DRAWS // 2
            )
            .result()
            .sequences
        ]
        label = f"fit at temperature {filters.temperature}, top_k {filters.top_k}, top_p {filters.top_p:.4f}"
        problem, ratio = fit_problem(drawn, filters.expected)
        pair.recorder.note(label, ratio, 1.0)
        assert problem is None, f"{label}: {problem}"
