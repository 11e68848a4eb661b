"""Tinker client sessions, with their training runs and sampling sessions, in memory.

An SDK process opens a session, heartbeats it every 10 s and (on `close()`) finishes it. A
session that has finished, or missed heartbeats for `EXPIRY_S`, is over: its heartbeats are
answered 410 (which stops the SDK's heartbeat loop), it can create nothing more, and its
training runs and sampling sessions are released (the runs' checkpoints stay, listed and
resumable). A sampling session is a Bios sampler; its id is the sampler id. After a server
restart a session is known again by the runs it created (the runs themselves are restored by
the service), so an SDK process that outlived the restart carries on.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from functools import partial

from bios.errors import BiosError, NotFoundError

EXPIRY_S = 600.0
"""A session without a heartbeat for this long is over (the SDK warns after 120 s of failures)."""
FORGET_S = 86400.0
"""A session over and silent for this long is forgotten (its heartbeats then get 404)."""


class SessionExpiredError(BiosError):
    """The Tinker session has finished or expired (410: the SDK stops heartbeating it)."""

    code = "session_expired"
    status = 410


@dataclass(frozen=True, slots=True)
class Sampler:
    """A sampling session: the Bios sampler, its base model and the Tinker path it samples."""

    sampler_id: str
    owner: str
    session_id: str
    base_model: str
    model_path: str | None


@dataclass(frozen=True, slots=True)
class SessionFacts:
    """What a session says of itself: its live sampling sessions, and the user metadata and
    display name it was created with (none for a session known again after a restart)."""

    sampler_ids: list[str]
    user_metadata: dict[str, str]
    display_name: str | None
    created_at: float


@dataclass(slots=True)
class _Session:
    owner: str
    last_seen: float
    over: bool = False
    created_at: float = field(default_factory=time.time)
    user_metadata: dict[str, str] = field(default_factory=dict)
    display_name: str | None = None
    runs: list[str] = field(default_factory=list)  # Bios session ids
    samplers: dict[Hashable, str] = field(default_factory=dict)  # sampling_session_seq_id (or other key) -> sampler id


@dataclass(frozen=True, slots=True)
class Releases:
    """How to free what an ended session held: `sampler(owner, sampler_id)` and `run(owner,
    bios_session_id)`; `runs_of(owner, session_id)` lists a session's runs after a restart."""

    sampler: Callable[[str, str], None]
    run: Callable[[str, str], None]
    runs_of: Callable[[str, str], list[str]]


