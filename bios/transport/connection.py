"""`Connection`: the HTTP transport's connection to `bios serve` — one `httpx.AsyncClient` on
the transport's own event loop (`LoopThread`), which sends each request once.

Failures become BiosErrors: the error a failed answer carries, else NoAnswerError (no answer
came: a connection failure, a gateway's 502/504), RateLimitError (429, with its Retry-After),
ServiceUnavailableError (503) — retryable ones for `bios.retry` to retry. A mutating request
carries the retry layer's idempotency key and attempt number. Work is posted and its answer
read from the same response (streamed after its request id) or long-polled, by a task on the
loop (a 408 is "not yet": poll again).

Imports the contract layer and the wire only, never the engine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
from pydantic import BaseModel

from bios import wire
from bios.clock import REAL_CLOCK, Clock, VirtualClock, current_attempt
from bios.errors import APITimeoutError, BackendError, BiosError, RateLimitError, ServiceUnavailableError
from bios.retry import NoAnswerError, request_key
from bios.transport.loop import LoopThread
from bios.types import ServerCapabilities

CAPABILITIES = "/v1/capabilities"
Decode = Callable[[Any], object]


class Connection:
    """Requests to the server at `base_url`, sent on `loop`. At most `max_polls` long-polls run at
    once (each holds a connection for up to `wire.MAX_WAIT_S`); later ones wait their turn.
    `close()` ends the loop and the connections; so does dropping the last reference."""

    def __init__(self, base_url: str, api_key: str | None, *, max_polls: int = 64) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers={wire.API_KEY_HEADER: f"Bearer {api_key}"} if api_key else {},
            timeout=httpx.Timeout(10.0, read=wire.MAX_WAIT_S + 30.0),
            limits=httpx.Limits(max_connections=max_polls + 16, max_keepalive_connections=max_polls + 16),
        )
        self.loop = LoopThread(f"bios-http {self.base_url}")
        self._poll_slots = asyncio.Semaphore(max_polls)
        self._clock: Clock | None = None
        self._finalizer = weakref.finalize(self, self.loop.close, self._http.aclose, wait=False)

    def close(self) -> None:
        """Cancel the requests in flight (their futures fail), close the connections and stop
        the loop; returns once it has stopped. Dropping the last reference closes it too."""
        if self._finalizer.detach() is not None:
            self.loop.close(self._http.aclose)

    @property
    def clock(self) -> Clock:
        """The server's clock: a simulating server's simulated time (at its time scale), else real
        time. Learnt before the first request; real time until then (e.g. while unreachable)."""
        return self._clock or REAL_CLOCK

    async def capabilities(self) -> ServerCapabilities:
        """GET /v1/capabilities; the first answer also sets `clock`."""
        found = ServerCapabilities.model_validate((await self.send("GET", CAPABILITIES)).json())
        if self._clock is None:
            scale = found.simulated_time_scale
            self._clock = REAL_CLOCK if scale is None else VirtualClock(scale)
        return found

    async def send(
        self,
        method: str,
        path: str,
        body: BaseModel | None = None,
        params: dict | None = None,
        *,
        mutating: bool = False,
        stream: bool = False,
    ) -> httpx.Response:
        """Send once (retrying is bios.retry's). A mutating request carries the idempotency key and
        attempt number of the retry layer (this coroutine runs in the caller's contextvars).
        With `stream`, work asks for its answer streamed (`wire.STREAM_ANSWER_HEADER`) and the
        response is returned once its headers are in, its body unread (the caller closes it).
        Raises NoAnswerError when no answer came, else the error of a status >= 400 (see
        `_error_of`), except a long-poll's 408, which is returned."""
        headers = (
            {wire.IDEMPOTENCY_HEADER: request_key(), wire.ATTEMPT_HEADER: str(current_attempt().number)}
            if mutating
            else {}
        )
        if stream:
            headers[wire.STREAM_ANSWER_HEADER] = "1"
        content = body.model_dump_json().encode() if body is not None else None
        if content is not None:
            headers["Content-Type"] = "application/json"
        if self._clock is None and path != CAPABILITIES:
            await self.capabilities()  # learn the server's clock before its first answer
        what = f"{method} {self.base_url}{path}"
        request = self._http.build_request(method, path, content=content, params=params, headers=headers)
        try:
            response = await self._http.send(request, stream=stream)
            if stream and response.status_code >= 400:
                await response.aread()
        except httpx.TransportError as exc:
            raise NoAnswerError(f"{what}: {type(exc).__name__}: {exc}") from None
        if response.status_code >= 400 and response.status_code != 408:
            raise _error_of(response, what)
        return response

    async def post(self, path: str, body: BaseModel) -> httpx.Response:
        return await self.send("POST", path, body, mutating=True)

    async def submit(self, path: str, body: BaseModel, decode: Decode) -> concurrent.futures.Future:
        """Post work; the future resolves with `decode(result)` once the server has the answer.
        While a long-poll slot is free, the work is posted asking for its answer streamed after
        its request id, and the slot is held until the answer comes on that response (one round
        trip, no poll); if the stream ends without it, the answer is long-polled as usual.
        Without a free slot, the request id comes alone and a poll waits for a slot."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self._poll_slots.locked():
            request_id = wire.Submitted.model_validate_json((await self.post(path, body)).content).request_id
            self.loop.task(self._poll(request_id, decode, future))
            return future
        await self._poll_slots.acquire()
        try:
            response = await self.send("POST", path, body, mutating=True, stream=True)
        except BaseException:
            self._poll_slots.release()
            raise
        lines = response.aiter_lines()
        try:
            request_id = wire.Submitted.model_validate_json(await anext(lines)).request_id
        except BaseException as exc:
            self._poll_slots.release()
            await response.aclose()
            if isinstance(exc, (httpx.TransportError, StopAsyncIteration)):
                raise NoAnswerError(f"POST {self.base_url}{path}: the answer broke off: {exc!r}") from None
            raise
        self.loop.task(self._streamed(response, lines, request_id, decode, future))
        return future

    async def _streamed(
        self,
        response: httpx.Response,
        lines: AsyncIterator[str],
        request_id: str,
        decode: Decode,
        future: concurrent.futures.Future,
    ) -> None:
        """Read the envelope that follows the request id on `response` (holding a poll slot, taken
        by `submit`) and resolve `future` with it; long-poll instead if the stream ends without it."""
        try:
            envelope = await anext(lines, None)
            async for _ in lines:  # the stream's end: a connection read to its end is kept for reuse
                pass
        except httpx.TransportError:
            envelope = None
        except BaseException as exc:  # noqa: BLE001 - a close (cancellation) belongs to the future
            self.loop.deliver(future, _raiser(exc))
            return
        finally:
            self._poll_slots.release()
            await response.aclose()
        if not envelope:
            await self._poll(request_id, decode, future)
            return
        self.loop.deliver(future, lambda: _answer(envelope.encode(), decode))

    async def _poll(self, request_id: str, decode: Decode, future: concurrent.futures.Future) -> None:
        """Long-poll the request's answer (a 408 is "not yet") and resolve `future` with it."""
        try:
            async with self._poll_slots:
                response = await self.send("GET", f"/v1/requests/{request_id}", params={"wait": wire.MAX_WAIT_S})
                while response.status_code == 408:
                    response = await self.send("GET", f"/v1/requests/{request_id}", params={"wait": wire.MAX_WAIT_S})
        except BaseException as exc:  # noqa: BLE001 - every failure (a close: cancellation) belongs to the future
            self.loop.deliver(future, _raiser(exc))
            return
        self.loop.deliver(future, lambda: _answer(response.content, decode))

    async def delete_quietly(self, path: str) -> None:
        """DELETE `path`, ignoring every failure (used from finalizers)."""
        try:
            await self._http.delete(path, timeout=5.0)
        except httpx.HTTPError:
            pass


def _answer(content: bytes, decode: Decode) -> object:
    """The decoded result of an answer envelope; raises the BiosError of a failed one."""
    envelope = json.loads(content)
    if envelope["status"] == "done":
        return decode(envelope["result"])
    raise BiosError.from_dict(envelope["error"])


def _raiser(error: BaseException) -> Callable[[], object]:
    """A producer that raises `error` (a cancelled poll: the transport was closed)."""
    if isinstance(error, asyncio.CancelledError):
        error = BiosError("the client was closed before this request's answer came")

    def produce() -> object:
        raise error

    return produce


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
