"""Tinker names for Bios objects: model ids (training runs), sequence ids, checkpoint paths.

A Tinker training run `SESSION:train:N` (the id the SDK itself derives) is one Bios training
session; the pairing is filed in table `tinker_runs` of the server's database, so runs and
their checkpoints stay listable after a restart. Tinker numbers a model's requests 1, 2, ...;
the engine's lane for the session starts at 0. A checkpoint
`tinker://RUN/KIND/NAME` is `bios://SESSION/KIND/NAME`, KIND one of weights, sampler_weights
and external_weights.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from sqlalchemy import Column, Float, Integer, MetaData, String, Table, Text, func, insert, select
from sqlalchemy.engine import Engine as SqlEngine
from sqlalchemy.engine import Row
from sqlalchemy.sql import ColumnElement

from bios.errors import InvalidRequestError, NotFoundError
from bios.validation import SCHEME, parse_path

TINKER_SCHEME = "tinker://"
KIND_DIRS = ("weights", "sampler_weights", "external_weights")

_metadata = MetaData()
runs_table = Table(
    "tinker_runs",
    _metadata,
    Column("model_id", String(256), primary_key=True),
    Column("session_id", String(64), nullable=False, unique=True),
    Column("owner", String(64), nullable=False, index=True),
    Column("base_model", String(256), nullable=False),
    Column("lora_rank", Integer, nullable=False),
    Column("user_metadata", Text, nullable=False),
    Column("created_at", Float, nullable=False),
)


@dataclass(frozen=True, slots=True)
class Run:
    """A Tinker training run: its model id and the Bios session training it."""

    model_id: str
    session_id: str
    owner: str
    base_model: str
    lora_rank: int
    user_metadata: dict[str, str] = field(default_factory=dict)
    created_at: float = 0.0


def model_id(session_id: str, model_seq_id: int | str) -> str:
    """The id of the `model_seq_id`-th training client of Tinker session `session_id`."""
    return f"{session_id}:train:{model_seq_id}"


def session_of(model_id: str) -> str:
    """The Tinker session that created run `model_id`."""
    return model_id.rpartition(":train:")[0]


def engine_seq(seq_id: int | None) -> int:
    """The engine's sequence number for Tinker `seq_id` (1, 2, ... -> 0, 1, ...)."""
    if not isinstance(seq_id, int) or seq_id < 1:
        raise InvalidRequestError(f"seq_id: must be an integer >= 1, got {seq_id!r}", field="seq_id")
    return seq_id - 1


