"""What one request asks of the simulated device: its pass group, tokens, memory and time."""

from __future__ import annotations

from collections.abc import Mapping

from bios.backend import AdapterSpec, ForwardBackwardWork, OptimStepWork, SampleOutput, SampleWork
from bios.errors import InvalidRequestError
from emulator.simulator.costs import CostModel

_GIB = 2**30


def footprint(work: object, costs: CostModel) -> tuple[str, int, float, int]:
    """(pass group, tokens, device memory in bytes, sampling rows) of one work item."""
    if isinstance(work, ForwardBackwardWork):
        lengths = [len(t) for t in work.tokens]
        return "train", sum(lengths), costs.training_memory_bytes(lengths), 0
    if isinstance(work, SampleWork):
        tokens = len(work.prompt) + work.num_samples * work.max_tokens
        return (
            "sample",
            tokens,
            costs.sample_memory_bytes(len(work.prompt), work.num_samples, work.max_tokens),
            work.num_samples,
        )
    return "train", 0, 0.0, 0


def check_fits(kind: str, tokens: int, memory: float, costs: CostModel, limit: int | None) -> None:
    """InvalidRequestError naming the field when a request this big could never run on the deployment."""
    field = "data" if kind == "forward_backward" else "sampling_params.max_tokens"
    if limit is not None and tokens > limit:
        raise InvalidRequestError(
            f"{field}: this request has {tokens} tokens but one pass of the simulated deployment holds "
            f"{limit} (max_batch_tokens); split it into smaller requests",
            field=field,
        )
    if memory > costs.free_memory_bytes:
        raise InvalidRequestError(
            f"{field}: this request needs {memory / _GIB:.1f} GiB of device memory but {costs.describe()} has "
            f"{max(costs.free_memory_bytes, 0) / _GIB:.1f} GiB free "
            "after the weights; send fewer or shorter sequences",
            field=field,
        )


def device_seconds(
    work: object, output: object, costs: CostModel, adapters: Mapping[str, AdapterSpec], batch_rows: int
) -> float:
    """Seconds `work` keeps the device group busy (a sample decodes as long as its longest completion)."""
    if isinstance(work, ForwardBackwardWork):
        spec = adapters.get(work.adapter_id or "")
        rank, modules = (spec.rank, spec.target_modules) if spec is not None else (0, ())
        return costs.forward_backward_s([len(t) for t in work.tokens], rank, modules, work.backward)
    if isinstance(work, OptimStepWork):
        spec = adapters[work.adapter_id]
        return costs.optim_step_s(costs.adapter_params(spec.rank, spec.target_modules))
    if isinstance(work, SampleWork):
        generated = (
            max((len(s.tokens) for s in output.sequences), default=0)
            if isinstance(output, SampleOutput)
            else work.max_tokens
        )
        return costs.sample_s(len(work.prompt), work.num_samples, generated, batch_rows)
    return 0.0
