"""`SamplingClient`: completions and logprobs from a frozen adapter snapshot or a base model.

A snapshot never changes: later training of the session it came from does not reach it.
Each work method has an `*_async` twin that awaits the result without blocking the caller's
event loop.
"""

from __future__ import annotations

import concurrent.futures
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Concatenate, ParamSpec

from bios.errors import InvalidRequestError
from bios.futures import BiosFuture, ReadyClient, TimedFuture, pinned
from bios.handles import SamplerHandle
from bios.retry import call_with_retries, retrying, retrying_async
from bios.tokenizer import Tokenizer
from bios.transport import Transport
from bios.types import ModelInput, SampleResult, SamplingParams

P = ParamSpec("P")
Future = concurrent.futures.Future


def in_either_order(sampling_params: SamplingParams | int, num_samples: int | SamplingParams) -> tuple:
    """(sampling_params, num_samples), given in Bios's order or swapped, as the tinker SDK's
    positional `sample(prompt, num_samples, sampling_params)` passes them (its sampling params
    Bios's or the SDK's own). Anything else is returned as it came, for validation to name."""
    if isinstance(sampling_params, int) and not isinstance(num_samples, int):
        return num_samples, sampling_params
    return sampling_params, num_samples


def _last_n(last_n: object, prompt_logprobs: bool) -> int | None:
    """A checked `prompt_logprobs_last_n`: None, or an int >= 1 with prompt logprobs asked for
    (it then applies to top-k prompt logprobs too)."""
    if last_n is None:
        return None
    if isinstance(last_n, bool) or not isinstance(last_n, int) or last_n < 1 or not prompt_logprobs:
        raise InvalidRequestError(
            f"prompt_logprobs_last_n: expected an int >= 1 with include_prompt_logprobs=True, got {last_n!r}",
            field="prompt_logprobs_last_n",
        )
    return last_n


def _topk(k: object) -> int:
    """A `topk_prompt_logprobs` of the right type (its upper bound is the service's to check)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise InvalidRequestError(
            f"topk_prompt_logprobs: expected 0 (none) or a positive int, got {k!r}", field="topk_prompt_logprobs"
        )
    return k


def _scoring_last(logprobs: list[float | None], last_n: int) -> list[float | None]:
    """`logprobs` with all but the last `last_n` entries None."""
    cut = max(len(logprobs) - last_n, 0)
    return [None] * cut + logprobs[cut:]


def _sample_scoring_last(result: SampleResult, last_n: int) -> SampleResult:
    """`result` with its prompt logprobs and top-k prompt logprobs kept for the last `last_n`
    prompt positions only."""
    kept = {
        name: _scoring_last(value, last_n)
        for name in ("prompt_logprobs", "topk_prompt_logprobs")
        if (value := getattr(result, name)) is not None
    }
    return result.model_copy(update=kept)


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
        topk_prompt_logprobs: int = 0,
        *,
        prompt_logprobs_last_n: int | None = None,
    ) -> BiosFuture[SampleResult]:
        """`num_samples` completions of `prompt` (docs/losses.md S1–S3).

        With `include_prompt_logprobs`, the result's `prompt_logprobs[t]` is log p(prompt[t] | prompt[:t]);
        with `topk_prompt_logprobs` k > 0, its `topk_prompt_logprobs[t]` is the k most likely
        `(token, logprob)` after prompt[:t]; with `prompt_logprobs_last_n` too, only the last
        that many positions are given (earlier ones None) of both.
        The tinker SDK's positional order, `sample(prompt, num_samples, sampling_params)`, is
        accepted too.
        """
        sampling_params, num_samples = in_either_order(sampling_params, num_samples)
        topk = _topk(topk_prompt_logprobs)
        last_n = _last_n(prompt_logprobs_last_n, include_prompt_logprobs)
        future = self._send(
            "sample",
            self._transport.sampler_sample,
            prompt,
            sampling_params,
            num_samples,
            prompt_logprobs=include_prompt_logprobs,
            topk_prompt_logprobs=topk,
        )
        return BiosFuture(pinned(self._keeping_last(future, last_n, _sample_scoring_last), self), "sample")

    async def sample_async(
        self,
        prompt: ModelInput,
        sampling_params: SamplingParams,
        num_samples: int = 1,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
        *,
        prompt_logprobs_last_n: int | None = None,
    ) -> SampleResult:
        t = self._transport
        sampling_params, num_samples = in_either_order(sampling_params, num_samples)
        topk = _topk(topk_prompt_logprobs)
        last_n = _last_n(prompt_logprobs_last_n, include_prompt_logprobs)
        future = await self._send_async(
            "sample",
            t.sampler_sample,
            t.sampler_sample_async,
            prompt,
            sampling_params,
            num_samples,
            prompt_logprobs=include_prompt_logprobs,
            topk_prompt_logprobs=topk,
        )
        return await BiosFuture(pinned(self._keeping_last(future, last_n, _sample_scoring_last), self), "sample")

    def compute_logprobs(
        self, prompt: ModelInput, prompt_logprobs_last_n: int | None = None
    ) -> BiosFuture[list[float | None]]:
        """log p(prompt[t] | prompt[:t]) for every t; None for t = 0. Equals `forward`'s logprobs.
        With `prompt_logprobs_last_n`, only the last that many are given (earlier ones None)."""
        last_n = _last_n(prompt_logprobs_last_n, True)
        future = self._send("compute_logprobs", self._transport.sampler_logprobs, prompt)
        return BiosFuture(pinned(self._keeping_last(future, last_n, _scoring_last), self), "compute_logprobs")

    async def compute_logprobs_async(
        self, prompt: ModelInput, prompt_logprobs_last_n: int | None = None
    ) -> list[float | None]:
        t = self._transport
        last_n = _last_n(prompt_logprobs_last_n, True)
        future = await self._send_async("compute_logprobs", t.sampler_logprobs, t.sampler_logprobs_async, prompt)
        return await BiosFuture(pinned(self._keeping_last(future, last_n, _scoring_last), self), "compute_logprobs")

    def _keeping_last(self, future: Future, last_n: int | None, keep: Callable[[Any, int], Any]) -> Future:
        """`future`, or (with `last_n`) a future of `keep(its result, last_n)` that carries its
        timing, so that waiting on it moves a simulated clock as waiting on `future` would."""
        if last_n is None:
            return future
        kept = TimedFuture(self._transport.clock)

        def copy(done: Future) -> None:
            kept.timing = getattr(done, "timing", None)
            if done.cancelled():
                kept.cancel()
            elif (error := done.exception()) is not None:
                kept.set_exception(error)
            else:
                kept.set_result(keep(done.result(), last_n))

        future.add_done_callback(copy)
        return kept

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
