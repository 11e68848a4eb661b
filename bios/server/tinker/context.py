"""What the Tinker routes share: the service, keys, runs, sessions, and request submission."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import TypeVar

from fastapi import Header

from bios.errors import BiosError
from bios.server.auth import KeyRing
from bios.server.service import Recorder, Service
from bios.server.tinker import answers
from bios.server.tinker.archive import ArchiveSigner
from bios.server.tinker.ids import Run, Runs, session_of
from bios.server.tinker.sessions import Releases, Sessions
from bios.types import TrainingInfo

T = TypeVar("T")


class Tinker:
    """The Tinker side of one `Service`: model ids filed in its database, sessions in memory."""

    def __init__(self, service: Service, keys: KeyRing) -> None:
        self.service = service
        self.engine = service.engine
        self.keys = keys
        self.runs = Runs(service.records.engine)
        self.sessions = Sessions(
            Releases(sampler=service.drop_sampler, run=service.close_session, runs_of=self.runs.of_tinker_session)
        )
        self.home = service.engine.store.root.parent
        self.signer = ArchiveSigner()
        self._chain = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="bios-tinker")

    async def owner(self, x_api_key: str | None = Header(None)) -> str:
        """FastAPI dependency: the owner id of the `X-API-Key` header (AuthenticationError if
        invalid); a coroutine, so that long-polls never wait for a worker thread."""
        return self.keys.authenticate(x_api_key)

    def submit(
        self,
        who: str,
        kind: str,
        body: bytes,
        key: str | None,
        start: Callable[[], concurrent.futures.Future],
        encode: Callable[[object], bytes],
        *,
        run: Run | None = None,
        seq: int | None = None,
        record: Recorder | None = None,
        replay: bytes | None = None,
    ) -> str:
        """`Service.submit` of a Tinker request: answers stored in the Tinker encoding, the
        idempotency `key` (a retry with the same key and body gets the first request, another
        body a 409), filed under `run`'s Bios session at engine sequence number `seq`, with the
        service's `record` and `replay` hooks that keep a session's training across a restart.
        The SDK never resubmits a failed request, so the service retries retryable failures."""
        return self.service.submit(
            who,
            f"tinker.{kind}",
            body,
            key,
            start,
            session_id=run.session_id if run else None,
            seq=seq,
            record=record,
            replay=replay,
            encode=encode,
            encode_failure=answers.failure,
            retry_transient=True,
        )

    def ordered(self, run: Run, seq: int, prepare: Callable[[], T]) -> T:
        """`prepare()`, giving up engine sequence number `seq` of `run` if it raises, so that a
        refused request does not hold the run's later requests."""
        try:
            return prepare()
        except BiosError:
            self.engine.skip(run.session_id, seq)
            raise

    def then(self, future: concurrent.futures.Future, step: Callable[[object], T]) -> concurrent.futures.Future:
        """A future of `step(result of future)`, run off the engine's worker thread (so `step`
        may call the engine); a failure of `future` passes through."""
        out: concurrent.futures.Future = concurrent.futures.Future()

        def run_step(done: concurrent.futures.Future) -> None:
            try:
                out.set_result(step(done.result()))
            except BaseException as exc:  # noqa: BLE001 - the request fails with it
                out.set_exception(exc)

        future.add_done_callback(lambda done: self._chain.submit(run_step, done))
        return out

    def open_run(self, who: str, model_id: str, info: TrainingInfo, metadata: dict[str, str]) -> Run:
        """File a new Bios session `info` as `who`'s Tinker run `model_id`, held by its Tinker session."""
        self.service.add_session(info.session_id, who, info.base_model)
        run = Run(model_id, info.session_id, who, info.base_model, info.lora_config.rank, metadata)
        self.runs.add(run)
        try:
            self.sessions.add_run(who, session_of(model_id), info.session_id)
        except BiosError:  # the Tinker session ended meanwhile: so does the run
            self.service.close_session(who, info.session_id)
            raise
        return run


def done(value: object) -> concurrent.futures.Future:
    """A future already resolved with `value`."""
    future: concurrent.futures.Future = concurrent.futures.Future()
    future.set_result(value)
    return future
