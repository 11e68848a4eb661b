"""Sampling (docs/losses.md S1–S3): greedy decoding, membership of each draw in the reference's
top-k/top-p kept set, the returned logprobs, seeds, stop tokens, stop strings and max_tokens.

Kept-set design: the reference's whole next-token distribution for a prefix costs one
`forward` on V data (one per candidate continuation; ~3 s for V = 4096 on the emulator), so
it is computed once per example, for the prompt, and every sample's *first* token is checked
against it (top-k rank and top-p mass, with float32 slack). Later tokens are checked more
cheaply: their returned logprobs must equal the reference's `forward` over prompt+completion
(S2), which also pins down that they were drawn from the right prefix.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from bios import types
from conformance import strategies as cs
from conformance import tolerances as tol
from conformance.harness import Pair, continuation_logprobs, next_token_logprobs
from conformance.properties import conformance_property

_WARM = lambda spec: cs.datum_batches(spec, "cross_entropy", 2, 17)


def _trained_twins(pair: Pair, lora: types.LoraConfig, warm: list) -> tuple:
    """Twin sessions after one identical step, so that the adapter changes the distribution."""
    twins = pair.twins(lora)
    for client in twins:
        client.train(warm, learning_rate=2e-2)
    return twins


def _check_lengths_and_stops(seq: types.SampledSequence, params: types.SamplingParams, decode, max_new: int) -> None:
    """S3 on one sequence: stops exactly at the first stop token/string, else at max_tokens."""
    ids, strings = params.stop_token_ids(), params.stop_strings()
    assert 1 <= len(seq.tokens) <= params.max_tokens, f"{len(seq.tokens)} tokens for max_tokens {params.max_tokens}"
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
        assert len(seq.tokens) == min(params.max_tokens, max_new), (
            f"stopped for length at {len(seq.tokens)}, max_tokens {params.max_tokens}"
        )


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
def prop_samples_in_reference_kept_set(pair: Pair, lora, warm, prompt, params, n) -> None:
    """Every first sampled token is in the reference's top-k/top-p set for the prompt, and every
    sampled token's returned logprob equals the reference's logprob of it (S1, S2)."""
    candidate, reference = _trained_twins(pair, lora, warm)
    result = candidate.sample(types.ModelInput.from_ints(prompt), params, num_samples=n).result()
    assert len(result.sequences) == n, f"{len(result.sequences)} sequences for num_samples {n}"
    lp = next_token_logprobs(reference, prompt, range(pair.spec["vocab_size"]))
    for seq in result.sequences:
        problem = _kept_set_ok(lp, seq.tokens[0], params)
        assert problem is None, problem
        expected = continuation_logprobs(reference, prompt, seq.tokens)
        pair.close("sample logprobs vs reference forward", seq.logprobs, expected, tol.SAMPLE_LOGPROB_ATOL)


@conformance_property(
    lora=cs.lora_configs, warm=_WARM, prompt=lambda spec: cs.prompts(spec, 6), seed=lambda spec: st.integers(0, 2**31)
)
def prop_whole_top_p_set_is_reachable(pair: Pair, lora, warm, prompt, seed) -> None:
    """S1 from below: with top_p set halfway into the second most likely token (temperature 10,
    so the two are of similar probability), both are kept and both get drawn — a top-p that
    keeps one token too few never draws the second."""
    candidate, reference = _trained_twins(pair, lora, warm)
    lp = np.asarray(next_token_logprobs(reference, prompt, range(pair.spec["vocab_size"])), dtype=np.float64)
    temperature = 10.0
    probs = np.exp((lp - lp.max()) / temperature)
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    first, second = order[0], order[1]
    top_p = float(probs[first] + 0.5 * probs[second])
    params = types.SamplingParams(max_tokens=1, temperature=temperature, top_p=top_p, seed=seed)
    drawn = [
        s.tokens[0]
        for s in candidate.sample(types.ModelInput.from_ints(prompt), params, num_samples=64).result().sequences
    ]
    assert set(drawn) <= {int(first), int(second)}, (
        f"drew {sorted(set(drawn) - {int(first), int(second)})} outside the top-p set"
    )
    share = probs[second] / (probs[first] + probs[second])  # >= ~0.3 at temperature 10: missing it 64 times is < 1e-9
    assert int(second) in drawn, f"the second token of the top-p set (share {share:.2f}) was never drawn in 64 samples"


@conformance_property(
    lora=cs.lora_configs,
    warm=_WARM,
    prompt=cs.prompts,
    params=lambda spec: cs.sampling_params(spec, max_tokens=16),
    n=lambda spec: st.integers(1, 4),
)
def prop_seeded_sampling_repeats_and_honours_stops(pair: Pair, lora, warm, prompt, params, n) -> None:
    """The same seed gives the same samples; each stops exactly at its first stop token or stop
    string (kept), else at max_tokens (S3)."""
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
        _check_lengths_and_stops(seq, params, tokenizer.decode, pair.spec["max_seq_len"] - len(prompt))
