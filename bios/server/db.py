"""The server's records in a SQL database: sessions, requests with their answers, samplers,
checkpoints, and the ledger of finished requests (`bios.server.ledger`).

SQLite under `BIOS_HOME/server/bios.db` by default; any SQLAlchemy URL (PostgreSQL:
`postgresql+psycopg://...`) works unchanged, since every statement is SQLAlchemy Core. Tensors
never live here: checkpoints and session states are files of the checkpoint store, and this
database holds who owns them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import (
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine as SqlEngine
from sqlalchemy.engine import Row, make_url

from bios.server import ledger

metadata = MetaData()

sessions = Table(
    "sessions",
    metadata,
    Column("session_id", String(64), primary_key=True),
    Column("owner", String(64), nullable=False, index=True),
    Column("base_model", String(256), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("user_metadata", Text, nullable=True),  # JSON object of strings, as created
)

requests = Table(
    "requests",
    metadata,
    Column("request_id", String(64), primary_key=True),
    Column("owner", String(64), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("session_id", String(64), nullable=True),
    Column("seq", Integer, nullable=True),
    Column("idempotency_key", String(256), nullable=True),
    Column("body_hash", String(64), nullable=False),
    Column("status", String(16), nullable=False),  # pending | done | error
    Column("answer", LargeBinary, nullable=True),  # the envelope, exactly as served
    Column("replay", LargeBinary, nullable=True),  # what re-applies an acknowledged gradient after a restart
    Column("body", LargeBinary, nullable=True),  # the request as received, while pending: a restart runs it again
    Column("created_at", Float, nullable=False),
    Column("finished_at", Float, nullable=True),
    UniqueConstraint("owner", "idempotency_key", name="one_request_per_key"),
    Index("requests_by_finish", "status", "finished_at"),
    Index("requests_by_session", "session_id", "seq"),  # forget_replays on every step, session_requests
)

checkpoints = Table(
    "checkpoints",
    metadata,
    Column("path", String(512), primary_key=True),
    Column("owner", String(64), nullable=False, index=True),
    Column("session_id", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
)


samplers = Table(
    "samplers",
    metadata,
    Column("sampler_id", String(64), primary_key=True),
    Column("owner", String(64), nullable=False),
    Column("base_model", String(256), nullable=True),  # exactly one of base_model and model_path
    Column("model_path", String(512), nullable=True),
)


@dataclass(frozen=True, slots=True)
class RequestRow:
    request_id: str
    owner: str
    kind: str
    session_id: str | None
    seq: int | None
    idempotency_key: str | None
    body_hash: str
    status: str
    answer: bytes | None
    replay: bytes | None = None
    body: bytes | None = None
    """The request's body as its route parsed it (inflated); kept only while it is pending."""


def default_url(home: Path) -> str:
    """SQLite in `home/server/bios.db`."""
    directory = Path(home) / "server"
    directory.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{directory / 'bios.db'}"


def connect(url: str) -> SqlEngine:
    """An engine on `url` with the tables created. SQLite gets WAL journaling with
    synchronous=NORMAL: a commit is written to the WAL file (the operating system's page cache)
    before it returns, so a committed row survives `kill -9` of the server, which is the promise
    `bios serve` makes (its journal files are not fsynced either); only a power loss or an
    operating-system crash could lose the last commits. FULL would add an fsync per commit,
    milliseconds on every request."""
    sqlite = make_url(url).get_backend_name() == "sqlite"
    engine = create_engine(url, pool_pre_ping=not sqlite)  # a file has no connection to lose
    if sqlite:

        @event.listens_for(engine, "connect")
        def _pragmas(connection, _record) -> None:
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

    metadata.create_all(engine)
    ledger.metadata.create_all(engine)
    _add_missing_columns(engine)
    return engine


def _add_missing_columns(engine: SqlEngine) -> None:
    """Add the nullable columns and the indexes a database made by an earlier Bios lacks
    (`requests.body`, `requests_by_session`, `sessions.user_metadata`)."""
    with engine.begin() as db:
        for table in (sessions, requests):
            present = {column["name"] for column in inspect(db).get_columns(table.name)}
            for column in table.columns:
                if column.name not in present:
                    kind = column.type.compile(dialect=engine.dialect)
                    db.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}"))
            for index in table.indexes:
                index.create(db, checkfirst=True)


