"""A training run's weights: save (for resuming or for sampling) and load (into the run, or
into a new run resumed from a checkpoint).

These requests are ordered like the run's others (see `training_routes`): each carries its
Tinker `seq_id`, and one refused before it reaches the engine gives up its sequence number.
Each route's planner (`resumable`) is also what runs the request again after a restart.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from concurrent.futures import Future

from fastapi import APIRouter

from bios.engine.checkpoints import checkpoint_path
from bios.engine.engine import WithState
from bios.errors import BiosError, InvalidRequestError, NotFoundError, UnsupportedError
from bios.server import ledger
from bios.server.ledger import Bill
from bios.server.tinker import ids
from bios.server.tinker.answers import json_answer
from bios.server.tinker.bodies import LoadWeights, SaveExternal, SaveForSampler, SaveWeights, user_metadata
from bios.server.tinker.context import Plan, RunRequest, Tinker, TinkerDep, TinkerOwnerDep, done, resumable
from bios.server.tinker.sessions import Sampler
from bios.types import StateResult, TrainingInfo

router = APIRouter()


def _saved(tinker: Tinker, path: str) -> bool:
    """Whether Bios checkpoint `path` exists."""
    try:
        return tinker.engine.store.record(path) is not None
    except NotFoundError:
        return False


def _saved_answer(tinker: Tinker, kind: str) -> Callable[[StateResult], bytes]:
    """The answer of a save: the checkpoint's Tinker path and the request `kind`."""
    return json_answer(lambda result: {"path": tinker.runs.tinker_path(result.path), "type": kind})


@resumable(SaveWeights.model_validate_json, "save_weights")
def plan_save_weights(tinker: Tinker, who: str, body: SaveWeights) -> Plan:
    """save_state: weights + optimizer state as `tinker://RUN/weights/NAME`, gone `ttl_seconds`
    after the save when the SDK gives one."""
    req = RunRequest.of(tinker, who, body.model_id, body.seq_id)

    def prepare() -> str:
        if not body.path:
            raise InvalidRequestError("path: name the checkpoint", field="path")
        if not body.overwrite and _saved(tinker, checkpoint_path(req.session_id, "state", body.path)):
            raise InvalidRequestError(
                f"path: checkpoint {body.path!r} exists; pass overwrite=True to replace it", field="path"
            )
        return body.path

    start = lambda: tinker.engine.save_state(
        req.session_id, req.seq, req.ordered(prepare), user_metadata(body.user_metadata), "state", body.ttl_seconds
    )
    record = tinker.service.checkpoint_recorder(who, req.session_id)
    encode = _saved_answer(tinker, "save_weights")
    raw = body.model_dump_json().encode()
    return req.plan("save_weights", raw, start, encode, record=record, meter=ledger.saved)


@router.post("/save_weights")
def save_weights(body: SaveWeights, who: TinkerOwnerDep, tinker: TinkerDep) -> dict:
    """Stored to run again after a restart with `overwrite`: the name was free when the request
    was accepted, so a checkpoint there by then is this request's own."""
    stored = body.model_copy(update={"overwrite": True}).model_dump_json().encode()
    return tinker.accept(plan_save_weights(tinker, who, body), stored)


@resumable(SaveForSampler.model_validate_json, "save_for_sampler")
def plan_save_for_sampler(tinker: Tinker, who: str, body: SaveForSampler) -> Plan:
    """Named: a persistent sampler checkpoint `tinker://RUN/sampler_weights/NAME`. Unnamed
    (save_weights_and_get_sampling_client): a sampling session on a snapshot of the current
    weights, released with the client's session and kept in no checkpoint."""
    req = RunRequest.of(tinker, who, body.model_id, body.seq_id)
    hashed = body.model_dump_json(exclude={"sampling_session_seq_id"}).encode()
    if body.path:
        name = body.path
        start = lambda: tinker.engine.save_state(
            req.session_id, req.seq, name, user_metadata(body.user_metadata), "sampler", body.ttl_seconds
        )
        record = tinker.service.checkpoint_recorder(who, req.session_id)
        encode = _saved_answer(tinker, "save_weights_for_sampler")
        return req.plan("save_for_sampler", hashed, start, encode, record=record, meter=ledger.saved)
    return _snapshot_sampler(req, hashed)


@router.post("/save_weights_for_sampler")
def save_weights_for_sampler(body: SaveForSampler, who: TinkerOwnerDep, tinker: TinkerDep) -> dict:
    return tinker.accept(plan_save_for_sampler(tinker, who, body), body.model_dump_json().encode())


def _snapshot_sampler(req: RunRequest, hashed: bytes) -> Plan:
    """The plan of an unnamed save_weights_for_sampler: its answer is a new sampling session on
    a snapshot of the run's weights, filed under the run's Tinker session at the request's key."""
    tinker, who = req.tinker, req.who
    session_id = ids.session_of(req.run.model_id)

    def sampler_on(saved: StateResult) -> str:
        try:
            handle = tinker.engine.create_sampler(model_path=saved.path)
        finally:
            tinker.engine.delete_checkpoint(saved.path)  # the snapshot adapter holds the weights now
        tinker.service.add_sampler(handle.sampler_id, who)
        try:
            return tinker.sessions.add_sampler(
                Sampler(handle.sampler_id, who, session_id, handle.base_model, None), req.key
            )
        except BiosError:
            tinker.service.drop_sampler(who, handle.sampler_id)
            raise

    def start() -> Future[str]:
        req.ordered(lambda: tinker.sessions.check(who, session_id))
        snapshot = tinker.engine.save_state(req.session_id, req.seq, f"ephemeral-{uuid.uuid4().hex}", {}, "sampler")
        return tinker.then(snapshot, sampler_on)

    encode = json_answer(lambda sampler_id: {"sampling_session_id": sampler_id, "type": "save_weights_for_sampler"})
    return req.plan("save_for_sampler", hashed, start, encode)


