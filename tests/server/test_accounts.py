"""What each key can see of itself: scoped stats, usage counted in the ledger, checkpoint sizes,
the key itself (`/api/v1/auth/apikey/me`), billing usage and session traces; another key's are
not found, and bad input is refused with a typed error that changes nothing."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import httpx
import pytest
from helpers import MODEL, random_batch
from server_process import ThreadedServer
from tinker_http import PROTOBUF, TOKENS, forward_backward, http, new_run, result

import bios
from bios import types
from bios.server import ServerOptions
from bios.server.auth import KeyRing, add_key, owner_of
from bios.server.tinker.ids import Runs

KEY_A, KEY_B, KEY_OP = "tml-accounts-alice-0123456789", "tml-accounts-bob-0123456789", "tml-accounts-op-0123456789"
STEPS = 3


def _options(home: Path) -> ServerOptions:
    return ServerOptions(backend="emulator", home=home)


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("accounts-home")


@pytest.fixture(scope="module")
def server(home):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BIOS_API_KEYS", f"{KEY_A},{KEY_B}")
        patch.setenv("BIOS_OPERATOR_KEYS", KEY_OP)
        with ThreadedServer(_options(home)) as running:
            yield running


def _native(server, key: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def _disk_bytes(home: Path, path: str) -> int:
    """Bytes of the files of checkpoint `path` (bios://SESSION/KIND/NAME) under `home`."""
    directory = home / "checkpoints" / path.removeprefix("bios://")
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def alice_worked(server, home) -> dict:
    """Alice's native work: STEPS training steps of one batch, one sample, one logprobs, one save."""
    service = bios.ServiceClient(base_url=server.url, api_key=KEY_A)
    training = service.create_lora_training_client(MODEL, rank=4, seed=1)
    batch = random_batch(seed=1)
    for _ in range(STEPS):
        training.train(batch, learning_rate=1e-2)
    prompt = types.ModelInput.from_ints([5, 17, 99, 3])
    sampler = service.create_sampling_client(base_model=MODEL)
    sample = sampler.sample(prompt, types.SamplingParams(max_tokens=5, temperature=1.0), num_samples=2).result()
    sampler.compute_logprobs(prompt).result()
    saved = training.save_state("kept").result()
    return {
        "session_id": training.session_id,
        "tokens_per_step": sum(d.model_input.length for d in batch),
        "sampled": sum(len(s.tokens) for s in sample.sequences),
        "prompt": prompt.length,
        "saved": saved,
        "bytes": _disk_bytes(home, saved.path),
    }


def test_usage_counts_the_keys_steps_tokens_and_checkpoint_bytes(server, alice_worked):
    usage = _native(server, KEY_A).get("/v1/usage").json()
    assert usage == {
        "trained_tokens": STEPS * alice_worked["tokens_per_step"],
        "prefill_tokens": 2 * alice_worked["prompt"],  # the sample's prompt and the logprobs' prompt
        "sampled_tokens": alice_worked["sampled"],
        "optim_steps": STEPS,
        "checkpoints_saved": 1,
        "checkpoint_count": 1,
        "checkpoint_bytes": alice_worked["bytes"],
    }
    assert alice_worked["sampled"] > 0 and alice_worked["bytes"] > 0
    assert alice_worked["saved"].size_bytes == alice_worked["bytes"], "save_state's answer is measured too"
    (listed,) = _native(server, KEY_A).get("/v1/checkpoints").json()
    assert listed["size_bytes"] == alice_worked["bytes"]
    assert _native(server, KEY_B).get("/v1/usage").json() == dict.fromkeys(usage, 0), "bob sees none of it"
    assert _native(server, KEY_B).get("/v1/checkpoints").json() == []


def test_stats_are_the_callers_own_and_server_wide_only_for_an_operator(server, alice_worked):
    alice = _native(server, KEY_A).get("/v1/stats").json()
    assert alice["owner"] == owner_of(KEY_A) and "server" not in alice
    assert alice["requests"]["forward_backward"] == {"done": STEPS} and alice["requests"]["optim_step"] == {
        "done": STEPS
    }
    assert alice["requests"]["sample"] == alice["requests"]["logprobs"] == {"done": 1}
    assert alice["usage"] == _native(server, KEY_A).get("/v1/usage").json()
    bob = _native(server, KEY_B).get("/v1/stats").json()
    assert bob["requests"] == {} and "server" not in bob and bob["usage"]["optim_steps"] == 0
    operator = _native(server, KEY_OP).get("/v1/stats").json()
    assert operator["requests"] == {}, "the operator's own figures are its own"
    assert operator["server"]["requests"]["optim_step"]["done"] >= STEPS
    assert operator["server"]["usage"]["trained_tokens"] >= STEPS * alice_worked["tokens_per_step"]
    assert operator["server"]["backend_calls"] == server.service.engine.scheduler.backend_calls > 0


def test_the_keys_file_marks_operator_keys_and_names_them(tmp_path):
    keys_file = tmp_path / "keys"
    plain, operator = add_key(keys_file, "carol"), add_key(keys_file, "dave", operator=True)
    ring = KeyRing(keys_file)
    assert [ring.is_operator(owner_of(k)) for k in (plain, operator)] == [False, True]
    assert [ring.name_of(owner_of(k)) for k in (plain, operator)] == ["carol", "dave"]
    with pytest.raises(bios.InvalidRequestError) as err:
        add_key(keys_file, "two words")
    assert err.value.field == "name" and len(KeyRing(keys_file)) == 2, "a refused name adds no key"
    assert KeyRing(enabled=False).is_operator("local"), "the one user of a --no-auth server"


def _tinker_run(server, key: str) -> dict:
    """A Tinker run of `key` driven over HTTP: two forward_backward + optim_step pairs, a save,
    and one sample of 3 tokens x 2 from a base-model sampling session."""
    client = http(server, key)
    session, model_id = new_run(client)
    for seq in (1, 3):
        fb = client.post("/forward_backward", content=forward_backward(model_id, seq), headers=PROTOBUF)
        assert result(client, fb.json()["request_id"]).status_code == 200
        optim = {"model_id": model_id, "seq_id": seq + 1, "type": "optim_step", "adam_params": {"learning_rate": 0.01}}
        assert result(client, client.post("/optim_step", json=optim).json()["request_id"]).status_code == 200
    save = {"model_id": model_id, "seq_id": 5, "path": "mine", "type": "save_weights"}
    assert result(client, client.post("/save_weights", json=save).json()["request_id"]).status_code == 200
    create = {"session_id": session, "sampling_session_seq_id": 0, "base_model": MODEL}
    sampler = client.post("/create_sampling_session", json=create).json()["sampling_session_id"]
    sample = {
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": TOKENS}]},
        "sampling_params": {"max_tokens": 3, "temperature": 0.0, "stop": []},
        "num_samples": 2,
        "sampling_session_id": sampler,
        "seq_id": 0,
        "type": "sample",
    }
    assert result(client, client.post("/asample", json=sample).json()["request_id"]).status_code == 200
    return {"session": session, "model_id": model_id}


@pytest.fixture(scope="module")
def tinker_run(server) -> dict:
    return _tinker_run(server, KEY_A)


def _hour(delta: int = 0) -> str:
    now = datetime.datetime.now(datetime.UTC).replace(minute=0, second=0, microsecond=0)
    return (now + datetime.timedelta(hours=delta)).isoformat()


def test_billing_usage_is_the_callers_tokens_per_hour_and_session(server, home, alice_worked, tinker_run):
    alice = http(server, KEY_A)
    answer = alice.get("/billing/usage/events", params={"starting_on": _hour(), "ending_before": _hour(1)}).json()
    mine = [e for e in answer["data"] if e["session_id"] == tinker_run["session"]]
    by_type = {e["event_info"]["type"]: e["event_info"] for e in mine}
    assert by_type["training"]["token_count"] == 2 * (len(TOKENS) - 1)
    assert by_type["sampling_prefill"] == {"type": "sampling_prefill", "cached": False, "token_count": len(TOKENS)}
    assert by_type["sampling_sample"]["token_count"] == 2 * 3  # greedy, no stop: max_tokens each
    assert by_type["checkpoint"]["count"] == 1
    assert {e["base_model"] for e in mine} == {MODEL} and answer["sessions"][tinker_run["session"]] == {
        "user_metadata": None
    }
    bob = http(server, KEY_B).get("/billing/usage/events", params={"starting_on": _hour(), "ending_before": _hour(1)})
    assert bob.json()["data"] == [], "bob's usage is his alone"
    held = alice.get("/billing/usage/checkpoints/current").json()["data"]
    listed = {c["tinker_path"]: c["size_bytes"] for c in alice.get("/checkpoints").json()["checkpoints"]}
    (path,) = listed
    on_disk = _disk_bytes(home, Runs(server.service.records.engine).bios_path(owner_of(KEY_A), path))
    assert listed[path] == on_disk > 0, "the Tinker listing carries the size on disk"
    assert held[0]["size_bytes"] == _native(server, KEY_A).get("/v1/usage").json()["checkpoint_bytes"]
    assert held[0]["checkpoint_count"] == 2 and held[0]["size_gigabytes"] == held[0]["size_bytes"] / 1e9
    assert http(server, KEY_B).get("/billing/usage/checkpoints/current").json()["data"][0]["size_bytes"] == 0


def test_apikey_me_names_the_calling_key(server):
    me = http(server, KEY_A).get("/auth/apikey/me").json()
    assert me == {
        "key_id": int(owner_of(KEY_A), 16),
        "name": "BIOS_API_KEYS",
        "note": f"owner id {owner_of(KEY_A)}",
        "details": {"org_details": {"name": "Bios"}, "user_details": {"email": "BIOS_API_KEYS"}},
    }
    assert http(server, KEY_B).get("/auth/apikey/me").json()["key_id"] == int(owner_of(KEY_B), 16)
    assert http(server, "tml-not-a-key").get("/auth/apikey/me").status_code == 401


def test_a_session_trace_lists_its_requests_in_order_for_its_key_alone(server, tinker_run):
    alice, bob = http(server, KEY_A), http(server, KEY_B)
    exported = alice.get(f"/sessions/{tinker_run['session']}/trace_export").json()
    assert exported["status"] == "ready"
    trace = httpx.get(exported["url"]).json()  # signed: no key needed
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert [s["name"] for s in spans] == [
        "create_model",
        "forward_backward",
        "optim_step",
        "forward_backward",
        "optim_step",
        "save_weights",
        "sample",
    ]
    assert all(s["args"]["status"] == "done" and s["dur"] >= 0 and s["args"]["request_bytes"] > 0 for s in spans)
    assert [s["ts"] for s in spans] == sorted(s["ts"] for s in spans)
    assert spans[1]["args"]["trained_tokens"] == len(TOKENS) - 1 and spans[-1]["args"]["sampled_tokens"] == 6
    assert spans[-1]["tid"] != spans[1]["tid"], "sampling runs on its own lane"
    refused = bob.get(f"/sessions/{tinker_run['session']}/trace_export")
    assert refused.status_code == 404 and refused.json()["error"]["field"] == "session_id"
    forged = httpx.get(exported["url"].rsplit(".", 1)[0] + ".forged")
    assert forged.status_code == 404 and forged.json()["error"]["field"] == "url"


def _figures(server, key: str) -> tuple[dict, dict]:
    """(usage, stats) of `key`: what bad input must leave as it was."""
    client = _native(server, key)
    return client.get("/v1/usage").json(), client.get("/v1/stats").json()


@pytest.mark.parametrize(
    ("path", "params", "status", "field"),
    [
        ("/billing/usage/events", {}, 400, "starting_on"),
        ("/billing/usage/events", {"starting_on": "yesterday", "ending_before": "x"}, 400, "starting_on"),
        (
            "/billing/usage/events",
            {"starting_on": _hour(-1)[:14] + "30:00", "ending_before": _hour()},
            400,
            "starting_on",
        ),
        ("/billing/usage/events", {"starting_on": _hour(2), "ending_before": _hour(3)}, 400, "starting_on"),
        ("/billing/usage/events", {"starting_on": _hour(), "ending_before": _hour()}, 400, "ending_before"),
        ("/billing/usage/events", {"starting_on": _hour(-15 * 24), "ending_before": _hour()}, 400, "ending_before"),
        ("/billing/usage/checkpoints/current", {"project_id": "../etc"}, 404, "project_id"),
        ("/sessions/%2E%2E/trace_export", {}, 400, "session_id"),
        ("/sessions/../trace_export", {}, 404, "path"),
        ("/sessions/sess-..%2F..%2Fkeys/trace_export", {}, 404, "path"),
        ("/sessions/sess-0123/trace_export", {}, 400, "session_id"),
        ("/sessions/sess-0123456789abcdef/trace_export", {}, 404, "session_id"),
        ("/traces/not-a-token", {}, 404, "url"),
    ],
)
def test_bad_input_is_refused_by_field_and_changes_nothing(
    server, alice_worked, tinker_run, path, params, status, field
):
    before = _figures(server, KEY_A)
    answer = http(server, KEY_A).get(path, params=params)
    assert (answer.status_code, answer.json()["error"]["field"]) == (status, field), answer.text
    assert field in answer.json()["error"]["message"]
    assert _figures(server, KEY_A) == before


def test_native_bad_input_and_other_keys_objects(server, alice_worked):
    bob = _native(server, KEY_B)
    for session_id in (alice_worked["session_id"], "../../etc", "x" * 300):
        refused = bob.get("/v1/checkpoints", params={"session_id": session_id})
        assert refused.status_code == 404 and refused.json()["error"]["field"] == "session_id"
    path = alice_worked["saved"].path
    assert bob.delete("/v1/checkpoints", params={"path": path}).status_code == 404
    listed = [c["path"] for c in _native(server, KEY_A).get("/v1/checkpoints").json()]
    assert path in listed, "alice's checkpoint stays"


def test_usage_and_traces_survive_a_restart(tmp_path, monkeypatch):
    monkeypatch.setenv("BIOS_API_KEYS", KEY_A)
    with ThreadedServer(_options(tmp_path)) as first:
        training = bios.ServiceClient(base_url=first.url, api_key=KEY_A).create_lora_training_client(MODEL, rank=4)
        training.train(random_batch(seed=2), learning_rate=1e-2)
        run = _tinker_run(first, KEY_A)
        usage = _native(first, KEY_A).get("/v1/usage").json()
        trace = httpx.get(http(first, KEY_A).get(f"/sessions/{run['session']}/trace_export").json()["url"]).json()
    with ThreadedServer(_options(tmp_path)) as again:
        assert _native(again, KEY_A).get("/v1/usage").json() == usage
        assert usage["optim_steps"] == 3 and usage["checkpoints_saved"] == 1
        url = http(again, KEY_A).get(f"/sessions/{run['session']}/trace_export").json()["url"]
        assert json.loads(httpx.get(url).content) == trace
