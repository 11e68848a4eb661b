"""`RestClient`: what the service keeps for the caller — training runs and checkpoints — as the
tinker SDK's `RestClient` offers it. A training run is a Bios training session (its id is the
session id); checkpoint paths are `bios://` paths. Each method returns a finished `BiosFuture`
(the SDK's return futures) and has an `*_async` twin giving the value.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from bios.clock import Clock
from bios.errors import InvalidRequestError
from bios.futures import BiosFuture
from bios.retry import call_with_retries, call_with_retries_async
from bios.transport import Transport
from bios.types import CheckpointList, ExternalWeightsUrls, StateResult, TrainingInfo, TrainingRunList, WeightsInfo
from bios.validation import parse_path

T = TypeVar("T")


class RestClient:
    """Runs and checkpoints of the service. Create it with `ServiceClient.create_rest_client()`."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    def get_training_run(self, training_run_id: str) -> BiosFuture[TrainingInfo]:
        """The training session `training_run_id`: base model, LoRA config, step."""
        return self._now("get_training_run", lambda: self._transport.session_info(training_run_id))

    async def get_training_run_async(self, training_run_id: str) -> TrainingInfo:
        return await self._later("get_training_run", lambda: self._transport.session_info_async(training_run_id))

    def list_training_runs(self, limit: int = 20, offset: int = 0) -> BiosFuture[TrainingRunList]:
        """The caller's open training sessions, oldest first: `limit` of them from `offset`."""
        window = _window(limit, offset)
        return self._now("list_training_runs", lambda: _runs(self._transport.list_sessions(), window))

    async def list_training_runs_async(self, limit: int = 20, offset: int = 0) -> TrainingRunList:
        window = _window(limit, offset)
        return _runs(await self._later("list_training_runs", self._transport.list_sessions_async), window)

    def get_weights_info_by_tinker_path(self, path: str) -> BiosFuture[WeightsInfo]:
        """What the checkpoint at `path` (a `bios://` path) holds: kind, base model, LoRA
        configuration and step."""
        return self._now("get_weights_info", lambda: self._transport.checkpoint_info(path))

    async def get_weights_info_by_tinker_path_async(self, path: str) -> WeightsInfo:
        return await self._later("get_weights_info", lambda: self._transport.checkpoint_info_async(path))

    def publish_checkpoint_from_tinker_path(self, path: str) -> BiosFuture[StateResult]:
        """Publish the checkpoint at `path` (a `bios://` path): on a server any key may then
        load it and sample from it (in-process it is only marked `public`). Harmless twice."""
        return self._now("publish_checkpoint", lambda: self._transport.publish_checkpoint(path, True))

    async def publish_checkpoint_from_tinker_path_async(self, path: str) -> StateResult:
        return await self._later("publish_checkpoint", lambda: self._transport.publish_checkpoint_async(path, True))

    def unpublish_checkpoint_from_tinker_path(self, path: str) -> BiosFuture[StateResult]:
        """Only the checkpoint's owner may read it again. Harmless twice."""
        return self._now("unpublish_checkpoint", lambda: self._transport.publish_checkpoint(path, False))

    async def unpublish_checkpoint_from_tinker_path_async(self, path: str) -> StateResult:
        return await self._later("unpublish_checkpoint", lambda: self._transport.publish_checkpoint_async(path, False))

    def list_checkpoints(self, training_run_id: str) -> BiosFuture[CheckpointList]:
        """The checkpoints saved from training session `training_run_id`, oldest first."""
        return self._now("list_checkpoints", lambda: self._listed(self._transport.list_checkpoints(training_run_id)))

    async def list_checkpoints_async(self, training_run_id: str) -> CheckpointList:
        listed = await self._later("list_checkpoints", lambda: self._transport.list_checkpoints_async(training_run_id))
        return self._listed(listed)

    def list_user_checkpoints(self) -> BiosFuture[CheckpointList]:
        """Every checkpoint of the caller (in-process: every one in `BIOS_HOME`), oldest first."""
        return self._now("list_user_checkpoints", lambda: self._listed(self._transport.list_checkpoints()))

    async def list_user_checkpoints_async(self) -> CheckpointList:
        return self._listed(await self._later("list_user_checkpoints", self._transport.list_checkpoints_async))

    def delete_checkpoint(self, training_run_id: str, checkpoint_id: str) -> BiosFuture[None]:
        """Remove checkpoint `checkpoint_id` (`weights/NAME`, `sampler_weights/NAME` or
        `external_weights/NAME`) of session `training_run_id`; NotFoundError if there is none."""
        path = _path(training_run_id, checkpoint_id)
        return self._now("delete_checkpoint", lambda: self._transport.delete_checkpoint(path))

    async def delete_checkpoint_async(self, training_run_id: str, checkpoint_id: str) -> None:
        path = _path(training_run_id, checkpoint_id)
        await self._later("delete_checkpoint", lambda: self._transport.delete_checkpoint_async(path))

    def delete_checkpoint_from_tinker_path(self, path: str) -> BiosFuture[None]:
        """Remove the checkpoint at `path` (a `bios://` path); NotFoundError if there is none."""
        return self._now("delete_checkpoint", lambda: self._transport.delete_checkpoint(path))

    async def delete_checkpoint_from_tinker_path_async(self, path: str) -> None:
        await self._later("delete_checkpoint", lambda: self._transport.delete_checkpoint_async(path))

    def set_checkpoint_ttl_from_tinker_path(self, path: str, ttl_seconds: float | None) -> BiosFuture[StateResult]:
        """Make the checkpoint at `path` (a `bios://` path) expire `ttl_seconds` from now (None:
        never); its record, with the new `expires_at`. NotFoundError if there is none."""
        return self._now("set_checkpoint_ttl", lambda: self._transport.set_checkpoint_ttl(path, ttl_seconds))

    async def set_checkpoint_ttl_from_tinker_path_async(self, path: str, ttl_seconds: float | None) -> StateResult:
        return await self._later(
            "set_checkpoint_ttl", lambda: self._transport.set_checkpoint_ttl_async(path, ttl_seconds)
        )

    def get_external_weights_urls(self, path: str) -> BiosFuture[ExternalWeightsUrls]:
        """One download URL per file of external weights `path` (`save_weights_external`):
        signed URLs from a server, `file://` URLs in-process (see `ExternalWeightsUrls`)."""
        return self._now("get_external_weights_urls", lambda: self._transport.external_weights_urls(path))

    async def get_external_weights_urls_async(self, path: str) -> ExternalWeightsUrls:
        return await self._later("get_external_weights_urls", lambda: self._transport.external_weights_urls_async(path))

    @staticmethod
    def _listed(checkpoints: list) -> CheckpointList:
        return CheckpointList(checkpoints=checkpoints)

    def _clock(self) -> Clock:
        return self._transport.clock

    def _now(self, label: str, call: Callable[[], T]) -> BiosFuture[T]:
        """`call()` retried per the retry contract, as a finished future (its error raised here)."""
        return BiosFuture.completed(call_with_retries(call, label, self._clock), label)

    async def _later(self, label: str, call: Callable[[], Awaitable[T]]) -> T:
        return await call_with_retries_async(call, label, self._clock)


def _path(training_run_id: str, checkpoint_id: str) -> str:
    """`bios://RUN/KIND/NAME` for checkpoint id `KIND/NAME`; InvalidRequestError naming
    `checkpoint_id` for any other shape."""
    path = f"bios://{training_run_id}/{checkpoint_id}"
    try:
        parse_path(path)
    except InvalidRequestError:
        raise InvalidRequestError(
            f"checkpoint_id {checkpoint_id!r} of training run {training_run_id!r}: expected "
            "weights/NAME, sampler_weights/NAME or external_weights/NAME",
            field="checkpoint_id",
        ) from None
    return path


def _window(limit: object, offset: object) -> slice:
    """The slice of a listing `limit` items from `offset`; InvalidRequestError naming the bad one."""
    start = _count(offset, "offset", least=0)
    return slice(start, start + _count(limit, "limit", least=1))


def _count(value: object, name: str, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise InvalidRequestError(f"{name}: expected an int >= {least}, got {value!r}", field=name)
    return value


def _runs(sessions: list[TrainingInfo], window: slice) -> TrainingRunList:
    return TrainingRunList(training_runs=sessions[window])
