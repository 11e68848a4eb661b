"""Every tolerance the conformance suite uses, once, with the reason for its size.

The constants assume a candidate computing in float32 (the JAX backend on CPU) against the
reference, the emulator, in float64. Such a tolerance is the float32 rounding a correct
implementation accumulates on `bios/tiny`-sized problems (d_model 64, a few layers, sequences
up to a few hundred tokens) plus a margin of roughly 10x; anything larger is a formula being
different, not rounding. A bfloat16 candidate is held to the `bf16_*` functions at the end,
derived from bfloat16's unit roundoff and the model's depth.
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


# ---- bfloat16 candidates ------------------------------------------------------------------------
#
# A bfloat16 backend (the JAX backend's `dtype=bfloat16`) stores the base weights in bfloat16 and
# rounds activations to bfloat16 between operations, while LoRA factors, gradients, accumulators
# and optimizer state stay float32 and norms, softmaxes, RoPE and log-softmaxes are computed in
# float32. Against the float64 reference its error is dominated by rounding, and rounding of a
# known size: bfloat16 has an 8-bit significand, so round-to-nearest perturbs each stored value by
# a relative δ with |δ| <= u = 2⁻⁸, spread evenly over [-u, u] (standard deviation u/√3).
#
# Hidden state. A matrix product y = x·W of rounded x and W is off by Σ x_i W_i (δx_i + δW_i): a sum
# of independent signed terms, so its error is about u/√3 relative to y per rounded operand, not
# the worst case n·u. Every layer rounds about BF16_ROUNDINGS_PER_LAYER operands on the residual
# stream's path (the 7 weight matrices and 2 norm scales; the outputs of both norms, q, k and v
# after RoPE, the attention probabilities and output, the o, gate, up and down projections and
# silu·up; the residual sums themselves stay float32), and outside the layers the embedding,
# the final norm and the unembedding round BF16_ROUNDINGS_OUTSIDE more.
# Independent relative errors add in quadrature, so the final hidden state is off relative to its
# size by ε_h(L) = u/√3 · sqrt(20·L + 4) (`bf16_hidden_rtol`; 0.015 for 2 layers, 0.055 for 30).
#
# Logits and logprobs. A relative error ε_h of the hidden state moves every logit by about
# ε_h·σ_z, σ_z the spread (standard deviation over the vocabulary) of the logits. A logprob
# lp_y = z_y - logsumexp(z) moves by δz_y - Σ_v p_v δz_v, at most 2·max_v |δz_v|, and for
# independent δz about one δz. BF16_TAIL standard deviations cover the largest of the ~10³ tokens a
# test compares, hence `bf16_logprob_atol` = BF16_TAIL·ε_h·σ_z. σ_z is the candidate's input: the
# spread of the reference's logits, or of its logprobs of uniformly drawn targets, which estimates it.
#
# Gradients and Adam. The backward pass rounds the cotangents at the same places as the forward
# pass rounds activations, so a gradient is off relative to its size by ε_g = √2·ε_h. Adam's first
# moment is linear and its second quadratic in the gradients: after a few steps they are off by at
# most ε_g and 2·ε_g relative (`bf16_moment_rtol`, 2·ε_g, for both). Adam's update m̂/(√v̂ + eps)
# does not depend on the gradient's scale: where |g| >> |δg| it moves by ~2·ε_g of the step, but a
# coordinate with |g| < |δg| may take its step with the other sign, an error of 2 steps. For
# gradients spread like a Gaussian, a fraction sqrt(2/π)·ε_g of coordinates is that small, so the
# update θ_n - θ_0 of a group of factors is off, relative to its norm, by at most
# sqrt(4·sqrt(2/π)·ε_g) + 2·ε_g (`bf16_update_rtol`): about 0.3 for a 2-layer model. That is large
# because it is a square root, but a coordinate steps at most lr per step whichever way it goes,
# and the logprobs after the steps are held to `bf16_logprob_atol` as well. A bfloat16 LoRA state
# fails it at small learning rates: an update below half a bfloat16 spacing of the factor
# (lr < 2⁻⁹·|A|) is rounded away and A never moves.
#
# Scope. The bounds assume independent, small rounding errors: a well-conditioned input. On real
# weights some inputs are ill-conditioned in any low precision (on SmolLM2-135M one sequence of
# uniformly random token ids moves a logprob by ~3 nats in `transformers`' own bfloat16 too), so
# real models are compared on natural text (uniformly drawn targets are fine: they do not change
# the activations).

BF16_UNIT_ROUNDOFF = 2.0**-8
"""u: the largest relative error of rounding to nearest with bfloat16's 8-bit significand."""

BF16_ROUNDINGS_PER_LAYER = 20
"""Operands rounded to bfloat16 on one decoder layer's path (9 weights, 11 activations; a
qwen2 bias or qwen3 q/k norm adds one or two, within the margin of BF16_TAIL)."""

BF16_ROUNDINGS_OUTSIDE = 4
"""Roundings outside the layers: embedding row, final norm scale and output, unembedding."""