class Runs:
    """The `tinker_runs` table: Tinker model id <-> Bios session, filed under an owner. A run is
    never changed or removed once filed, so each is read from the table once (`find`)."""

    def __init__(self, db: SqlEngine) -> None:
        self.db = db
        self._known: dict[str, Run] = {}  # model id → its run, as filed
        _metadata.create_all(db)

    def add(self, run: Run) -> None:
        with self.db.begin() as tx:
            tx.execute(
                insert(runs_table).values(
                    model_id=run.model_id,
                    session_id=run.session_id,
                    owner=run.owner,
                    base_model=run.base_model,
                    lora_rank=run.lora_rank,
                    user_metadata=json.dumps(run.user_metadata),
                    created_at=run.created_at or time.time(),
                )
            )

    def get(self, owner: str, model_id: str) -> Run:
        """`owner`'s run `model_id`; NotFoundError if there is none (or it is another owner's)."""
        run = self.find(owner, model_id)
        if run is None:
            raise NotFoundError(f"model_id: no training run {model_id!r}", field="model_id")
        return run

    def find(self, owner: str, model_id: str) -> Run | None:
        """`owner`'s run `model_id`, None if there is none (or it is another owner's)."""
        run = self._anyones(model_id)
        return run if run is not None and run.owner == owner else None

    def _anyones(self, model_id: str) -> Run | None:
        """Run `model_id`, whoever's it is."""
        run = self._known.get(model_id)
        if run is None:
            run = self._one(runs_table.c.model_id == model_id)
            if run is not None:
                self._known[model_id] = run
        return run

    def of_session(self, session_id: str) -> Run | None:
        """The run trained by Bios session `session_id`, if it is one."""
        return self._one(runs_table.c.session_id == session_id)

    def of_tinker_session(self, owner: str, session_id: str) -> list[Run]:
        """`owner`'s runs created by Tinker session `session_id`, oldest first."""
        prefix = runs_table.c.model_id.startswith(model_id(session_id, ""), autoescape=True)
        with self.db.connect() as tx:
            rows = tx.execute(
                select(runs_table).where(runs_table.c.owner == owner, prefix).order_by(runs_table.c.created_at)
            )
            return [_run(row) for row in rows]

    def page(self, owner: str, limit: int, offset: int) -> tuple[list[Run], int]:
        """`owner`'s runs, oldest first, `limit` of them from `offset`, and how many there are."""
        mine = runs_table.c.owner == owner
        with self.db.connect() as tx:
            rows = tx.execute(
                select(runs_table).where(mine).order_by(runs_table.c.created_at).limit(limit).offset(offset)
            )
            runs = [_run(row) for row in rows]
            total = tx.execute(select(func.count()).select_from(runs_table).where(mine)).scalar() or 0
        return runs, total

    def bios_path(self, owner: str, tinker_path: object) -> str:
        """The Bios checkpoint path of `owner`'s `tinker_path`; NotFoundError for another
        owner's run, InvalidRequestError for a malformed path."""
        run_id, kind, name = _parse_tinker_path(tinker_path)
        return f"{SCHEME}{self.get(owner, run_id).session_id}/{kind}/{name}"

    def anyones_bios_path(self, tinker_path: object) -> str:
        """The Bios checkpoint path of `tinker_path`, whoever's run it is (for reading a
        published checkpoint); NotFoundError if there is no such run."""
        run_id, kind, name = _parse_tinker_path(tinker_path)
        run = self._anyones(run_id)
        if run is None:
            raise NotFoundError(f"path: no checkpoint at {tinker_path}", field="path")
        return f"{SCHEME}{run.session_id}/{kind}/{name}"

    def tinker_path(self, bios_path: str) -> str:
        """The Tinker path of Bios checkpoint `bios_path` of a Tinker run."""
        session_id, _, _ = parse_path(bios_path)
        run = self.of_session(session_id)
        if run is None:
            raise NotFoundError(f"path: {bios_path} belongs to no Tinker training run", field="path")
        return TINKER_SCHEME + run.model_id + bios_path[len(SCHEME) + len(session_id) :]

    def _one(self, where: ColumnElement[bool]) -> Run | None:
        with self.db.connect() as tx:
            row = tx.execute(select(runs_table).where(where)).first()
        return None if row is None else _run(row)


def _run(row: Row) -> Run:
    m = row._mapping
    return Run(
        m["model_id"],
        m["session_id"],
        m["owner"],
        m["base_model"],
        m["lora_rank"],
        json.loads(m["user_metadata"]),
        m["created_at"],
    )


def _parse_tinker_path(path: object) -> tuple[str, str, str]:
    """(run id, kind directory, name) of `tinker://RUN/KIND/NAME`, KIND one of `KIND_DIRS`."""
    parts = path[len(TINKER_SCHEME) :].split("/") if isinstance(path, str) and path.startswith(TINKER_SCHEME) else []
    if len(parts) != 3 or parts[1] not in KIND_DIRS or not all(parts):
        raise InvalidRequestError(
            f"path {path!r} is not a checkpoint path (tinker://RUN/weights/NAME, "
            "tinker://RUN/sampler_weights/NAME or tinker://RUN/external_weights/NAME)",
            field="path",
        )
    return parts[0], parts[1], parts[2]
