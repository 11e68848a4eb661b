"""`SamplingClient`: completions and logprobs from a frozen adapter snapshot or a base model.

A snapshot never changes: later training of the session it came from does not reach it.
"""

from __future__ import annotations

import weakref

from bios.futures import BiosFuture, pinned
from bios.handles import SamplerHandle
from bios.retry import call_with_retries, retrying
from bios.tokenizer import Tokenizer
from bios.transport import Transport
from bios.types import ModelInput, SampleResult, SamplingParams


class SamplingClient:
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
        """
        sampler_id = self._handle.sampler_id
        future = retrying(
            lambda: self._transport.sampler_sample(
                sampler_id, prompt, sampling_params, num_samples, prompt_logprobs=include_prompt_logprobs
            ),
            self._transport.clock,
            "sample",
        )
        return BiosFuture(pinned(future, self), "sample")

    async def sample_async(
        self,
        prompt: ModelInput,
        sampling_params: SamplingParams,
        num_samples: int = 1,
        include_prompt_logprobs: bool = False,
    ) -> SampleResult:
        return await self.sample(prompt, sampling_params, num_samples, include_prompt_logprobs)

    def compute_logprobs(self, prompt: ModelInput) -> BiosFuture[list[float | None]]:
        """log p(prompt[t] | prompt[:t]) for every t; None for t = 0. Equals `forward`'s logprobs."""
        sampler_id = self._handle.sampler_id
        future = retrying(
            lambda: self._transport.sampler_logprobs(sampler_id, prompt), self._transport.clock, "compute_logprobs"
        )
        return BiosFuture(pinned(future, self), "compute_logprobs")

    async def compute_logprobs_async(self, prompt: ModelInput) -> list[float | None]:
        return await self.compute_logprobs(prompt)

    def get_tokenizer(self) -> Tokenizer:
        """The base model's tokenizer."""
        transport = self._transport
        return call_with_retries(lambda: transport.tokenizer(self.base_model), "get_tokenizer", lambda: transport.clock)

    def __repr__(self) -> str:
        return f"SamplingClient(sampler_id={self._handle.sampler_id!r}, base_model={self.base_model!r})"