@resumable(SaveExternal.model_validate_json, "save_external")
def plan_save_external(tinker: Tinker, who: str, body: SaveExternal) -> Plan:
    """The weights as a Hugging Face PEFT adapter, `tinker://RUN/external_weights/NAME`, whose
    files `external_weights_urls` hands out (gone `ttl_seconds` after the save when given).
    Bios stores no encrypted files: `age_encryption_recipients` is refused."""
    req = RunRequest.of(tinker, who, body.model_id, body.seq_id)

    def prepare() -> str:
        if body.age_encryption_recipients:
            raise UnsupportedError(
                "age_encryption_recipients: Bios does not encrypt external weights; leave it out "
                "(the download URLs are signed and expire)",
                field="age_encryption_recipients",
            )
        if not body.path:
            raise InvalidRequestError("path: name the external weights", field="path")
        return body.path

    start = lambda: tinker.engine.save_state(
        req.session_id, req.seq, req.ordered(prepare), user_metadata(body.user_metadata), "external", body.ttl_seconds
    )
    record = tinker.service.checkpoint_recorder(who, req.session_id)

    def answer(result: StateResult) -> dict:
        return {
            "path": tinker.runs.tinker_path(result.path),
            "size_bytes": result.size_bytes,
            "type": "save_weights_external",
        }

    encode = json_answer(answer)
    return req.plan("save_external", body.model_dump_json().encode(), start, encode, record=record, meter=ledger.saved)


@router.post("/save_weights_external")
def save_weights_external(body: SaveExternal, who: TinkerOwnerDep, tinker: TinkerDep) -> dict:
    return tinker.accept(plan_save_external(tinker, who, body), body.model_dump_json().encode())


@resumable(LoadWeights.model_validate_json, "load_weights")
def plan_load_weights(tinker: Tinker, who: str, body: LoadWeights) -> Plan:
    """With `model_id` + `seq_id`: load_state into the run. With `session_id` +
    `model_seq_id`: a new run `SESSION:train:MODEL_SEQ_ID` resumed from the checkpoint.
    `optimizer` false loads the weights only, with a fresh optimizer."""
    if body.model_id is not None:
        return _load_into_run(RunRequest.of(tinker, who, body.model_id, body.seq_id), body)
    if body.session_id is None or body.model_seq_id is None:
        raise InvalidRequestError(
            "load_weights: give model_id and seq_id, or session_id and model_seq_id", field="model_id"
        )
    return _load_as_new_run(tinker, who, body, ids.model_id(body.session_id, body.model_seq_id))


@router.post("/load_weights")
def load_weights(body: LoadWeights, who: TinkerOwnerDep, tinker: TinkerDep) -> dict:
    return tinker.accept(plan_load_weights(tinker, who, body), body.model_dump_json().encode())


def _loaded(body: LoadWeights, model_id: str) -> Callable[[object], bytes]:
    """The answer of a load_weights into run `model_id`."""
    return json_answer(lambda _: {"path": body.path, "model_id": model_id, "type": "load_weights"})


def _load_into_run(req: RunRequest, body: LoadWeights) -> Plan:
    """The plan of load_state of the caller's checkpoint `body.path` into the run of `req`."""
    tinker = req.tinker

    def start() -> Future[WithState[TrainingInfo]]:
        source = req.ordered(lambda: _checkpoint_to_load(tinker, req.who, body))
        return tinker.engine.load_state_and_export(req.session_id, req.seq, source, optimizer=body.optimizer)

    record = tinker.service.durable_recorder(req.session_id, req.seq)
    encode = _loaded(body, req.run.model_id)
    return req.plan("load_weights", body.model_dump_json().encode(), start, encode, record=record)


def _load_as_new_run(tinker: Tinker, who: str, body: LoadWeights, model_id: str) -> Plan:
    """The plan of the creation of run `model_id` resumed from checkpoint `body.path`."""

    def create() -> TrainingInfo:
        path = _checkpoint_to_load(tinker, who, body)
        return tinker.engine.create_session_from_state(path, body.base_model, optimizer=body.optimizer)

    start = lambda: done(tinker.new_run(who, model_id, create, user_metadata(body.user_metadata)))
    hashed = body.model_dump_json().encode()
    bill: Bill[str] = Bill(body.base_model, ids.session_of(model_id))
    key = f"tinker/{model_id}"
    return Plan(who, "load_weights", hashed, key, start, _loaded(body, model_id), model_id=model_id, bill=bill)


def _checkpoint_to_load(tinker: Tinker, who: str, body: LoadWeights) -> str:
    """The Bios path of checkpoint `body.path`, the caller's or a published one (NotFoundError
    for another key's unpublished one)."""
    if body.weights_access_token is not None:
        raise UnsupportedError(
            "weights_access_token: Bios loads only checkpoints of the caller's own key",
            field="weights_access_token",
        )
    return tinker.readable_path(who, body.path)
