"""Sampling sessions and `asample`.

A sampling session is a Bios sampler on a saved checkpoint or a bare base model. `/asample`
answers at once with the request id and one sequence id per sample (the SDK asserts both);
the result is a protobuf `SampleResponse`. `(sampling_session_id, seq_id)` is the request's
idempotency key. Prompt logprobs and top-k prompt logprobs are supported (also only the last
N); top-k logprobs of sampled tokens, target-token logprobs and alternative prompt tokens are
not. A sample is not run again after a restart: its poll is answered 410, and the SDK's sampling client submits it anew.
"""

from __future__ import annotations

from functools import partial

from fastapi import APIRouter

from bios.errors import InvalidRequestError, UnsupportedError
from bios.server import ledger
from bios.server.ledger import Bill
from bios.server.tinker import codec
from bios.server.tinker.answers import proto_answer
from bios.server.tinker.bodies import CreateSampler, Sample, model_input, sampling_params
from bios.server.tinker.context import Plan, Tinker, TinkerDep, TinkerOwnerDep
from bios.server.tinker.sessions import Sampler

router = APIRouter()


def unsupported_sampling(body: Sample) -> None:
    """UnsupportedError naming the first requested sampling feature Bios lacks."""
    for name, wanted in (
        ("topk_sample_logprobs", body.topk_sample_logprobs > 0),
        ("target_prompt_logprobs", body.target_prompt_logprobs is not None),
        ("prompt_alt_tokens_k", body.prompt_alt_tokens_k > 0),
    ):
        if wanted:
            raise UnsupportedError(f"{name}: not supported by Bios; ask for prompt_logprobs instead", field=name)
    if body.prompt_logprobs_last_n is not None and (not body.prompt_logprobs or body.prompt_logprobs_last_n < 1):
        raise InvalidRequestError(
            "prompt_logprobs_last_n: must be >= 1 and needs prompt_logprobs", field="prompt_logprobs_last_n"
        )


def _new_sampler(tinker: Tinker, who: str, body: CreateSampler) -> str:
    """A new sampler of `who` on `body.model_path` or `body.base_model`, filed under its
    session at `body.sampling_session_seq_id`; a concurrent retry's sampler if one got there first."""
    engine, service = tinker.engine, tinker.service
    if body.model_path is not None:
        handle = engine.create_sampler(model_path=tinker.readable_path(who, body.model_path))
    else:
        handle = engine.create_sampler(base_model=body.base_model)
    service.add_sampler(handle.sampler_id, who)
    sampler = Sampler(handle.sampler_id, who, body.session_id, handle.base_model, body.model_path)
    sampler_id = tinker.sessions.add_sampler(sampler, body.sampling_session_seq_id)
    if sampler_id != handle.sampler_id:  # a concurrent retry created one first
        service.drop_sampler(who, handle.sampler_id)
    return sampler_id


@router.post("/create_sampling_session")
def create_sampling_session(body: CreateSampler, who: TinkerOwnerDep, tinker: TinkerDep) -> dict:
    """A sampler on `model_path` (a caller's tinker:// checkpoint) or on `base_model`; the
    same (session, sampling_session_seq_id) gets the same sampler."""
    sampler_id = tinker.sessions.sampler_of(who, body.session_id, body.sampling_session_seq_id)
    if sampler_id is None:
        sampler_id = _new_sampler(tinker, who, body)
    return {"type": "create_sampling_session", "sampling_session_id": sampler_id}


@router.get("/samplers/{sampler_id}")
def get_sampler(sampler_id: str, who: TinkerOwnerDep, tinker: TinkerDep) -> dict:
    sampler = tinker.sessions.sampler(who, sampler_id)
    return {"sampler_id": sampler.sampler_id, "base_model": sampler.base_model, "model_path": sampler.model_path}


@router.post("/asample")
def asample(body: Sample, who: TinkerOwnerDep, tinker: TinkerDep) -> dict:
    if body.sampling_session_id is None:
        raise InvalidRequestError("sampling_session_id: sample through a sampling session", field="sampling_session_id")
    sampler = tinker.sessions.sampler(who, body.sampling_session_id)
    unsupported_sampling(body)
    engine = tinker.engine
    prompt, params = model_input(body.prompt), sampling_params(body.sampling_params)
    start = lambda: engine.sampler_sample(
        sampler.sampler_id,
        prompt,
        params,
        body.num_samples,
        prompt_logprobs=bool(body.prompt_logprobs),
        topk_prompt_logprobs=body.topk_prompt_logprobs,
    )
    encode = proto_answer(partial(codec.sample_response, prompt_logprobs_last_n=body.prompt_logprobs_last_n))
    key = None if body.seq_id is None else f"tinker/{sampler.sampler_id}/{body.seq_id}"
    bill = Bill(sampler.base_model, sampler.session_id, ledger.sampled(prompt))
    request_id = tinker.submit(
        Plan(who, "sample", body.model_dump_json().encode(), key, start, encode, bill=bill), None
    )
    return {"request_id": request_id, "sample_sequence_ids": [f"{request_id}:{i}" for i in range(body.num_samples)]}
