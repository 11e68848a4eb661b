"""The pair of services a conformance run compares, and the comparisons it makes.

A `Pair` holds the candidate `bios.ServiceClient` (any backend, by entry-point name or
`module:factory`, or a server by base URL) and the reference `ServiceClient(backend="emulator")`.
Both read the same `BIOS_HOME`, so a checkpoint saved by one is a path the other can load.
Every comparison goes through `Pair.close`, which raises AssertionError past its tolerance and
records the worst deviation (as a fraction of the tolerance) per property.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import bios
from bios import types

DEFAULT_MODEL = "bios/tiny"


@dataclass
class Worst:
    """The largest deviation seen by one property: `ratio` = deviation / allowed (<= 1 passes)."""

    ratio: float = 0.0
    deviation: float = 0.0
    label: str = ""

    def __str__(self) -> str:
        return f"{self.deviation:.2e} {self.label} ({100 * self.ratio:.0f}% of tol)" if self.label else "-"


@dataclass
class Recorder:
    """Worst deviation per property name; `current` is the property being run."""

    current: str = ""
    worst: dict[str, Worst] = field(default_factory=dict)

    def note(self, label: str, deviation: float, allowed: float) -> None:
        """Record a comparison of `label` that deviated by `deviation` where `allowed` was allowed."""
        ratio = deviation / allowed if allowed > 0 else (0.0 if deviation == 0 else float("inf"))
        best = self.worst.setdefault(self.current, Worst())
        if ratio > best.ratio or not best.label:
            best.ratio, best.deviation, best.label = ratio, deviation, label


def model_spec(service: bios.ServiceClient, model: str) -> dict:
    """The strategies' view of `model` on `service`: {"model", "vocab_size", "max_seq_len", "max_lora_rank"}."""
    for info in service.get_server_capabilities().supported_models:
        if info.model_name == model:
            return {
                "model": model,
                "vocab_size": info.vocab_size,
                "max_seq_len": info.max_seq_len,
                "max_lora_rank": info.max_lora_rank,
            }
    raise LookupError(f"model {model!r} is not served")


