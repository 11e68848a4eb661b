"""LoRA dropout (docs/losses.md M1), through properties that hold whatever masks a backend draws.

Masks agree across backends only in distribution, so nothing here compares a masked number
with the reference's masked number. Instead:

- Unbiasedness. At a fresh adapter (B = 0) the forward pass does not depend on the masks, and
  the gradient of each B is linear in its module's mask: inverted dropout (keep with
  probability 1 - p, scale by 1/(1 - p)) makes it, in expectation over the masks, exactly the
  dropout-free gradient. An Adam step with beta1 = beta2 = 0 and eps = learning_rate moves B by
  -g·eps/(|g| + eps) per coordinate, which is inverted to read g from the saved weights. For
  each of several adapter seeds (each its own A and masks), the projection of the candidate's
  masked gradient on the reference's dropout-free one, divided by the latter's squared norm,
  is a draw with mean exactly 1; Student's t test holds the draws to it. A backend that forgets
  the 1/(1 - p) rescale has mean 1 - p.
- Dropout only in training. forward and sampling ignore the masks: a candidate session trained
  with dropout, loaded on the reference, gives the reference's forward and greedy samples.
- Masks are deterministic and fresh. The same session state and batch give bit-identical
  forward_backward results twice; two copies of one datum in a batch get different masks, and so
  does the same datum after an optimizer step that leaves the weights as they are (lr = 0).
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from bios import types
from conformance import strategies as cs
from conformance import tolerances as tol
from conformance.harness import Pair, logprobs
from conformance.properties import conformance_property
from conformance.statistics import mean_problem

SEEDS = 10
"""Adapter seeds (independent mask draws) per unbiasedness example."""
_GRADIENT_READOUT = 1e3
"""learning_rate = eps of the Adam step that writes -g·eps/(|g| + eps) into B; far above |g| so
float32 keeps g's relative precision."""

_rates = lambda spec: st.sampled_from([0.25, 0.5])
_loras = lambda spec: st.builds(
    types.LoraConfig, rank=st.sampled_from([2, 4]), target_modules=st.just(cs.MODULES), seed=st.integers(0, 1000)
)
"""Every module adapted, so that each one's masks are exercised in every example; two ranks, so
that a compiling backend builds few programs."""
_GRADIENT_DATA = lambda spec: cs.datum_batches(spec, "cross_entropy", 16, 33, min_batch=16, min_len=16)


def _gradient_of_b(
    pair: Pair, client, data: list[types.Datum]
) -> tuple[types.ForwardBackwardResult, dict[str, np.ndarray]]:
    """(forward_backward's result, the loss gradient of every lora_B) of a fresh session
    `client` on `data`, the gradient read back from the weights one Adam step with
    beta1 = beta2 = 0, eps = learning_rate leaves."""
    result = client.forward_backward(data).result()
    step = types.AdamParams(learning_rate=_GRADIENT_READOUT, beta1=0.0, beta2=0.0, eps=_GRADIENT_READOUT)
    client.optim_step(step).result()
    weights = pair.saved_weights(client.save_state(pair.name("grad")).result().path)
    moved = {k: -w.astype(np.float64) for k, w in weights.items() if k.endswith("lora_B")}
    return result, {k: u * _GRADIENT_READOUT / (_GRADIENT_READOUT - np.abs(u)) for k, u in moved.items()}


@conformance_property(lora=_loras, rate=_rates, data=_GRADIENT_DATA)
def prop_dropout_gradient_is_unbiased(pair: Pair, lora, rate, data) -> None:
    """With LoRA dropout p, the expected gradient over the masks is the dropout-free gradient
    (inverted dropout rescales kept inputs by 1/(1 - p)); the forward_backward logprobs of a fresh
    adapter do not depend on the masks."""
    ratios = []
    for seed in range(lora.seed, lora.seed + SEEDS):
        masked = pair.session(lora.model_copy(update={"seed": seed, "dropout": rate}))
        plain = pair.session(lora.model_copy(update={"seed": seed}), "reference")
        (masked_result, got), (plain_result, free) = (
            _gradient_of_b(pair, masked, data),
            _gradient_of_b(pair, plain, data),
        )
        pair.same_forward(
            "forward_backward of a fresh adapter with dropout",
            masked_result,
            plain_result,
            tol.LOGPROB_ATOL,
            tol.LOSS_RTOL,
            tol.LOSS_ATOL,
        )
        norm = sum(float(np.sum(g * g)) for g in free.values())
        assert norm > 0, "the dropout-free gradient of B is zero: nothing to compare"
        ratios.append(sum(float(np.sum(got[k] * free[k])) for k in free) / norm)
    problem, ratio = mean_problem(ratios, 1.0)
    pair.recorder.note(f"mean masked/free gradient projection at p={rate}", ratio, 1.0)
    assert problem is None, f"dropout {rate}: masked gradients are biased: {problem}"


@conformance_property(
    lora=_loras,
    rate=_rates,
    warm=lambda spec: cs.datum_batches(spec, "cross_entropy", 2, 17, min_len=4),
    probe=lambda spec: cs.datum_batches(spec, "cross_entropy", 3, 17, min_len=4),
    prompt=lambda spec: cs.prompts(spec, 8),
)
def prop_dropout_only_in_training_with_fresh_masks(pair: Pair, lora, rate, warm, probe, prompt) -> None:
    """After a step trained with dropout: forward and greedy sampling equal the reference's on
    the same weights (no masks outside forward_backward); forward_backward is repeatable bit for
    bit, masks differ between two copies of a datum and between optimizer steps, and masked
    logprobs differ from unmasked ones."""
    candidate = pair.session(lora.model_copy(update={"dropout": rate}))
    candidate.train(warm, learning_rate=2e-2)
    path = candidate.save_state(pair.name("drop")).result().path
    reference = pair.reference.create_training_client_from_state_with_optimizer(path)
    pair.same_forward(
        "forward of a dropout adapter vs reference on its weights",
        candidate.forward(probe).result(),
        reference.forward(probe).result(),
        tol.LOGPROB_ATOL,
        tol.LOSS_RTOL,
        tol.LOSS_ATOL,
    )
    greedy = types.SamplingParams(max_tokens=4, temperature=0.0)
    got = candidate.sample(types.ModelInput.from_ints(prompt), greedy).result().sequences[0]
    expected = reference.sample(types.ModelInput.from_ints(prompt), greedy).result().sequences[0]
    pair.close(
        "greedy first-token logprob of a dropout adapter", got.logprobs[:1], expected.logprobs[:1], tol.LOGPROB_ATOL
    )

    twin = pair.candidate.create_training_client_from_state_with_optimizer(path)
    copies = [probe[0], probe[0]]
    first = logprobs(candidate.forward_backward(copies).result())
    again = logprobs(twin.forward_backward(copies).result())
    for i in range(2):
        pair.close(f"masked logprobs of copy {i}, same state twice", again[i], first[i], tol.EXACT)
    unmasked = logprobs(candidate.forward([probe[0]]).result())[0]
    assert not np.array_equal(first[0], first[1]), "two copies of a datum in one batch got the same dropout masks"
    assert not np.array_equal(first[0], unmasked), "forward_backward with dropout gave the unmasked logprobs"
    twin.optim_step(types.AdamParams(learning_rate=0.0)).result()
    later = logprobs(twin.forward_backward([probe[0]]).result())[0]
    assert not np.array_equal(later, first[0]), "the masks did not change with the optimizer step"
