"""`SamplingClient`: completions and logprobs from a frozen adapter snapshot or a base model.

A snapshot never changes: later training of the session it came from does not reach it.
Each work method has an `*_async` twin that awaits the result without blocking the caller's
event loop.
"""

from __future__ import annotations

import concurrent.futures
import weakref
from collections.abc import Awaitable, Callable
from typing import Concatenate, ParamSpec

from bios.futures import BiosFuture, ReadyClient, pinned
from bios.handles import SamplerHandle
from bios.retry import call_with_retries, retrying, retrying_async
from bios.tokenizer import Tokenizer
from bios.transport import Transport
from bios.types import ModelInput, SampleResult, SamplingParams

P = ParamSpec("P")
Future = concurrent.futures.Future


def in_either_order(sampling_params: SamplingParams | int, num_samples: int | SamplingParams) -> tuple:
    """(sampling_params, num_samples), given in Bios's order or swapped, as the tinker SDK's
    positional `sample(prompt, num_samples, sampling_params)` passes them. Anything else is
    returned as it came, for validation to name."""
    if isinstance(num_samples, SamplingParams) and isinstance(sampling_params, int):
        return num_samples, sampling_params
    return sampling_params, num_samples


class SamplingClient(ReadyClient):
    """Samples from one fixed set of weights. Create it with `ServiceClient.create_sampling_client`
    or `TrainingClient.save_weights_and_get_sampling_client`."""

    def __init__(self, transport: Transport, handle: SamplerHandle) -> None:
        self._transport = transport
        self._handle = handle
        self.base_model = handle.base_model
        # When this client is garbage, the service may free the snapshot it samples from.
        weakref.finalize(self, transport.release_sampler, handle.sampler_id)

    def sample(
        self,
        prompt: ModelInput,
        sampling_params: SamplingParams,
        num_samples: int = 1,
        include_prompt_logprobs: bool = False,
    ) -> BiosFuture[SampleResult]:
        """`num_samples` completions of `prompt` (docs/losses.md S1–S3).

        With `include_prompt_logprobs`, the result's `prompt_logprobs[t]` is log p(prompt[t] | prompt[:t]).
        The tinker SDK's positional order, `sample(prompt, num_samples, sampling_params)`, is
        accepted too.
        """
        sampling_params, num_samples = in_either_order(sampling_params, num_samples)
        future = self._send(
            "sample",
            self._transport.sampler_sample,
            prompt,
            sampling_params,
            num_samples,
            prompt_logprobs=include_prompt_logprobs,
        )
        return BiosFuture(pinned(future, self), "sample")

    async def sample_async(
        self,
        prompt: ModelInput,
        sampling_params: SamplingParams,
        num_samples: int = 1,
        include_prompt_logprobs: bool = False,
    ) -> SampleResult:
        t = self._transport
        sampling_params, num_samples = in_either_order(sampling_params, num_samples)
        future = await self._send_async(
            "sample",
            t.sampler_sample,
            t.sampler_sample_async,
            prompt,
            sampling_params,
            num_samples,
            prompt_logprobs=include_prompt_logprobs,
        )
        return await BiosFuture(pinned(future, self), "sample")

    def compute_logprobs(self, prompt: ModelInput) -> BiosFuture[list[float | None]]:
        """log p(prompt[t] | prompt[:t]) for every t; None for t = 0. Equals `forward`'s logprobs."""
        future = self._send("compute_logprobs", self._transport.sampler_logprobs, prompt)
        return BiosFuture(pinned(future, self), "compute_logprobs")

    async def compute_logprobs_async(self, prompt: ModelInput) -> list[float | None]:
        t = self._transport
        future = await self._send_async("compute_logprobs", t.sampler_logprobs, t.sampler_logprobs_async, prompt)
        return await BiosFuture(pinned(future, self), "compute_logprobs")

    def get_tokenizer(self) -> Tokenizer:
        """The base model's tokenizer."""
        transport = self._transport
        return call_with_retries(lambda: transport.tokenizer(self.base_model), "get_tokenizer", lambda: transport.clock)

    def __repr__(self) -> str:
        return f"SamplingClient(sampler_id={self._handle.sampler_id!r}, base_model={self.base_model!r})"

    def _send(
        self, label: str, call: Callable[Concatenate[str, P], Future], *args: P.args, **kwargs: P.kwargs
    ) -> Future:
        """The request `call(sampler_id, *args, **kwargs)`, retried per the retry contract (bios.retry)."""
        sampler_id = self._handle.sampler_id
        return retrying(lambda: call(sampler_id, *args, **kwargs), self._transport.clock, label)

    async def _send_async(
        self,
        label: str,
        call: Callable[Concatenate[str, P], Future],
        call_async: Callable[Concatenate[str, P], Awaitable[Future]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> Future:
        """`_send`, awaiting `call_async` (the same request, as a coroutine) to submit it."""
        sampler_id = self._handle.sampler_id
        return await retrying_async(
            lambda: call_async(sampler_id, *args, **kwargs),
            lambda: call(sampler_id, *args, **kwargs),
            self._transport.clock,
            label,
        )