class Pair:
    """Candidate and reference services on one model.

    backend: the candidate, an entry-point name (`jax`) or `module:factory`; base_url: a server
    instead (then `backend` is ignored). Both services share BIOS_HOME.
    """

    def __init__(
        self,
        backend: str = "emulator",
        model: str = DEFAULT_MODEL,
        base_url: str | None = None,
        backend_options: dict[str, str] | None = None,
    ) -> None:
        self.backend = base_url or backend
        self.candidate = (
            bios.ServiceClient(base_url=base_url)
            if base_url
            else bios.ServiceClient(backend=backend, backend_options=backend_options)
        )
        self.reference = bios.ServiceClient(backend="emulator", backend_options={})
        self.model = model
        self.spec = model_spec(self.reference, model)
        if model_spec(self.candidate, model) != self.spec:
            raise AssertionError(
                f"candidate describes {model} as {model_spec(self.candidate, model)}, the reference as {self.spec}"
            )
        self.recorder = Recorder()
        self._names = 0

    def __repr__(self) -> str:
        return f"Pair({self.backend!r})"

    # ---- sessions -------------------------------------------------------------------------

    def session(self, lora: types.LoraConfig, on: str = "candidate") -> bios.TrainingClient:
        """A fresh session with adapter `lora` on the candidate or the reference."""
        service = self.candidate if on == "candidate" else self.reference
        return service.create_lora_training_client(self.model, lora_config=lora)

    def twins(self, lora: types.LoraConfig) -> tuple[bios.TrainingClient, bios.TrainingClient]:
        """(candidate session, reference session) with the same model and adapter (seed included)."""
        return self.session(lora, "candidate"), self.session(lora, "reference")

    def name(self, prefix: str) -> str:
        """A checkpoint name unique within this run."""
        self._names += 1
        return f"{prefix}-{self._names}"

    # ---- comparisons ----------------------------------------------------------------------

    def close(self, label: str, got: object, expected: object, atol: float, rtol: float = 0.0) -> None:
        """Assert |got - expected| <= atol + rtol·|expected| elementwise (shapes equal)."""
        g, e = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
        assert g.shape == e.shape, f"{label}: shape {g.shape} != reference {e.shape}"
        if g.size == 0:
            return
        allowed = atol + rtol * np.abs(e)
        excess = np.abs(g - e) / np.where(allowed > 0, allowed, np.inf)
        excess = np.where((allowed == 0) & (g != e), np.inf, excess)
        i = int(np.argmax(excess))
        deviation = float(np.abs(g - e).ravel()[i])
        self.recorder.note(label, deviation, float(np.ravel(allowed)[i]))
        assert np.all(np.isfinite(g) == np.isfinite(e)), f"{label}: non-finite values differ: {g} vs {e}"
        assert excess.ravel()[i] <= 1.0, (
            f"{label}: |got - expected| = {deviation:.3e} > {float(np.ravel(allowed)[i]):.1e} at index {i}: "
            f"got {g.ravel()[i]!r}, expected {e.ravel()[i]!r}"
        )

    def same_forward(
        self,
        label: str,
        got: types.ForwardBackwardResult,
        expected: types.ForwardBackwardResult,
        logprob_atol: float,
        loss_rtol: float,
        loss_atol: float,
        elementwise: tuple[float, float] | None = None,
    ) -> None:
        """Compare two forward results: each datum's logprobs [T_i] (and elementwise losses), then
        the loss. The loss is a sum whose terms may cancel (importance ratios up to ~1e4 times
        advantages of both signs), and float32 rounding of a sum scales with the sum of its
        terms' magnitudes, so `loss_rtol` is relative to Σ|expected elementwise loss| (>= |loss|)."""
        assert len(got.loss_fn_outputs) == len(expected.loss_fn_outputs), f"{label}: number of outputs differs"
        magnitude = 0.0
        for i, (g, e) in enumerate(zip(got.loss_fn_outputs, expected.loss_fn_outputs)):
            self.close(f"{label} logprobs[{i}]", g["logprobs"].to_numpy(), e["logprobs"].to_numpy(), logprob_atol)
            if elementwise is not None:
                self.close(
                    f"{label} elementwise_loss[{i}]",
                    g["elementwise_loss"].to_numpy(),
                    e["elementwise_loss"].to_numpy(),
                    *elementwise,
                )
            if "elementwise_loss" in e:
                magnitude += float(np.abs(e["elementwise_loss"].to_numpy()).sum())
        self.close(f"{label} loss", got.loss, expected.loss, loss_atol + loss_rtol * max(magnitude, abs(expected.loss)))

    # ---- checkpoints ----------------------------------------------------------------------

    def saved_weights(self, path: str) -> dict[str, np.ndarray]:
        """LoRA weights of state checkpoint `path` (bios://SESSION/weights/NAME) read from BIOS_HOME
        in either tensor format: {name: array}, shapes as the backend saved them."""
        session, kind, name = path.removeprefix("bios://").split("/")
        directory = Path(self.candidate.config.home) / "checkpoints" / session / kind / name
        if (directory / "adapter.safetensors").exists():
            from safetensors.numpy import load_file

            tensors = load_file(str(directory / "adapter.safetensors"))
        else:
            import orbax.checkpoint as ocp

            checkpointer = ocp.StandardCheckpointer()
            try:
                tensors = {
                    k: np.asarray(v) for k, v in checkpointer.restore(str((directory / "orbax").resolve())).items()
                }
            finally:
                checkpointer.close()
        return {k.removeprefix("weights/"): v for k, v in tensors.items() if k.startswith("weights/")}


def datum(tokens: Sequence[int]) -> types.Datum:
    """Next-token datum over `tokens` [n+1]: input tokens[:-1], targets tokens[1:]."""
    tokens = [int(t) for t in tokens]
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={"target_tokens": tokens[1:]}
    )


def logprobs(result: types.ForwardBackwardResult) -> list[np.ndarray]:
    """Each datum's logprobs [T_i] from a forward result."""
    return [out["logprobs"].to_numpy().astype(np.float64) for out in result.loss_fn_outputs]


def next_token_logprobs(
    client: bios.TrainingClient, prefix: Sequence[int], candidates: Sequence[int], chunk: int = 1024
) -> np.ndarray:
    """log p(candidate | prefix) for each candidate token [C], from `client.forward`: one datum
    per candidate whose last target is that candidate, in chunks of `chunk` data. prefix: [P >= 1]."""
    prefix = [int(t) for t in prefix]
    out: list[float] = []
    for start in range(0, len(candidates), chunk):
        batch = [
            types.Datum(
                model_input=types.ModelInput.from_ints(prefix), loss_fn_inputs={"target_tokens": prefix[1:] + [int(c)]}
            )
            for c in candidates[start : start + chunk]
        ]
        out.extend(lp[-1] for lp in logprobs(client.forward(batch).result()))
    return np.asarray(out, dtype=np.float64)


def continuation_logprobs(client: bios.TrainingClient, prompt: Sequence[int], completion: Sequence[int]) -> np.ndarray:
    """log p(completion[i] | prompt + completion[:i]) for each i [N], from one `forward`."""
    tokens = [int(t) for t in (*prompt, *completion)]
    return logprobs(client.forward([datum(tokens)]).result())[0][len(prompt) - 1 :]


def enable_default_home() -> None:
    """Point BIOS_HOME at a fresh temporary directory unless the caller set one."""
    if not os.environ.get("BIOS_HOME"):
        import tempfile

        os.environ["BIOS_HOME"] = tempfile.mkdtemp(prefix="bios-conformance-")