BF16_TAIL = 4.0
"""Standard deviations from the mean error to the largest of ~10³ compared values (a Gaussian
exceeds 4σ with probability 6e-5)."""


def bf16_hidden_rtol(n_layers: int) -> float:
    """ε_h: relative error of the final hidden state of an `n_layers` decoder in bfloat16."""
    roundings = BF16_ROUNDINGS_PER_LAYER * n_layers + BF16_ROUNDINGS_OUTSIDE
    return BF16_UNIT_ROUNDOFF / 3**0.5 * roundings**0.5


def bf16_logprob_atol(n_layers: int, logit_spread: float) -> float:
    """Largest per-token logprob error (nats) for logits of standard deviation `logit_spread`."""
    return BF16_TAIL * bf16_hidden_rtol(n_layers) * logit_spread


def bf16_greedy_margin(n_layers: int, logit_spread: float) -> float:
    """Top-2 logit margin (nats) beyond which bfloat16 greedy decoding must pick the reference's
    token: each of the two logits may move by BF16_TAIL·ε_h·σ_z, in opposite directions."""
    return 2 * bf16_logprob_atol(n_layers, logit_spread)


def bf16_loss_atol(n_layers: int, logit_spread: float, weight_norm: float) -> float:
    """Error of a summed loss Σ w_t·lp_t with ‖w‖₂ = `weight_norm`: independent per-token errors of
    standard deviation ε_h·σ_z add in quadrature, to ε_h·σ_z·‖w‖₂, and BF16_TAIL covers the tail."""
    return BF16_TAIL * bf16_hidden_rtol(n_layers) * logit_spread * weight_norm


def bf16_gradient_rtol(n_layers: int) -> float:
    """ε_g: relative error of the LoRA gradients (forward and backward roundings)."""
    return 2**0.5 * bf16_hidden_rtol(n_layers)


def bf16_moment_rtol(n_layers: int) -> float:
    """Relative (Frobenius) error of Adam's moments of a whole adapter after a few steps."""
    return 2 * bf16_gradient_rtol(n_layers)


def bf16_update_rtol(n_layers: int) -> float:
    """Relative (Frobenius) error of the update θ_n - θ_0 of a group of LoRA factors (all A, or
    all B) after n Adam steps: sign flips of the small-gradient coordinates plus 2·ε_g."""
    eps_g = bf16_gradient_rtol(n_layers)
    return (4 * (2 / 3.141592653589793) ** 0.5 * eps_g) ** 0.5 + 2 * eps_g


# ---- quantities drawn at random -----------------------------------------------------------------
#
# Sampled tokens and dropout masks agree across backends only in distribution, so the suite tests
# them statistically. A correct backend still fails such a test with a small probability, the
# false-alarm rate; each rate below is per test, and a `ci` run makes a few dozen such tests, a
# `thorough` run about a thousand, so a correct backend passes a thorough run with probability
# above 0.999. A run is derandomized in `ci` (the same examples and seeds every time), so a false
# alarm there would repeat on every run rather than flicker; none occurs for the emulator.

FIT_FALSE_ALARM = 1e-6
"""Probability that draws from the right distribution fail the fit test (statistics.fit_problem).
The test compares the counts of N draws over k bins with Pearson's statistic
X² = Σ (observed - expected)² / expected, whose distribution tends to χ² with k - 1 degrees of
freedom; the threshold is that distribution's 1 - FIT_FALSE_ALARM quantile (`fit_threshold`).
The limit is approached from below in the upper tail when every bin expects at least
FIT_MIN_EXPECTED draws (Cochran's rule asks for 5), so the stated rate is an upper bound in
practice. A draw outside the reference's kept set is a certain failure, not a statistical one:
the settings are chosen with every kept token's logit far (>= 10 KEPT_SET_LOGIT_SLACK) from the
top-k boundary and top_p halfway between two cumulative masses, so that float32 cannot move a
token across either."""

FIT_MIN_EXPECTED = 10.0
"""Fewest draws a bin of the fit test may expect; rarer tokens share a bin (statistics.fit_bins)."""

MEAN_FALSE_ALARM = 1e-5
"""Probability that unbiased draws fail the mean test (statistics.mean_problem): Student's
one-sample t statistic of n draws against the known mean, threshold the 1 - MEAN_FALSE_ALARM/2
quantile of t with n - 1 degrees of freedom (`mean_threshold`). The draws are sums of thousands
of independent masked terms, close enough to normal for the t distribution to hold."""


def fit_threshold(degrees_of_freedom: int) -> float:
    """The fit test's threshold: the 1 - FIT_FALSE_ALARM quantile of χ² with that many degrees of freedom."""
    from scipy.stats import chi2

    return float(chi2.isf(FIT_FALSE_ALARM, degrees_of_freedom))


def mean_threshold(draws: int) -> float:
    """The mean test's threshold for `draws` draws: the two-sided 1 - MEAN_FALSE_ALARM quantile of
    Student's t with draws - 1 degrees of freedom."""
    from scipy.stats import t

    return float(t.isf(MEAN_FALSE_ALARM / 2, draws - 1))