class Records:
    """Reads and writes of the three tables; every method is one transaction."""

    def __init__(self, engine: SqlEngine) -> None:
        self.engine = engine

    # ---- sessions ---------------------------------------------------------------------------

    def add_session(
        self, session_id: str, owner: str, base_model: str, user_metadata: dict[str, str] | None = None
    ) -> None:
        with self.engine.begin() as db:
            db.execute(
                insert(sessions).values(
                    session_id=session_id,
                    owner=owner,
                    base_model=base_model,
                    created_at=time.time(),
                    user_metadata=json.dumps(user_metadata or {}),
                )
            )

    def session_metadata(self, session_id: str) -> dict[str, str]:
        """The user metadata session `session_id` was created with ({} if none)."""
        with self.engine.connect() as db:
            stored = db.execute(select(sessions.c.user_metadata).where(sessions.c.session_id == session_id)).scalar()
        return json.loads(stored) if stored else {}

    def session_owner(self, session_id: str) -> str | None:
        with self.engine.connect() as db:
            return db.execute(select(sessions.c.owner).where(sessions.c.session_id == session_id)).scalar()

    def session_base_model(self, session_id: str) -> str | None:
        with self.engine.connect() as db:
            return db.execute(select(sessions.c.base_model).where(sessions.c.session_id == session_id)).scalar()

    def sessions_of(self, owner: str | None) -> list[tuple[str, str, str, float]]:
        """(session_id, owner, base_model, created_at) of `owner`'s sessions (everyone's for None)."""
        query = select(sessions.c.session_id, sessions.c.owner, sessions.c.base_model, sessions.c.created_at).order_by(
            sessions.c.created_at
        )
        if owner is not None:
            query = query.where(sessions.c.owner == owner)
        with self.engine.connect() as db:
            return [tuple(row) for row in db.execute(query)]

    # ---- requests ---------------------------------------------------------------------------

    def add_request(self, row: RequestRow) -> None:
        with self.engine.begin() as db:
            db.execute(
                insert(requests).values(
                    request_id=row.request_id,
                    owner=row.owner,
                    kind=row.kind,
                    session_id=row.session_id,
                    seq=row.seq,
                    idempotency_key=row.idempotency_key,
                    body_hash=row.body_hash,
                    status=row.status,
                    answer=row.answer,
                    replay=row.replay,
                    body=row.body,
                    created_at=time.time(),
                    finished_at=None if row.status == "pending" else time.time(),
                )
            )

    def finish_requests(self, answers: Iterable[tuple[str, str, bytes]], entries: Iterable[ledger.Entry] = ()) -> None:
        """Store (request_id, status, answer) for each finished request, and their `entries`
        in the ledger, in one transaction; their bodies are no longer kept."""
        now = time.time()
        with self.engine.begin() as db:
            ledger.write(db, entries)
            for request_id, status, answer in answers:
                db.execute(
                    update(requests)
                    .where(requests.c.request_id == request_id)
                    .values(status=status, answer=answer, body=None, finished_at=now)
                )

    def request_by_key(self, owner: str, key: str) -> RequestRow | None:
        with self.engine.connect() as db:
            row = db.execute(
                select(requests).where(requests.c.owner == owner, requests.c.idempotency_key == key)
            ).first()
        return None if row is None else _request_row(row)

    def request(self, request_id: str) -> RequestRow | None:
        with self.engine.connect() as db:
            row = db.execute(select(requests).where(requests.c.request_id == request_id)).first()
        return None if row is None else _request_row(row)

    def session_requests(self, session_id: str) -> list[RequestRow]:
        """Every remembered request of one session, by sequence number."""
        with self.engine.connect() as db:
            rows = db.execute(select(requests).where(requests.c.session_id == session_id).order_by(requests.c.seq))
            return [_request_row(row) for row in rows]

    def pending_requests(self) -> list[RequestRow]:
        """Every request not yet answered, oldest first."""
        with self.engine.connect() as db:
            rows = db.execute(select(requests).where(requests.c.status == "pending").order_by(requests.c.created_at))
            return [_request_row(row) for row in rows]

    def prune_requests(self, finished_before: float) -> int:
        """Forget finished requests older than `finished_before` (epoch seconds); returns how many."""
        with self.engine.begin() as db:
            result = db.execute(
                delete(requests).where(
                    requests.c.status != "pending",
                    requests.c.replay.is_(None),
                    requests.c.finished_at < finished_before,
                )
            )
        return result.rowcount or 0

    def forget_replays(self, session_id: str, up_to_seq: int) -> None:
        """Drop the replay data of `session_id`'s requests numbered below `up_to_seq` (a durable
        state now includes them)."""
        with self.engine.begin() as db:
            db.execute(
                update(requests)
                .where(requests.c.session_id == session_id, requests.c.seq < up_to_seq, requests.c.replay.is_not(None))
                .values(replay=None)
            )

    # ---- samplers ---------------------------------------------------------------------------

    def add_sampler(self, sampler_id: str, owner: str, base_model: str | None, model_path: str | None) -> None:
        with self.engine.begin() as db:
            db.execute(
                insert(samplers).values(
                    sampler_id=sampler_id, owner=owner, base_model=base_model, model_path=model_path
                )
            )

    def remove_sampler(self, sampler_id: str) -> None:
        with self.engine.begin() as db:
            db.execute(delete(samplers).where(samplers.c.sampler_id == sampler_id))

    def all_samplers(self) -> list[tuple[str, str, str | None, str | None]]:
        """(sampler_id, owner, base_model, model_path) of every recorded sampler."""
        with self.engine.connect() as db:
            return [
                tuple(row)
                for row in db.execute(
                    select(samplers.c.sampler_id, samplers.c.owner, samplers.c.base_model, samplers.c.model_path)
                )
            ]

    # ---- checkpoints ------------------------------------------------------------------------

    def add_checkpoint(self, path: str, owner: str, session_id: str) -> None:
        with self.engine.begin() as db:
            db.execute(delete(checkpoints).where(checkpoints.c.path == path))
            db.execute(
                insert(checkpoints).values(path=path, owner=owner, session_id=session_id, created_at=time.time())
            )

    def checkpoint_owner(self, path: str) -> str | None:
        with self.engine.connect() as db:
            return db.execute(select(checkpoints.c.owner).where(checkpoints.c.path == path)).scalar()

    def checkpoints_of(self, owner: str) -> set[str]:
        with self.engine.connect() as db:
            return set(db.execute(select(checkpoints.c.path).where(checkpoints.c.owner == owner)).scalars())

    def remove_checkpoint(self, path: str) -> None:
        with self.engine.begin() as db:
            db.execute(delete(checkpoints).where(checkpoints.c.path == path))


def _request_row(row: Row) -> RequestRow:
    m = row._mapping
    return RequestRow(
        m["request_id"],
        m["owner"],
        m["kind"],
        m["session_id"],
        m["seq"],
        m["idempotency_key"],
        m["body_hash"],
        m["status"],
        m["answer"],
        m["replay"],
        m["body"],
    )
