"""What a key can learn about itself: who it is, what it used, and the timeline of its sessions.

`GET /auth/apikey/me` is what `tinker auth login` checks a key with. `GET /billing/usage/events`
and `GET /billing/usage/checkpoints/current` are the SDK's usage requests (AdminClient, `tinker
billing`), answered from the ledger (`bios.server.ledger`) for the caller's key alone; Bios
prices nothing, so every cost is None. `GET /sessions/{id}/trace_export` (what `tinker session
export-trace` asks) answers at once with a signed URL of the session's timeline: one Chrome
trace-event JSON file (which Perfetto opens) with a span per request, in submission order,
carrying its kind, status, sizes and usage. Everything here is the caller's own; another key's
session is not found.
"""

from __future__ import annotations

import datetime
import json
import re

from fastapi import APIRouter, Request, Response

from bios.errors import InvalidRequestError, NotFoundError
from bios.server.auth import NO_AUTH_OWNER
from bios.server.ledger import Bucket, Entry
from bios.server.tinker.context import Tinker, TinkerDep, TinkerOwnerDep

MAX_WINDOW = datetime.timedelta(days=14)
"""The longest usage window one request may ask for (the SDK's documented limit)."""
SESSION_ID = re.compile(r"sess-[0-9a-f]{16}")
"""How Bios spells a Tinker session id (`bios.server.tinker.sessions.Sessions.create`)."""

router = APIRouter()


@router.get("/auth/apikey/me")
def api_key_me(who: TinkerOwnerDep, tinker: TinkerDep) -> dict:
    """The calling key as the SDK's `SelfApiKeyResponse`: `key_id` is its owner id read as a
    number (0 on a --no-auth server), `name` its name in the keys file; Bios keys belong to no
    user or organization, so `details` carries the key's name as the email and "Bios" as the
    organization."""
    name = tinker.keys.name_of(who)
    return {
        "key_id": 0 if who == NO_AUTH_OWNER else int(who, 16),
        "name": name,
        "note": f"owner id {who}",
        "details": {"org_details": {"name": "Bios"}, "user_details": {"email": name}},
    }


def _hour(value: datetime.datetime, field: str) -> int:
    """`value` (UTC when naive) in whole hours since the epoch; InvalidRequestError unless it
    is on an hour boundary."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.UTC)
    if (value.minute, value.second, value.microsecond) != (0, 0, 0):
        raise InvalidRequestError(
            f"{field}: must be on a UTC hour boundary (like 2026-01-01T13:00:00Z), got {value.isoformat()}",
            field=field,
        )
    return int(value.timestamp()) // 3600


def _events(bucket: Bucket, who: str, name: str) -> list[dict]:
    """The SDK's `BillingUsageEvent`s of one bucket: one per kind of usage it holds."""
    usage = bucket.usage
    infos = [
        {"type": "training", "token_count": usage.trained_tokens},
        {"type": "sampling_prefill", "cached": False, "token_count": usage.prefill_tokens},
        {"type": "sampling_sample", "token_count": usage.sampled_tokens},
        {"type": "checkpoint", "count": usage.checkpoints_saved},
    ]
    start = datetime.datetime.fromtimestamp(bucket.hour * 3600, datetime.UTC)
    envelope = {
        "bucket_start": start.isoformat(),
        "bucket_end": (start + datetime.timedelta(hours=1)).isoformat(),
        "base_model": bucket.base_model,
        "user_id": who,
        "user_name": name,
        "session_id": bucket.client_session,
        "project_id": None,
        "estimated_cost_usd": None,
    }
    return [{**envelope, "event_info": info} for info in infos if info.get("token_count", info.get("count"))]


@router.get("/billing/usage/events")
def billing_usage(
    starting_on: datetime.datetime, ending_before: datetime.datetime, who: TinkerOwnerDep, tinker: TinkerDep
) -> dict:
    """The caller's usage per UTC hour in [starting_on, ending_before), per base model and
    Tinker session, as the SDK's `BillingUsageResponse`: ordered by hour, then by descending
    count. InvalidRequestError for a bound off the hour, a start in the future, an empty window
    or one longer than 14 days."""
    first, end = _hour(starting_on, "starting_on"), _hour(ending_before, "ending_before")
    if first * 3600 > datetime.datetime.now(datetime.UTC).timestamp():
        raise InvalidRequestError("starting_on: must not be in the future", field="starting_on")
    if not 0 < end - first <= MAX_WINDOW.total_seconds() // 3600:
        raise InvalidRequestError(
            f"ending_before: must be after starting_on and at most {MAX_WINDOW.days} days after it",
            field="ending_before",
        )
    name = tinker.keys.name_of(who)
    buckets = tinker.service.ledger.buckets(who, first, end)
    events = [e for bucket in buckets for e in _events(bucket, who, name)]
    events.sort(key=lambda e: (e["bucket_start"], -e["event_info"].get("token_count", -1)))
    sessions = {b.client_session: {"user_metadata": None} for b in buckets if b.client_session is not None}
    return {"data": events, "sessions": sessions, "cost_data_through": None}


