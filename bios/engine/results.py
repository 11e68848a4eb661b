"""Backend outputs and catalog specs turned into the public result types the clients receive."""

from __future__ import annotations

import numpy as np

from bios.backend import ForwardBackwardOutput, SampleOutput
from bios.catalog import ModelSpec
from bios.types import ForwardBackwardResult, ModelInfo, SampledSequence, SampleResult, TensorData


def model_info(spec: ModelSpec) -> ModelInfo:
    """What the capabilities say about `spec`."""
    return ModelInfo(
        model_name=spec.name,
        architecture=spec.architecture,
        vocab_size=spec.vocab_size,
        d_model=spec.d_model,
        n_layers=spec.n_layers,
        n_heads=spec.n_heads,
        n_kv_heads=spec.n_kv_heads,
        max_seq_len=spec.max_seq_len,
        n_params=spec.n_params,
        max_lora_rank=spec.max_lora_rank,
        random_init=spec.random_init,
        description=spec.description,
    )


def forward_result(output: ForwardBackwardOutput) -> ForwardBackwardResult:
    """The loss, per-datum float32 logprobs and elementwise losses, and metrics of `output`."""
    return ForwardBackwardResult(
        loss=float(output.loss),
        loss_fn_outputs=[
            {
                "logprobs": TensorData.from_numpy(np.asarray(lp, dtype=np.float32)),
                "elementwise_loss": TensorData.from_numpy(np.asarray(el, dtype=np.float32)),
            }
            for lp, el in zip(output.logprobs, output.elementwise_loss, strict=True)
        ],
        metrics={k: float(v) for k, v in output.metrics.items()},
    )


def sample_result(output: SampleOutput) -> SampleResult:
    """The sequences of `output`, its prompt logprobs and top-k prompt logprobs (None for the
    first token)."""
    prompt_lp = topk = None
    if output.prompt_logprobs is not None:
        prompt_lp = [None if i == 0 else float(x) for i, x in enumerate(output.prompt_logprobs)]
    if output.topk_prompt is not None:
        ids, lps = output.topk_prompt
        rows = [list(zip(map(int, i), map(float, lp), strict=True)) for i, lp in zip(ids, lps, strict=True)]
        topk = [None, *rows]
    return SampleResult(
        sequences=[
            SampledSequence(
                tokens=[int(t) for t in s.tokens],
                logprobs=[float(x) for x in s.logprobs],
                stop_reason=s.stop_reason,
            )
            for s in output.sequences
        ],
        prompt_logprobs=prompt_lp,
        topk_prompt_logprobs=topk,
    )


def prompt_logprobs(output: ForwardBackwardOutput) -> list[float | None]:
    """log p(prompt[t] | prompt[:t]) from a forward over the prompt's next-token targets; None for t = 0."""
    return [None, *(float(x) for x in output.logprobs[0])]
