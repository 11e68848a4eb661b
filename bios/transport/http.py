"""The remote transport: the engine's methods, carried over HTTP to `bios serve` (`bios.wire`).

Work methods return a `concurrent.futures.Future` at once: the request is posted (its answer is
a request id) and a poller thread long-polls `/v1/requests/{id}` until the answer is there.
Each call sends once: a connection failure, 429 and 502/503/504 become retryable BiosErrors
(APIConnectionError, RateLimitError, ServiceUnavailableError), which `bios.retry` retries; a
mutating request carries the idempotency key its retries share, so a retried `optim_step`
is applied once. Arguments are checked here with the engine's own
type checks before anything is sent (a rejected ordered request releases its sequence number
on the server), so a bad argument raises the same error as in-process.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable, Sequence
from typing import Any, Literal

import httpx
from pydantic import BaseModel, TypeAdapter

from bios import validation, wire
from bios.clock import REAL_CLOCK, Clock, VirtualClock, current_attempt
from bios.errors import (
    APITimeoutError,
    BackendError,
    BiosError,
    InvalidRequestError,
    RateLimitError,
    ServiceUnavailableError,
)
from bios.handles import SamplerHandle
from bios.losses import loss_spec
from bios.retry import NoAnswerError, request_key
from bios.tokenizer import Tokenizer
from bios.types import (
    AdamParams,
    Datum,
    ForwardBackwardResult,
    LoraConfig,
    ModelInput,
    OptimStepResult,
    SampleResult,
    SamplingParams,
    ServerCapabilities,
    StateResult,
    TrainingInfo,
)
from bios.validation import parse_path

_LOGPROBS = TypeAdapter(list[float | None])
_CHECKPOINTS = TypeAdapter(list[StateResult])


class HttpTransport:
    """The `Engine` interface of the clients, served by a Bios server at `base_url`."""

    def __init__(self, base_url: str, api_key: str | None, *, pollers: int = 32) -> None:
        headers = {wire.API_KEY_HEADER: f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(10.0, read=wire.MAX_WAIT_S + 30.0),
            limits=httpx.Limits(max_connections=pollers + 8, max_keepalive_connections=pollers + 8),
        )
        self._pollers = concurrent.futures.ThreadPoolExecutor(max_workers=pollers, thread_name_prefix="bios-poll")
        self._tokenizers: dict[str, Tokenizer] = {}
        self._lock = threading.Lock()
        self._clock: Clock | None = None

    # ---- the wire -------------------------------------------------------------------------------

    def _send(
        self,
        method: str,
        path: str,
        body: BaseModel | None = None,
        params: dict | None = None,
        *,
        mutating: bool = False,
    ) -> httpx.Response:
        """Send once (retrying is bios.retry's). A mutating request carries the idempotency key of
        its retries (`bios.retry.request_key`) and its attempt number. Raises APIConnectionError
        when no answer came (a NoAnswerError), else the error of a status >= 400 (see `_error_of`), except a
        long-poll's 408, which is returned."""
        if self._clock is None and path != "/v1/capabilities":
            self.capabilities()  # learn the server's clock before its first answer
        headers = (
            {wire.IDEMPOTENCY_HEADER: request_key(), wire.ATTEMPT_HEADER: str(current_attempt().number)}
            if mutating
            else {}
        )
        content = body.model_dump_json().encode() if body is not None else None
        if content is not None:
            headers["Content-Type"] = "application/json"
        try:
            response = self._http.request(method, path, content=content, params=params, headers=headers)
        except httpx.TransportError as exc:
            raise NoAnswerError(f"{method} {self.base_url}{path}: {type(exc).__name__}: {exc}") from None
        if response.status_code >= 400 and response.status_code != 408:
            raise _error_of(response, f"{method} {self.base_url}{path}")
        return response

    def _get(self, path: str, params: dict | None = None) -> Any:
        return self._send("GET", path, params=params).json()

    def _submit(self, path: str, body: BaseModel, decode: Callable[[Any], object]) -> concurrent.futures.Future:
        """Post work; the future resolves with `decode(result)` once the server has the answer."""
        request_id = wire.Submitted.model_validate(self._send("POST", path, body, mutating=True).json()).request_id
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._pollers.submit(self._poll, request_id, decode, future)
        return future

    def _poll(self, request_id: str, decode: Callable[[Any], object], future: concurrent.futures.Future) -> None:
        try:
            while True:
                response = self._send("GET", f"/v1/requests/{request_id}", params={"wait": wire.MAX_WAIT_S})
                if response.status_code == 200:
                    break
            envelope = response.json()
            if envelope["status"] == "done":
                future.set_result(decode(envelope["result"]))
            else:
                future.set_exception(BiosError.from_dict(envelope["error"]))
        except BaseException as exc:  # noqa: BLE001 - every failure belongs to the caller's future
            future.set_exception(exc)

    def _ordered(
        self, session_id: str, seq: int, operation: str, body: Callable[[], BaseModel], decode: Callable[[Any], object]
    ) -> concurrent.futures.Future:
        """Submit ordered work. When it is refused for good (by the checks here or by the server
        before the engine took it: size, auth, ownership), `seq` is released on the server, so
        the session's later requests still run; releasing a number the engine took is a no-op."""
        try:
            return self._submit(f"/v1/sessions/{session_id}/{operation}", body(), decode)
        except BiosError as exc:
            if not exc.retryable:  # a retryable refusal keeps `seq` for the retry (bios.retry)
                try:
                    self.skip(session_id, seq)
                except BiosError:
                    pass  # the server is unreachable or the session is not ours: nothing to release
            raise

    # ---- discovery ------------------------------------------------------------------------------

    def capabilities(self) -> ServerCapabilities:
        found = ServerCapabilities.model_validate(self._get("/v1/capabilities"))
        if self._clock is None:
            scale = found.simulated_time_scale
            self._clock = REAL_CLOCK if scale is None else VirtualClock(scale)
        return found

    @property
    def clock(self) -> Clock:
        """What client retries back off on: a simulating server's simulated time (at its time
        scale; with scale 0 a retry goes out at once), else real time. The server tells its
        scale before its first answer; until then (an unreachable server) it is real time."""
        return self._clock or REAL_CLOCK

    def tokenizer(self, base_model: str) -> Tokenizer:
        with self._lock:
            cached = self._tokenizers.get(base_model)
        if cached is None:
            cached = Tokenizer.from_wire(self._get(f"/v1/tokenizers/{base_model}"))
            with self._lock:
                self._tokenizers[base_model] = cached
        return cached

    # ---- sessions -------------------------------------------------------------------------------

    def create_session(self, base_model: str, lora: LoraConfig) -> TrainingInfo:
        body = wire.CreateSession(
            base_model=str(base_model), lora_config=validation.instance(lora, LoraConfig, "lora_config")
        )
        return TrainingInfo.model_validate(self._send("POST", "/v1/sessions", body, mutating=True).json())

    def create_session_from_state(self, path: object, base_model: str | None = None) -> TrainingInfo:
        body = wire.SessionFromState(path=_text(path, "path"), base_model=base_model)
        return TrainingInfo.model_validate(self._send("POST", "/v1/sessions/from_state", body, mutating=True).json())

    def session_info(self, session_id: str) -> TrainingInfo:
        return TrainingInfo.model_validate(self._get(f"/v1/sessions/{session_id}"))

    def close_session(self, session_id: str) -> None:
        """End the session on the server, in the background; a server that is gone is ignored."""
        self._in_background(f"/v1/sessions/{session_id}")

    def next_seq(self, session_id: str) -> int:
        return wire.NextSeq.model_validate(self._get(f"/v1/sessions/{session_id}/next_seq")).next_seq

    def skip(self, session_id: str, seq: int) -> None:
        self._send("POST", f"/v1/sessions/{session_id}/skip", wire.Ordered(seq=seq), mutating=True)

    # ---- training -------------------------------------------------------------------------------

    def forward_backward(
        self,
        session_id: str,
        seq: int,
        data: Sequence[Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: dict[str, float] | None = None,
        *,
        backward: bool = True,
    ) -> concurrent.futures.Future:
        def body() -> wire.ForwardBackward:
            checked = validation.datum_list(data)
            loss_spec(loss_fn).resolve_config(validation.config_dict(loss_fn_config))
            return wire.ForwardBackward(
                seq=seq, data=checked, loss_fn=loss_fn, loss_fn_config=loss_fn_config, backward=backward
            )

        return self._ordered(session_id, seq, "forward_backward", body, ForwardBackwardResult.model_validate)

    def optim_step(self, session_id: str, seq: int, adam: AdamParams) -> concurrent.futures.Future:
        body = lambda: wire.OptimStep(seq=seq, adam_params=validation.instance(adam, AdamParams, "adam_params"))
        return self._ordered(session_id, seq, "optim_step", body, OptimStepResult.model_validate)

    def sample(
        self, session_id: str, seq: int, prompt: ModelInput, params: SamplingParams, num_samples: int = 1
    ) -> concurrent.futures.Future:
        def body() -> wire.SessionSample:
            return wire.SessionSample(seq=seq, **_sample_fields(prompt, params, num_samples))

        return self._ordered(session_id, seq, "sample", body, SampleResult.model_validate)

    def save_state(
        self,
        session_id: str,
        seq: int,
        name: str,
        metadata: dict | None = None,
        kind: Literal["state", "sampler"] = "state",
    ) -> concurrent.futures.Future:
        def body() -> wire.SaveState:
            return wire.SaveState(
                seq=seq, name=validation.checkpoint_name(name), metadata=validation.metadata(metadata), kind=kind
            )

        return self._ordered(session_id, seq, "save_state", body, StateResult.model_validate)

    def load_state(self, session_id: str, seq: int, path: str) -> concurrent.futures.Future:
        def body() -> wire.LoadState:
            parse_path(path)
            return wire.LoadState(seq=seq, path=path)

        return self._ordered(session_id, seq, "load_state", body, TrainingInfo.model_validate)

    # ---- sampling clients -----------------------------------------------------------------------

    def create_sampler(self, model_path: str | None = None, base_model: str | None = None) -> SamplerHandle:
        body = wire.CreateSampler(
            model_path=None if model_path is None else _text(model_path, "model_path"),
            base_model=None if base_model is None else str(base_model),
        )
        made = wire.Sampler.model_validate(self._send("POST", "/v1/samplers", body, mutating=True).json())
        return SamplerHandle(made.sampler_id, made.base_model)

    def release_sampler(self, sampler_id: str) -> None:
        """Tell the server in the background; a server that is gone is ignored."""
        self._in_background(f"/v1/samplers/{sampler_id}")

    def _in_background(self, path: str) -> None:
        """DELETE `path` on a poller thread, ignoring every failure (used from finalizers)."""

        def delete() -> None:
            try:
                self._http.delete(path, timeout=5.0)
            except httpx.HTTPError:
                pass

        try:
            self._pollers.submit(delete)
        except RuntimeError:  # the transport is shutting down
            pass

    def sampler_sample(
        self,
        sampler_id: str,
        prompt: ModelInput,
        params: SamplingParams,
        num_samples: int = 1,
        *,
        prompt_logprobs: bool = False,
    ) -> concurrent.futures.Future:
        body = wire.SamplerSample(**_sample_fields(prompt, params, num_samples), prompt_logprobs=prompt_logprobs)
        return self._submit(f"/v1/samplers/{sampler_id}/sample", body, SampleResult.model_validate)

    def sampler_logprobs(self, sampler_id: str, prompt: ModelInput) -> concurrent.futures.Future:
        body = wire.SamplerLogprobs(prompt=validation.instance(prompt, ModelInput, "prompt"))
        return self._submit(f"/v1/samplers/{sampler_id}/logprobs", body, _LOGPROBS.validate_python)

    # ---- checkpoints ----------------------------------------------------------------------------

    def list_checkpoints(self, session_id: str | None = None) -> list[StateResult]:
        return _CHECKPOINTS.validate_python(
            self._get("/v1/checkpoints", {"session_id": session_id} if session_id else None)
        )

    def delete_checkpoint(self, path: str) -> None:
        parse_path(path)
        self._send("DELETE", "/v1/checkpoints", params={"path": path}, mutating=True)

    def close(self) -> None:
        self._pollers.shutdown(wait=False, cancel_futures=True)
        self._http.close()


def _sample_fields(prompt: object, params: object, num_samples: object) -> dict:
    return {
        "prompt": validation.instance(prompt, ModelInput, "prompt"),
        "sampling_params": validation.instance(params, SamplingParams, "sampling_params"),
        "num_samples": validation.sample_count(num_samples),
    }


def _text(value: object, field: str) -> str:
    """`value` when it is a string; InvalidRequestError naming `field` otherwise."""
    if isinstance(value, str):
        return value
    raise InvalidRequestError(f"{field} must be a string, got {type(value).__name__}", field=field)


def _error_of(response: httpx.Response, what: str) -> BiosError:
    """The BiosError of a failed response: the one its body carries, else one for its status
    (429 RateLimitError, 503 ServiceUnavailableError, 502/504 from a gateway that got no answer
    NoAnswerError, 408 APITimeoutError, anything else BackendError)."""
    try:
        return BiosError.from_dict(response.json()["error"])
    except (ValueError, KeyError, TypeError):
        pass
    status, text = response.status_code, f"{what}: HTTP {response.status_code} {response.text[:200]}"
    if status == 429:
        return RateLimitError(text, retry_after=_seconds(response.headers.get("Retry-After")))
    if status == 503:
        return ServiceUnavailableError(text)
    if status in (502, 504):
        return NoAnswerError(text)
    if status == 408:
        return APITimeoutError(text)
    return BackendError(text)


def _seconds(retry_after: str | None) -> float:
    """A Retry-After header's delay in seconds (1 when absent or given as a date)."""
    try:
        return max(0.0, float(retry_after or 1.0))
    except ValueError:
        return 1.0