class Sessions:
    """Live Tinker sessions; what an ended session held is freed through `releases`."""

    def __init__(self, releases: Releases, expiry_s: float = EXPIRY_S) -> None:
        self._releases = releases
        self.expiry_s = expiry_s
        self._lock = threading.Lock()
        self._sessions: dict[str, _Session] = {}
        self._samplers: dict[str, Sampler] = {}

    def create(self, owner: str, user_metadata: dict[str, str] | None = None, display_name: str | None = None) -> str:
        """A new session of `owner`; also ends sessions that expired meanwhile."""
        self.expire()
        session_id = f"sess-{uuid.uuid4().hex[:16]}"
        session = _Session(owner, time.monotonic(), user_metadata=dict(user_metadata or {}), display_name=display_name)
        with self._lock:
            self._sessions[session_id] = session
        return session_id

    def facts(self, owner: str, session_id: str) -> SessionFacts:
        """What `owner`'s session `session_id` says of itself (NotFoundError for another's)."""
        with self._lock:
            s = self._owned(owner, session_id)
            return SessionFacts(list(s.samplers.values()), dict(s.user_metadata), s.display_name, s.created_at)

    def remembered(self, owner: str) -> dict[str, float]:
        """`owner`'s sessions held in memory (live, or over but not yet forgotten), each with
        the unix time it was created."""
        with self._lock:
            return {k: s.created_at for k, s in self._sessions.items() if s.owner == owner}

    def heartbeat(self, owner: str, session_id: str) -> None:
        """Keep `owner`'s session alive; SessionExpiredError once it is over."""
        self.expire()
        with self._lock:
            self._live(owner, session_id).last_seen = time.monotonic()

    def check(self, owner: str, session_id: str) -> None:
        """NotFoundError unless `session_id` is `owner`'s; SessionExpiredError if it is over."""
        self.expire()
        with self._lock:
            self._live(owner, session_id)

    def adopt(self, owner: str, session_id: str) -> None:
        """Know `owner`'s session `session_id` again after a restart (a request it made before
        is run again), live as of now; a session known already is left as it is."""
        with self._lock:
            if session_id not in self._sessions:
                runs = self._releases.runs_of(owner, session_id)
                self._sessions[session_id] = _Session(owner, time.monotonic(), runs=runs)

    def owns(self, owner: str, session_id: str) -> bool:
        """Whether `session_id` is `owner`'s session, live or over (while it is remembered)."""
        with self._lock:
            try:
                self._owned(owner, session_id)
            except NotFoundError:
                return False
        return True

    def add_run(self, owner: str, session_id: str, run_session_id: str) -> None:
        """File Bios session `run_session_id` as a training run of `owner`'s live session."""
        with self._lock:
            self._live(owner, session_id).runs.append(run_session_id)

    def finish(self, owner: str, session_id: str) -> None:
        """End `owner`'s session now and release what it held (finishing twice is harmless)."""
        with self._lock:
            session = self._owned(owner, session_id)
            released = self._end(session)
        self._release_all(released)

    def expire(self) -> None:
        """End every session whose last heartbeat is older than `expiry_s`; forget those over
        and silent for `FORGET_S`."""
        now = time.monotonic()
        with self._lock:
            released = [
                f
                for session in self._sessions.values()
                if not session.over and session.last_seen < now - self.expiry_s
                for f in self._end(session)
            ]
            for session_id in [
                k for k, session in self._sessions.items() if session.over and session.last_seen < now - FORGET_S
            ]:
                del self._sessions[session_id]
        self._release_all(released)

    def sampler_of(self, owner: str, session_id: str, key: Hashable) -> str | None:
        """The sampler this session already filed under `key` (its sampling_session_seq_id), if any."""
        with self._lock:
            return self._live(owner, session_id).samplers.get(key)

    def add_sampler(self, sampler: Sampler, key: Hashable) -> str:
        """File `sampler` under its session at `key` and return its id; if another sampler is
        filed there already, return that one's id and leave `sampler` unfiled."""
        with self._lock:
            kept = self._live(sampler.owner, sampler.session_id).samplers.setdefault(key, sampler.sampler_id)
            if kept == sampler.sampler_id:
                self._samplers[kept] = sampler
            return kept

    def sampler(self, owner: str, sampler_id: str) -> Sampler:
        """`owner`'s live sampling session `sampler_id`; NotFoundError otherwise."""
        with self._lock:
            found = self._samplers.get(sampler_id)
        if found is None or found.owner != owner:
            raise NotFoundError(f"sampling_session_id: no sampling session {sampler_id!r}", field="sampling_session_id")
        return found

    def _owned(self, owner: str, session_id: str) -> _Session:
        session = self._sessions.get(session_id)
        if session is None and (runs := self._releases.runs_of(owner, session_id)):  # known from before a restart
            session = self._sessions[session_id] = _Session(owner, time.monotonic(), runs=runs)
        if session is None or session.owner != owner:
            raise NotFoundError(f"session_id: no session {session_id!r}", field="session_id")
        return session

    def _live(self, owner: str, session_id: str) -> _Session:
        session = self._owned(owner, session_id)
        if session.over:
            raise SessionExpiredError(
                f"session_id: session {session_id!r} has finished or expired; create a new ServiceClient",
                field="session_id",
            )
        return session

    def _end(self, session: _Session) -> list[Callable[[], None]]:
        """Mark `session` over; the calls that free what it held."""
        session.over = True
        samplers = [self._samplers.pop(s) for s in session.samplers.values() if s in self._samplers]
        frees: list[Callable[[], None]] = [partial(self._releases.sampler, s.owner, s.sampler_id) for s in samplers]
        frees += [partial(self._releases.run, session.owner, r) for r in session.runs]
        session.samplers.clear()
        session.runs.clear()
        return frees

    def _release_all(self, frees: list[Callable[[], None]]) -> None:
        for free in frees:
            try:
                free()
            except NotFoundError:
                pass  # already released