@router.get("/billing/usage/checkpoints/current")
def checkpoint_storage(who: TinkerOwnerDep, tinker: TinkerDep, project_id: str | None = None) -> dict:
    """The checkpoints the caller's key holds now, as the SDK's
    `CurrentCheckpointStorageUsageResponse` (one item: this key). Bios has no projects, so a
    `project_id` names none (NotFoundError)."""
    if project_id is not None:
        raise NotFoundError(f"project_id: no project {project_id!r}; Bios has no projects, omit it", field="project_id")
    usage = tinker.service.usage(who)
    item = {
        "org_user_urn": who,
        "user_name": tinker.keys.name_of(who),
        "checkpoint_count": usage["checkpoint_count"],
        "size_bytes": usage["checkpoint_bytes"],
        "size_gigabytes": usage["checkpoint_bytes"] / 1e9,
        "estimated_monthly_cost_usd": None,
    }
    return {"effective_rate_usd_per_gigabyte_month": None, "data": [item]}


def _own_session(tinker: Tinker, who: str, session_id: str) -> str:
    """`session_id` if it is one of `who`'s Tinker sessions (live, over, or on record in the
    ledger); InvalidRequestError if it is not spelled like a session id, NotFoundError otherwise."""
    if not SESSION_ID.fullmatch(session_id):
        raise InvalidRequestError(
            f"session_id: {session_id!r} is not a session id (sess- and 16 hex digits)", field="session_id"
        )
    if not (tinker.sessions.owns(who, session_id) or tinker.service.ledger.client_session_owner(session_id) == who):
        raise NotFoundError(f"session_id: no session {session_id!r}", field="session_id")
    return session_id


@router.get("/sessions/{session_id}/trace_export")
def trace_export(session_id: str, request: Request, who: TinkerOwnerDep, tinker: TinkerDep) -> dict:
    """`{"status": "ready", "url"}`: a signed URL (no API key needed, valid for 15 minutes) of
    the timeline of the caller's session, built when it is fetched."""
    token, _expires = tinker.signer.token(json.dumps(["trace", who, _own_session(tinker, who, session_id)]))
    return {"status": "ready", "url": str(request.url_for("tinker_trace", token=token)), "error": None}


@router.get("/traces/{token}", name="tinker_trace")
def download_trace(token: str, tinker: TinkerDep) -> Response:
    """The trace a `trace_export` URL grants (NotFoundError for any other token)."""
    try:
        what, who, session_id = json.loads(tinker.signer.path(token))
    except (ValueError, TypeError):
        what = None
    if what != "trace":
        raise NotFoundError("url: no download at this URL", field="url")
    body = chrome_trace(session_id, tinker.service.ledger.trace(who, session_id))
    return Response(body, media_type="application/json")


def chrome_trace(session_id: str, entries: list[Entry]) -> bytes:
    """The Chrome trace-event JSON of a session's requests: one complete ("X") span per
    request at its submission time (microseconds since the epoch) lasting until it finished,
    on a lane per training run (Bios session) and one for the rest (sampling, creating runs);
    `args` hold the request id, status, body and answer bytes and its usage."""
    lanes: dict[str | None, int] = {}
    for entry in entries:
        lanes.setdefault(entry.session_id, len(lanes) + 1)
    events: list[dict] = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": f"session {session_id}"}}]
    events += [
        {"ph": "M", "pid": 1, "tid": tid, "name": "thread_name", "args": {"name": lane or "sampling and setup"}}
        for lane, tid in lanes.items()
    ]
    for entry in entries:
        events.append(
            {
                "ph": "X",
                "pid": 1,
                "tid": lanes[entry.session_id],
                "name": entry.kind.removeprefix("tinker."),
                "cat": entry.status,
                "ts": round(entry.created_at * 1e6),
                "dur": max(0, round((entry.finished_at - entry.created_at) * 1e6)),
                "args": {
                    "request_id": entry.request_id,
                    "status": entry.status,
                    "base_model": entry.base_model,
                    "request_bytes": entry.request_bytes,
                    "answer_bytes": entry.answer_bytes,
                    **entry.usage.to_dict(),
                },
            }
        )
    return json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}).encode()
