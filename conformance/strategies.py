"""Hypothesis strategies for valid (and deliberately invalid) Bios requests.

Every strategy takes a model spec, a dict with the served model's facts as
`get_server_capabilities()` reports them (`harness.model_spec`):
`{"model": str, "vocab_size": V, "max_seq_len": S, "max_lora_rank": R}`, so that what it draws
is valid by construction for that model: token ids in [0, V), sequences no longer than S,
ranks no larger than R. Sequence lengths are drawn on and around the JAX backend's token
buckets (16, 32, 64) so both padding and bucket changes are exercised.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from bios import TrainingClient, types
from bios.errors import BiosError, InvalidRequestError, NotFoundError

LOSSES = ("cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "gspo")
BUCKET_EDGES = (15, 16, 17, 31, 32, 33, 63, 64, 65)
"""Datum lengths at and either side of the JAX token buckets."""
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
STOP_STRINGS = (" ", "e", "a", "\n", ".", "the", "qzxv")
"""Stop strings for the tiny BPE: single letters and spaces occur in most random completions,
"qzxv" almost never, so stop-by-string and stop-by-length are both exercised."""


def datum_lengths(spec: dict, max_len: int = 65, min_len: int = 1) -> st.SearchStrategy[int]:
    """Input lengths n in [min_len, max_len] (the datum reads n tokens and predicts n targets):
    short, or on a bucket edge."""
    top = min(max_len, spec["max_seq_len"] - 1)
    return st.one_of(
        st.integers(min_len, max(min_len, min(12, top))),
        st.sampled_from([n for n in BUCKET_EDGES if min_len <= n <= top]),
    )


@st.composite
def token_sequences(draw: st.DrawFn, spec: dict, length: int) -> list[int]:
    """`length` token ids in [0, V): drawn from a seed (fast even for long sequences)."""
    seed = draw(st.integers(0, 2**32 - 1))
    return np.random.default_rng(seed).integers(0, spec["vocab_size"], length).tolist()


def _with_zeros(rng: np.random.Generator, values: np.ndarray, zero_fraction: float) -> np.ndarray:
    return np.where(rng.random(values.shape) < zero_fraction, 0.0, values)


@st.composite
def datum_batches(
    draw: st.DrawFn,
    spec: dict,
    loss_fn: str,
    max_batch: int = 5,
    max_len: int = 65,
    *,
    min_batch: int = 1,
    min_len: int = 1,
) -> list[types.Datum]:
    """A batch of min_batch..max_batch data valid for built-in `loss_fn`, each datum [n_i] with
    n_i in [min_len, max_len].

    cross_entropy: weights in [0, 2] with some exact zeros, or omitted (ones).
    Policy losses: sampler logprobs q in [-14, -3] (the tiny model's lp are near -8.3), so the
    ratio exp(lp - q) ranges from ~1e-3 to ~1e2 and PPO/CISPO clip on both sides; advantages
    N(0, 1) with zeros and negatives.
    """
    size = draw(st.integers(min_batch, max_batch))
    lengths = [draw(datum_lengths(spec, max_len, min_len)) for _ in range(size)]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    batch = []
    for n in lengths:
        tokens = rng.integers(0, spec["vocab_size"], n + 1)
        inputs: dict[str, object] = {"target_tokens": tokens[1:]}
        if loss_fn == "cross_entropy":
            if draw(st.booleans()):
                inputs["weights"] = _with_zeros(rng, rng.uniform(0, 2, n), 0.3).astype(np.float32)
        else:
            inputs["logprobs"] = rng.uniform(-14, -3, n).astype(np.float32)
            inputs["advantages"] = _with_zeros(rng, rng.normal(0, 1, n), 0.2).astype(np.float32)
            if loss_fn == "gspo":
                inputs["sequence_ratio_mask"] = (rng.random(n) < 0.7).astype(np.float32)
        batch.append(types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs))
    return batch


def loss_fn_configs(loss_fn: str) -> st.SearchStrategy[dict[str, float] | None]:
    """None (defaults) or a random valid `loss_fn_config` for `loss_fn`."""
    floats = lambda lo, hi: st.floats(lo, hi, allow_nan=False, allow_infinity=False)
    if loss_fn in ("ppo", "cispo", "gspo"):
        config = st.fixed_dictionaries(
            {"clip_low_threshold": floats(0.5, 1.0), "clip_high_threshold": floats(1.0, 2.0)}
        )
    elif loss_fn == "dro":
        config = st.fixed_dictionaries({"beta": floats(0.0, 1.0)})
    else:
        return st.none()
    return st.none() | config


@st.composite
def loss_requests(
    draw: st.DrawFn, spec: dict, max_batch: int = 5
) -> tuple[str, list[types.Datum], dict[str, float] | None]:
    """(loss_fn, data, loss_fn_config) for any built-in loss."""
    loss_fn = draw(st.sampled_from(LOSSES))
    return loss_fn, draw(datum_batches(spec, loss_fn, max_batch)), draw(loss_fn_configs(loss_fn))


def adam_params(max_lr: float = 1e-2) -> st.SearchStrategy[types.AdamParams]:
    """AdamParams with every field drawn within its valid range (learning rate in [1e-4, max_lr])."""
    return st.builds(
        types.AdamParams,
        learning_rate=st.floats(1e-4, max_lr),
        beta1=st.sampled_from([0.0, 0.5, 0.9]),
        beta2=st.sampled_from([0.9, 0.95, 0.999]),
        # eps below float32 gradient noise (e.g. the default 1e-12) turns Adam into sign(g) for
        # near-zero gradients, so rounding differences between backends flip whole steps; the
        # suite compares updates where they are a smooth function of the gradient.
        eps=st.sampled_from([1e-8, 1e-6]),
        weight_decay=st.sampled_from([0.0, 0.01, 0.3]),
        grad_clip_norm=st.sampled_from([0.0, 0.1, 1.0, 100.0]),
    )


@st.composite
def lora_configs(draw: st.DrawFn, spec: dict, max_rank: int = 16) -> types.LoraConfig:
    """A LoraConfig: rank <= min(max_rank, the model's), alpha or default, a non-empty module
    subset (lm_head included sometimes), a seed; dropout stays 0 because masks agree across
    backends only in distribution (docs/losses.md M1)."""
    rank = draw(st.integers(1, min(max_rank, spec["max_lora_rank"])))
    alpha = draw(st.none() | st.sampled_from([1.0, 8.0, 32.0]))
    modules = draw(st.lists(st.sampled_from(MODULES), min_size=1, max_size=4, unique=True))
    return types.LoraConfig(rank=rank, alpha=alpha, target_modules=tuple(modules), seed=draw(st.integers(0, 1000)))


@st.composite
def prompts(draw: st.DrawFn, spec: dict, max_len: int = 20) -> list[int]:
    """A prompt of 1..max_len token ids."""
    return draw(token_sequences(spec, draw(st.integers(1, max_len))))


@st.composite
def sampling_params(
    draw: st.DrawFn, spec: dict, greedy: bool | None = None, max_tokens: int = 12
) -> types.SamplingParams:
    """SamplingParams: greedy or temperature in [0.3, 2]; top_k -1 or 1..64; top_p 1 or
    [0.3, 0.99]; a seed; stop None, token ids (some of them likely), or stop strings that may
    or may not occur. `greedy` forces temperature 0 (True) or > 0 (False)."""
    is_greedy = draw(st.booleans()) if greedy is None else greedy
    stop = draw(
        st.none()
        | st.lists(st.integers(0, spec["vocab_size"] - 1), min_size=1, max_size=3)
        | st.lists(st.sampled_from(STOP_STRINGS), min_size=1, max_size=2, unique=True)
    )
    return types.SamplingParams(
        max_tokens=draw(st.integers(1, max_tokens)),
        temperature=0.0 if is_greedy else draw(st.floats(0.3, 2.0)),
        top_k=draw(st.sampled_from([-1, 1, 2, 5, 64])),
        top_p=draw(st.sampled_from([1.0, 0.99, 0.9, 0.5, 0.3])),
        seed=draw(st.integers(0, 2**31 - 1)),
        stop=stop,
    )


# ---- custom losses ------------------------------------------------------------------------


@dataclass(frozen=True)
class CustomLoss:
    """A differentiable `fn(data, logprobs) -> (loss, metrics)` from a small family, in jax.numpy.

    kind: "linear" Σ c_i·Σ_t lp_i[t]; "square" Σ_i Σ_t (lp_i[t] - c_i)²/100; "logsumexp"
    Σ_i c_i·logsumexp_t(lp_i[t]); "mean" -mean over all tokens of lp (a mean, built from sums).
    `coefficients` c_i per datum (cycled). logprobs[i]: [T_i].
    """

    kind: str
    coefficients: tuple[float, ...]

    def __call__(self, data: list[types.Datum], logprobs: list) -> tuple[object, dict[str, float]]:
        import jax.numpy as jnp
        from jax.scipy.special import logsumexp

        c = [self.coefficients[i % len(self.coefficients)] for i in range(len(logprobs))]
        if self.kind == "linear":
            loss = sum(ci * jnp.sum(lp) for ci, lp in zip(c, logprobs))
        elif self.kind == "square":
            loss = sum(jnp.sum((lp - ci) ** 2) / 100.0 for ci, lp in zip(c, logprobs))
        elif self.kind == "logsumexp":
            loss = sum(ci * logsumexp(lp) for ci, lp in zip(c, logprobs))
        else:
            loss = -sum(jnp.sum(lp) for lp in logprobs) / sum(lp.shape[0] for lp in logprobs)
        return loss, {"tokens": float(sum(lp.shape[0] for lp in logprobs))}


def custom_losses() -> st.SearchStrategy[CustomLoss]:
    """One member of the CustomLoss family with coefficients in [-2, 2] (negative ones included)."""
    return st.builds(
        CustomLoss,
        kind=st.sampled_from(["linear", "square", "logsumexp", "mean"]),
        coefficients=st.lists(st.floats(-2, 2, allow_nan=False).map(lambda x: round(x, 3)), min_size=1, max_size=3).map(
            tuple
        ),
    )


# ---- invalid requests ---------------------------------------------------------------------


@dataclass(frozen=True)
class BadRequest:
    """An invalid request: `submit(training_client)` sends it (and waits); the reference
    raises `error` whose field or message contains `field`. `label` is its one-line repr."""

    label: str
    submit: Callable[[TrainingClient], object]
    error: type[BiosError]
    field: str

    def __repr__(self) -> str:
        return f"BadRequest({self.label})"


def _datum(tokens: list[int], **inputs: object) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={"target_tokens": tokens[1:], **inputs}
    )


_Case = tuple[Callable[[TrainingClient], object], type[BiosError], str]
"""(submit, expected error class, field) of one invalid request in the catalogue."""


def _data_cases(tokens: list[int], bad_token: int, max_seq_len: int) -> dict[str, _Case]:
    """forward_backward requests whose data is invalid: empty, out of vocab, mis-sized, too long."""
    good, n = _datum(tokens), len(tokens) - 1
    return {
        "empty data": (lambda c: c.forward_backward([]).result(), InvalidRequestError, "data"),
        "target out of vocab": (
            lambda c: c.forward_backward([good, _datum(tokens[:-1] + [bad_token])]).result(),
            InvalidRequestError,
            "target_tokens",
        ),
        "input out of vocab": (
            lambda c: c.forward_backward([_datum([bad_token] + tokens)]).result(),
            InvalidRequestError,
            "model_input",
        ),
        "weights wrong length": (
            lambda c: c.forward_backward([_datum(tokens, weights=[1.0] * (n + 1))]).result(),
            InvalidRequestError,
            "weights",
        ),
        "sequence too long": (
            lambda c: c.forward_backward([_datum(list(range(max_seq_len + 2)))]).result(),
            InvalidRequestError,
            "model_input",
        ),
    }


def _loss_cases(tokens: list[int]) -> dict[str, _Case]:
    """forward_backward requests whose loss, its inputs or its config are invalid."""
    good, n = _datum(tokens), len(tokens) - 1
    return {
        "unknown loss": (lambda c: c.forward_backward([good], "hinge").result(), InvalidRequestError, "loss_fn"),
        "ppo without advantages": (
            lambda c: c.forward_backward([_datum(tokens, logprobs=[-1.0] * n)], "ppo").result(),
            InvalidRequestError,
            "advantages",
        ),
        "NaN advantages": (
            lambda c: c.forward_backward(
                [_datum(tokens, logprobs=[-1.0] * n, advantages=[float("nan")] * n)], "cispo"
            ).result(),
            InvalidRequestError,
            "loss_fn_inputs",
        ),
        "unknown loss_fn_config key": (
            lambda c: c.forward_backward(
                [_datum(tokens, logprobs=[-1.0] * n, advantages=[1.0] * n)], "ppo", {"clip": 0.2}
            ).result(),
            InvalidRequestError,
            "loss_fn_config",
        ),
        "clip low above one": (
            lambda c: c.forward_backward(
                [_datum(tokens, logprobs=[-1.0] * n, advantages=[1.0] * n)], "ppo", {"clip_low_threshold": 1.5}
            ).result(),
            InvalidRequestError,
            "clip_low_threshold",
        ),
    }


def _optimizer_cases(tokens: list[int]) -> dict[str, _Case]:
    """optim_step and train requests whose optimizer settings are invalid."""
    good = _datum(tokens)
    return {
        "negative learning rate": (
            lambda c: c.optim_step(types.AdamParams(learning_rate=-1.0)).result(),
            InvalidRequestError,
            "learning_rate",
        ),
        "train with NaN learning rate": (
            lambda c: c.train([good], learning_rate=float("nan")),
            InvalidRequestError,
            "learning_rate",
        ),
        "train with unknown argument": (lambda c: c.train([good], momentum=0.9), InvalidRequestError, "momentum"),
    }


def _sampling_cases(tokens: list[int], bad_token: int) -> dict[str, _Case]:
    """sample requests whose sampling parameters or prompt are invalid."""
    prompt = types.ModelInput.from_ints(tokens)
    return {
        "top_p above one": (
            lambda c: c.sample(prompt, types.SamplingParams(top_p=1.5)).result(),
            InvalidRequestError,
            "top_p",
        ),
        "top_k zero": (
            lambda c: c.sample(prompt, types.SamplingParams(top_k=0)).result(),
            InvalidRequestError,
            "top_k",
        ),
        "zero samples": (
            lambda c: c.sample(prompt, types.SamplingParams(), num_samples=0).result(),
            InvalidRequestError,
            "num_samples",
        ),
        "prompt out of vocab": (
            lambda c: c.sample(types.ModelInput.from_ints([bad_token]), types.SamplingParams()).result(),
            InvalidRequestError,
            "prompt",
        ),
        "empty prompt": (
            lambda c: c.sample(types.ModelInput.empty(), types.SamplingParams()).result(),
            InvalidRequestError,
            "prompt",
        ),
    }


def _checkpoint_cases() -> dict[str, _Case]:
    """load_state and save_state requests naming a missing or malformed checkpoint."""
    return {
        "load missing checkpoint": (
            lambda c: c.load_state("bios://no-such-session/weights/nothing"),
            NotFoundError,
            "path",
        ),
        "load malformed path": (lambda c: c.load_state("/tmp/not-a-bios-path"), InvalidRequestError, "path"),
        "save with bad name": (lambda c: c.save_state("../escape").result(), InvalidRequestError, "name"),
    }


@st.composite
def bad_requests(draw: st.DrawFn, spec: dict) -> BadRequest:
    """One of a catalogue of invalid requests, with random valid parts around the bad one.

    Draws the valid tokens, then the bad token id, then one label of the whole catalogue in
    sorted order: a fixed seed's examples depend on that order."""
    V = spec["vocab_size"]
    tokens = draw(token_sequences(spec, draw(st.integers(3, 20))))
    bad_token = draw(st.sampled_from([V, V + 7, 2**31]))
    cases = {
        **_data_cases(tokens, bad_token, spec["max_seq_len"]),
        **_loss_cases(tokens),
        **_optimizer_cases(tokens),
        **_sampling_cases(tokens, bad_token),
        **_checkpoint_cases(),
    }
    label = draw(st.sampled_from(sorted(cases)))
    submit, error, field = cases[label]
    return BadRequest(label, submit, error, field)
