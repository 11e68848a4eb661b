"""Sampling clients: a sampler on a checkpoint or a base model, its samples and logprobs."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response

from bios import wire
from bios.server import ledger
from bios.server.ledger import Bill, Usage
from bios.server.native.requests import submitted
from bios.server.service import Service
from bios.server.state import OwnerDep, ServiceDep, Submission, SubmissionDep

router = APIRouter()


def _submit(
    service: Service,
    who: str,
    how: Submission,
    kind: str,
    sampler_id: str,
    body: wire.SamplerSample | wire.SamplerLogprobs,
    start: Callable[[], concurrent.futures.Future],
    meter: Callable[[Any], Usage],
) -> Response:
    """`who`'s request `kind` on sampler `sampler_id` (NotFoundError if it is not `who`'s),
    started with `start()` unless its idempotency key names an earlier one (`Service.submit`),
    its usage in the ledger by `meter`; answered as `how` asks (`submitted`)."""
    service.check_sampler(who, sampler_id)
    bill = Bill(service.engine.samplers.handle(sampler_id).base_model, None, meter)
    request_id = service.submit(who, kind, body.model_dump_json().encode(), how.key, start, bill=bill)
    return submitted(service, who, request_id, how)


@router.post("/v1/samplers")
def create_sampler(body: wire.CreateSampler, who: OwnerDep, service: ServiceDep) -> wire.Sampler:
    if body.model_path is not None:
        service.readable_checkpoint(who, body.model_path)
    handle = service.engine.create_sampler(model_path=body.model_path, base_model=body.base_model)
    service.add_sampler(
        handle.sampler_id,
        who,
        base_model=None if body.model_path else handle.base_model,
        model_path=body.model_path,
    )
    return wire.Sampler(sampler_id=handle.sampler_id, base_model=handle.base_model)


@router.delete("/v1/samplers/{sampler_id}")
def delete_sampler(sampler_id: str, who: OwnerDep, service: ServiceDep) -> dict:
    service.drop_sampler(who, sampler_id)
    return {}


@router.post("/v1/samplers/{sampler_id}/sample", response_model=wire.Submitted)
def sampler_sample(
    sampler_id: str, body: wire.SamplerSample, who: OwnerDep, service: ServiceDep, how: SubmissionDep
) -> Response:
    start = lambda: service.engine.sampler_sample(
        sampler_id,
        body.prompt,
        body.sampling_params,
        body.num_samples,
        prompt_logprobs=body.prompt_logprobs,
        topk_prompt_logprobs=body.topk_prompt_logprobs,
    )
    return _submit(service, who, how, "sample", sampler_id, body, start, ledger.sampled(body.prompt))


@router.post("/v1/samplers/{sampler_id}/logprobs", response_model=wire.Submitted)
def sampler_logprobs(
    sampler_id: str, body: wire.SamplerLogprobs, who: OwnerDep, service: ServiceDep, how: SubmissionDep
) -> Response:
    start = lambda: service.engine.sampler_logprobs(sampler_id, body.prompt)
    return _submit(service, who, how, "logprobs", sampler_id, body, start, ledger.prefilled(body.prompt))
