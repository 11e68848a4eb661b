"""Every tolerance the conformance suite uses, once, with the reason for its size.

The candidate backend is assumed to compute in float32 (the JAX backend on CPU; bfloat16
backends are out of scope of these numbers) and the reference, the emulator, in float64. A
tolerance is the float32 rounding a correct implementation accumulates on `bios/tiny`-sized
problems (d_model 64, a few layers, sequences up to a few hundred tokens) plus a margin of
roughly 10x; anything larger is a formula being different, not rounding.
"""

from __future__ import annotations

LOGPROB_ATOL = 1e-5
"""Per-token logprobs |lp| up to ~10: float32 has ~6e-8 relative precision, so log-softmax
over a 4096 vocabulary after a few layers lands within ~1e-6 of the float64 value; 1e-5 leaves
a 10x margin while a wrong mask, position or bias moves logprobs by 1e-3 or more."""

LOSS_RTOL = 1e-5
"""Error of a summed loss relative to the sum of its terms' magnitudes (Pair.same_forward): a
sum of up to a few hundred float32 terms, each accurate to ~2e-6 of itself. Relative to the
loss alone it cannot hold: importance-sampling terms up to ~1e4 of both signs can cancel to a
loss of a few units (a correct JAX backend was measured 4.5e-5 off relative to such a loss)."""

LOSS_ATOL = 1e-5
"""Absolute floor for losses near zero (advantages or weights cancelling), where a relative
tolerance is meaningless; same order as one token's logprob error."""

ELEMENTWISE_ATOL = 1e-5
"""Per-token loss terms: a logprob error (LOGPROB_ATOL) times an advantage of order 1, or
exp(lp - q) near a clip threshold; paired with ELEMENTWISE_RTOL for large ratios."""

ELEMENTWISE_RTOL = 1e-4
"""Per-token terms of the importance-sampling losses contain r = exp(lp - q), with q drawn up
to ~9 nats below lp: r up to ~1e4, where a 1e-5 logprob error is a 1e-5 relative error of r;
1e-4 leaves a 10x margin."""

GRAD_NORM_RTOL = 1e-4
"""grad_norm is a sum of squares over ~1e5 float32 coordinates; float32 accumulation of that
many terms is good to ~1e-5 relative. A wrong reduction (mean vs sum) changes it by >2x."""

WEIGHT_ATOL_PER_LR = 1e-2
"""Error of a saved LoRA coordinate after k Adam steps, in units of lr·k (the most k steps
move a coordinate), met by all but WEIGHT_OUTLIER_FRACTION of each tensor's coordinates. The
faults this check exists for move most coordinates of some tensor by a large fraction of lr:
a missing bias correction rescales the first step by (1 - beta1)/sqrt(1 - beta2) (0.3x to
30x), weight decay folded into the gradient turns lora_A's zero first-step gradient into a
full lr step, an uncleared gradient changes the second step's direction. Typical float32
coordinates are off by 1e-5 of lr or less."""

WEIGHT_OUTLIER_FRACTION = 1e-3
"""Share of a tensor's coordinates allowed past WEIGHT_ATOL_PER_LR. Adam's update
m̂/(sqrt(v̂)+eps) does not depend on the gradient's scale, and it is most sensitive where
|g| ≈ eps: there a gradient error δg moves the update by up to δg/(4·eps) of lr. float32
gradients are accurate relative to the largest terms summed into them, so a coordinate whose
terms cancel (an lm_head column of a rare token under importance weights up to 1e4) has an
absolute error far above eps and may step anywhere in [-lr, lr]; on the JAX backend one such
lm_head coordinate stepped 1.8e-2 of lr off the reference (60 drawn examples). Such
coordinates are a sliver of a tensor, so a fraction bounds them without hiding a fault; their
effect on the model is checked through the logprobs after the steps."""

LOGPROB_AFTER_STEP_ATOL = 1e-4
"""Logprobs after k <= 3 optimizer steps at learning rates up to 1e-2: weight errors bounded
of ~1e-5·lr·k per coordinate (and a sliver of coordinates up to lr·k) move logits by at
most ~1e-5 through d_model 64 rank <= 16 products; 1e-4 keeps a margin and still catches a missing bias
correction (a ~3x larger first step) or a wrong learning-rate scale."""

LOSS_AFTER_STEP_RTOL = 1e-4
"""A summed loss after optimizer steps: each token's logprob may be off by
LOGPROB_AFTER_STEP_ATOL against |lp| ~ 8 on the tiny model, i.e. ~1e-5 relative per term."""

LOSS_AFTER_STEP_ATOL = 1e-3
"""Absolute floor for such losses when weights or advantages make them cancel: a hundred
tokens times a 1e-5 typical logprob error."""

SAMPLE_LOGPROB_ATOL = 1e-5
"""A sampled token's returned logprob (S2) is the same float32 log-softmax as `forward`'s."""

EXACT = 0.0
"""Quantities a correct backend reproduces bit for bit on itself: the same seed, a saved and
reloaded state, the rejected-request no-op (compared against a twin on the same backend)."""

KEPT_SET_LOGIT_SLACK = 1e-4
"""Top-k/top-p membership is decided on float32 logits on the candidate and float64 on the
reference: a token whose reference logit lies within this much (in nats, after temperature
scaling) of the kept-set boundary may fall on either side, and is accepted either way."""

KEPT_SET_MASS_SLACK = 1e-5
"""Top-p cumulative mass compared with `top_p`: float32 cumulative sums of up to 4096
probabilities are good to ~1e-6; a boundary token within this mass is accepted either way."""

GREEDY_MARGIN = 1e-4
"""Greedy decoding is compared token for token only while the reference's best logit beats
the runner-up by more than this (nats): closer than that, float32 may legitimately pick the
other one, and the rest of the two sequences diverge."""
