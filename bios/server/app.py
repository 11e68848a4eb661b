"""The HTTP routes of `bios serve` (FastAPI): one route per client operation, see `bios.wire`.

Synchronous routes run in FastAPI's thread pool and call the engine; long-polls are coroutines
on the event loop, so thousands of waiting clients hold no thread. Every error is a `BiosError`
answered with its status and `{"error": {...}}`; request bodies over `max_body_bytes` get 413.
The OpenAPI schema is at /openapi.json (and browsable at /docs).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from bios import wire
from bios.clock import attempt
from bios.errors import BiosError, InvalidRequestError, NotFoundError, RequestTooLargeError
from bios.server.auth import KeyRing, bearer
from bios.server.service import Service, encode_result
from bios.server.tinker import tinker_router
from bios.types import StateResult, TrainingInfo

JSON = "application/json"


def create_app(
    service: Service, keys: KeyRing, *, max_body_bytes: int = 64 << 20, prune_every_s: float = 60.0
) -> FastAPI:
    """The application serving `service` to the holders of `keys`."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        service.attach(asyncio.get_running_loop())

        async def prune() -> None:
            while True:
                await asyncio.sleep(prune_every_s)
                await asyncio.to_thread(service.prune)

        pruner = asyncio.create_task(prune())
        try:
            yield
        finally:
            pruner.cancel()

    app = FastAPI(title="Bios", version="1", lifespan=lifespan)
    app.add_middleware(AttemptNumbers)
    engine = service.engine

    @app.exception_handler(BiosError)
    async def bios_error(_request: Request, exc: BiosError) -> JSONResponse:
        retry_after = getattr(exc, "retry_after", None)
        headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else None
        return JSONResponse({"error": exc.to_dict()}, status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first.get("loc", ())[1:]).lstrip(".")
        error = InvalidRequestError(f"{where or 'body'}: {first.get('msg', 'invalid value')}", field=where or "body")
        return JSONResponse({"error": error.to_dict()}, status_code=400)

    @app.middleware("http")
    async def limit_body(request: Request, call_next: Callable) -> Response:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            error = RequestTooLargeError(
                f"body: {int(length)} bytes exceed this server's limit of {max_body_bytes} bytes; send smaller batches",
                field="body",
            )
            return JSONResponse({"error": error.to_dict()}, status_code=413)
        return await call_next(request)

    # Dependencies and trivial routes are coroutines: they run on the event loop, never waiting
    # for a worker thread behind slow synchronous routes.
    async def owner(authorization: str | None = Header(None)) -> str:
        return keys.authenticate(bearer(authorization))

    async def key(idempotency_key: str | None = Header(None)) -> str | None:
        return idempotency_key

    def submitted(request_id: str) -> wire.Submitted:
        return wire.Submitted(request_id=request_id)

    # ---- discovery ----------------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/v1/stats")
    def stats(who: str = Depends(owner)) -> dict:
        """Engine counters: backend calls made and jobs (requests) they ran, since start."""
        return {
            "backend_calls": engine.scheduler.backend_calls,
            "jobs_run": engine.scheduler.jobs_run,
            "retried_attempts_by_status": {str(k): v for k, v in sorted(service.notices_served.items())},
        }

    @app.get("/v1/capabilities")
    def capabilities(who: str = Depends(owner)):
        return engine.capabilities()

    @app.get("/v1/tokenizers/{base_model:path}")
    def tokenizer(base_model: str, who: str = Depends(owner)) -> dict:
        """The base model's tokenizer as `{"tokenizer_json", "config", "name_or_path"}`."""
        return engine.tokenizer(base_model).to_wire()

    # ---- sessions -----------------------------------------------------------------------------

    def opened(who: str, info: TrainingInfo) -> TrainingInfo:
        service.add_session(info.session_id, who, info.base_model)
        return info

    @app.post("/v1/sessions", response_model=TrainingInfo)
    def create_session(body: wire.CreateSession, who: str = Depends(owner)) -> TrainingInfo:
        return opened(who, engine.create_session(body.base_model, body.lora_config))

    @app.post("/v1/sessions/from_state", response_model=TrainingInfo)
    def session_from_state(body: wire.SessionFromState, who: str = Depends(owner)) -> TrainingInfo:
        if not body.path.startswith("bios://"):
            raise InvalidRequestError(
                f"path {body.path!r}: a server resumes only from its own checkpoints (bios://SESSION/weights/NAME); "
                "load a local PEFT adapter with an in-process client",
                field="path",
            )
        service.check_checkpoint(who, body.path)
        return opened(who, engine.create_session_from_state(body.path, body.base_model))

    @app.get("/v1/sessions/{session_id}", response_model=TrainingInfo)
    def session_info(session_id: str, who: str = Depends(owner)) -> TrainingInfo:
        return engine.session_info(service.check_session(who, session_id))

    @app.delete("/v1/sessions/{session_id}")
    def close_session(session_id: str, who: str = Depends(owner)) -> dict:
        service.close_session(who, session_id)
        return {}

    @app.get("/v1/sessions/{session_id}/next_seq")
    def next_seq(session_id: str, who: str = Depends(owner)) -> wire.NextSeq:
        return wire.NextSeq(next_seq=engine.next_seq(service.check_session(who, session_id)))

    @app.post("/v1/sessions/{session_id}/skip")
    def skip(session_id: str, body: wire.Ordered, who: str = Depends(owner)) -> dict:
        engine.skip(service.check_session(who, session_id), body.seq)
        return {}

    def ordered(
        who: str, idem: str | None, kind: str, session_id: str, body: wire.Ordered, start: Callable, **durability
    ) -> wire.Submitted:
        service.check_session(who, session_id)
        raw = body.model_dump_json().encode()
        return submitted(service.submit(who, kind, raw, idem, start, session_id=session_id, seq=body.seq, **durability))

    def durable(session_id: str, seq: int) -> dict:
        """Submit options of a request that changes the adapter and returns (result, state)."""
        return {"record": service.durable_recorder(session_id, seq), "encode": lambda done: encode_result(done.result)}

    @app.post("/v1/sessions/{session_id}/forward_backward")
    def forward_backward(
        session_id: str, body: wire.ForwardBackward, who: str = Depends(owner), idem: str | None = Depends(key)
    ) -> wire.Submitted:
        return ordered(
            who,
            idem,
            "forward_backward",
            session_id,
            body,
            lambda: engine.forward_backward(
                session_id, body.seq, body.data, body.loss_fn, body.loss_fn_config, backward=body.backward
            ),
            replay=body.model_dump_json().encode() if body.backward else None,
        )

    @app.post("/v1/sessions/{session_id}/optim_step")
    def optim_step(
        session_id: str, body: wire.OptimStep, who: str = Depends(owner), idem: str | None = Depends(key)
    ) -> wire.Submitted:
        return ordered(
            who,
            idem,
            "optim_step",
            session_id,
            body,
            lambda: engine.optim_step_and_export(session_id, body.seq, body.adam_params),
            **durable(session_id, body.seq),
        )

    @app.post("/v1/sessions/{session_id}/sample")
    def session_sample(
        session_id: str, body: wire.SessionSample, who: str = Depends(owner), idem: str | None = Depends(key)
    ) -> wire.Submitted:
        return ordered(
            who,
            idem,
            "sample",
            session_id,
            body,
            lambda: engine.sample(session_id, body.seq, body.prompt, body.sampling_params, body.num_samples),
        )

    @app.post("/v1/sessions/{session_id}/save_state")
    def save_state(
        session_id: str, body: wire.SaveState, who: str = Depends(owner), idem: str | None = Depends(key)
    ) -> wire.Submitted:
        return ordered(
            who,
            idem,
            "save_state",
            session_id,
            body,
            lambda: engine.save_state(session_id, body.seq, body.name, body.metadata, body.kind),
            record=service.checkpoint_recorder(who, session_id),
        )

    @app.post("/v1/sessions/{session_id}/load_state")
    def load_state(
        session_id: str, body: wire.LoadState, who: str = Depends(owner), idem: str | None = Depends(key)
    ) -> wire.Submitted:
        service.check_session(who, session_id)
        service.check_checkpoint(who, body.path)
        return ordered(
            who,
            idem,
            "load_state",
            session_id,
            body,
            lambda: engine.load_state_and_export(session_id, body.seq, body.path),
            **durable(session_id, body.seq),
        )

    # ---- sampling clients ---------------------------------------------------------------------

    @app.post("/v1/samplers")
    def create_sampler(body: wire.CreateSampler, who: str = Depends(owner)) -> wire.Sampler:
        if body.model_path is not None:
            service.check_checkpoint(who, body.model_path)
        handle = engine.create_sampler(model_path=body.model_path, base_model=body.base_model)
        service.add_sampler(
            handle.sampler_id,
            who,
            base_model=None if body.model_path else handle.base_model,
            model_path=body.model_path,
        )
        return wire.Sampler(sampler_id=handle.sampler_id, base_model=handle.base_model)

    @app.delete("/v1/samplers/{sampler_id}")
    def delete_sampler(sampler_id: str, who: str = Depends(owner)) -> dict:
        service.drop_sampler(who, sampler_id)
        return {}

    @app.post("/v1/samplers/{sampler_id}/sample")
    def sampler_sample(
        sampler_id: str, body: wire.SamplerSample, who: str = Depends(owner), idem: str | None = Depends(key)
    ) -> wire.Submitted:
        service.check_sampler(who, sampler_id)
        return submitted(
            service.submit(
                who,
                "sample",
                body.model_dump_json().encode(),
                idem,
                lambda: engine.sampler_sample(
                    sampler_id,
                    body.prompt,
                    body.sampling_params,
                    body.num_samples,
                    prompt_logprobs=body.prompt_logprobs,
                ),
            )
        )

    @app.post("/v1/samplers/{sampler_id}/logprobs")
    def sampler_logprobs(
        sampler_id: str, body: wire.SamplerLogprobs, who: str = Depends(owner), idem: str | None = Depends(key)
    ) -> wire.Submitted:
        service.check_sampler(who, sampler_id)
        return submitted(
            service.submit(
                who,
                "logprobs",
                body.model_dump_json().encode(),
                idem,
                lambda: engine.sampler_logprobs(sampler_id, body.prompt),
            )
        )

    # ---- requests -----------------------------------------------------------------------------

    @app.get("/v1/requests/{request_id}")
    async def request_answer(request_id: str, wait: float = Query(0.0, ge=0.0), who: str = Depends(owner)) -> Response:
        """The request's answer envelope; 408 while it is still running after `wait` seconds."""
        found = await service.wait(who, request_id, min(wait, wire.MAX_WAIT_S))
        if found is not None and not found.startswith(b"{"):  # a request of the Tinker protocol, answered there
            raise NotFoundError(f"request_id: no request {request_id!r}", field="request_id")
        if found is None:
            return JSONResponse({"status": "pending", "request_id": request_id}, status_code=408)
        return Response(found, media_type=JSON)

    # ---- checkpoints --------------------------------------------------------------------------

    @app.get("/v1/checkpoints", response_model=list[StateResult])
    def list_checkpoints(session_id: str | None = None, who: str = Depends(owner)) -> list[StateResult]:
        if session_id is not None:
            service.check_session(who, session_id)
        return service.owned_checkpoints(who, engine.list_checkpoints(session_id))

    @app.delete("/v1/checkpoints")
    def delete_checkpoint(path: str, who: str = Depends(owner)) -> dict:
        engine.delete_checkpoint(service.check_checkpoint(who, path))
        service.records.remove_checkpoint(path)
        return {}

    app.include_router(tinker_router(service, keys))  # the official Tinker SDK's /api/v1 protocol
    return app


class AttemptNumbers:
    """ASGI middleware: a request carrying `Bios-Attempt: n` (a client's n-th try of one request)
    submits its work as attempt n (`bios.clock.attempt`), so that a simulating backend draws
    that try's faults, not the first try's again."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        header = wire.ATTEMPT_HEADER.lower().encode()
        raw = dict(scope.get("headers") or ()).get(header) if scope["type"] == "http" else None
        number = int(raw) if raw is not None and raw.isdigit() and int(raw) >= 1 else None
        if number is None:
            await self.app(scope, receive, send)
            return
        with attempt(number, None):
            await self.app(scope, receive, send)
