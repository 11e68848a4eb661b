"""The official Tinker SDK against `bios serve`, end to end, for two pinned SDK releases.

Each release runs unmodified in a child process (tests/support/tinker_sdk.py), whose script is
sdk_side.py. The child
drives the SDK against a `ThreadedServer` on the emulator, which advertises small forward_backward
chunks and zstd bodies so that chunking, the first chunk arriving last, and decompression are all
exercised. The child reports what it saw
as JSON and every assertion is made here.
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import json
from pathlib import Path

import pytest
from tinker_sdk import REPO, SDK_RELEASES, run_sdk, sdk_directory

from bios import types

pytestmark = pytest.mark.slow  # installs two SDK releases and runs them in child processes

MODEL = "bios/tiny"
KEY_A, KEY_B = "tml-tinker-alice-0123456789", "tml-tinker-bob-0123456789"
KEY_C = "tml-tinker-carol-0123456789"
KEY_D = "tml-tinker-dave-0123456789"
"""Dave's key only lists its sessions, so it has no others."""
"""Carol's key does only the account scenario, so its figures are exactly that scenario's."""
TEXTS = (
    "the cat sat on the mat",
    "a quick brown fox jumps over the lazy dog",
    "tinker speaks to bios",
    "one two three four five six",
    "hello world, this is a test",
)
PROMPT_TEXT = "the quick brown fox"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from server_process import ThreadedServer

    from bios.server import ServerOptions
    from bios.server.tinker import session_routes

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BIOS_API_KEYS", f"{KEY_A},{KEY_B},{KEY_C},{KEY_D}")
        patch.setitem(session_routes.CLIENT_CONFIG, "fwdbwd_max_chunk_len", 2)
        patch.setitem(session_routes.CLIENT_CONFIG, "proto_compress_fwdbwd", True)
        with ThreadedServer(ServerOptions(backend="emulator", home=tmp_path_factory.mktemp("tinker-home"))) as running:
            yield running


@pytest.fixture(scope="module")
def simulated_server(tmp_path_factory):
    """The same server under the service simulator's fault profile (examples/profiles/faults.toml)."""
    from server_process import ThreadedServer

    from bios.server import ServerOptions

    profile = REPO / "examples" / "profiles" / "faults.toml"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BIOS_API_KEYS", f"{KEY_A},{KEY_B}")
        with ThreadedServer(
            ServerOptions(backend="emulator", home=tmp_path_factory.mktemp("faulty-home"), simulation=profile)
        ) as running:
            yield running


@pytest.fixture(scope="module", params=SDK_RELEASES)
def trained(request, server) -> tuple[str, dict]:
    """(SDK version, what the training scenario observed) for each pinned release."""
    return request.param, run_sdk(request.param, "training", url=server.url, key=KEY_A, text=TEXTS, prompt=PROMPT_TEXT)


# ---- the protobuf schema -------------------------------------------------------------------------


def sdk_descriptor(version: str):
    """The FileDescriptorProto serialised in the release's generated `tinker_public_pb2.py`."""
    from google.protobuf import descriptor_pb2

    source = (sdk_directory(version) / "tinker" / "proto" / "tinker_public_pb2.py").read_text()
    calls = [
        n
        for n in ast.walk(ast.parse(source))
        if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "AddSerializedFile"
    ]
    return descriptor_pb2.FileDescriptorProto.FromString(calls[0].args[0].value)


@pytest.mark.parametrize("version", SDK_RELEASES)
def test_the_protobuf_schema_equals_the_sdks(version):
    from google.protobuf import descriptor_pool, message_factory

    from bios.server.tinker import proto

    theirs = sdk_descriptor(version)
    ours = proto.file_descriptor()
    assert (ours.name, ours.package, ours.syntax) == (theirs.name, theirs.package, theirs.syntax)
    their_messages = {m.name: m for m in theirs.message_type}
    assert {m.name: m for m in ours.message_type} == {name: their_messages[name] for name in proto.MESSAGES}
    assert set(their_messages) - set(proto.MESSAGES) == {"SamplingParams", "StopStrings", "StopTokens"}
    assert list(ours.enum_type) == list(theirs.enum_type)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(theirs)
    sdk_request = message_factory.GetMessageClass(pool.FindMessageTypeByName("tinker_public.ForwardBackwardRequest"))
    request = sdk_request(model_id="s:train:0", seq_id=3, loss_fn="ppo", forward_only=True)
    datum = request.data.add()
    datum.model_input.add().encoded_text.tokens = b"\x01\x00\x00\x00"
    datum.loss_fn_inputs["weights"].dense = b"\x00\x00\x80\x3f"
    request.loss_fn_config_v2["clip_low_threshold"].number = 0.5
    wire = request.SerializeToString()
    assert proto.ForwardBackwardRequest.FromString(wire).SerializeToString() == wire


# ---- the SDK drives a whole training run ----------------------------------------------------------


def test_the_handshake_and_the_tokenizer_are_served(trained, server):
    from bios.tokenizer import Tokenizer

    _, seen = trained
    assert MODEL in seen["models"]
    info = seen["info"]
    assert info["model_name"] == MODEL and info["lora_rank"] == 8 and info["model_id"] == seen["run"]
    assert Path(info["tokenizer_id"]).is_dir() and Path(info["tokenizer_id"]).is_relative_to(
        Path(server.options.home).resolve()
    )
    builtin = Tokenizer.builtin()
    assert seen["tokenizer"]["ids"] == [builtin.encode(text) for text in TEXTS]
    assert seen["tokenizer"]["eos_token_id"] == builtin.eos_token_id


def test_sft_steps_lower_the_loss_with_chunked_compressed_requests(trained):
    _, seen = trained
    losses = seen["losses"]
    assert (
        len(losses) == 6
        and all(later < earlier for earlier, later in itertools.pairwise(losses))
        and losses[-1] < 0.8 * losses[0]
    )
    lengths = [len(ids) - 1 for ids in seen["tokenizer"]["ids"]]
    assert seen["output_shapes"] == [[n] for n in lengths], (
        "one logprob per target token, datums in order across 3 chunks"
    )
    assert seen["forward_loss"] == pytest.approx(sum(-x for lp in seen["forward_logprobs"] for x in lp), rel=1e-5)
    assert seen["custom"]["loss"] == pytest.approx(seen["custom"]["forward_loss"], rel=1e-5)
    assert seen["custom"]["surrogate"] == pytest.approx(seen["custom"]["forward_loss"], rel=1e-5)
    assert seen["custom"]["metric"] == len(TEXTS)
    assert seen["custom"]["step"] == 7


def test_sampling_from_saved_weights_with_prompt_logprobs(trained):
    _, seen = trained
    ephemeral, named = seen["samples"]["ephemeral"], seen["samples"]["named"]
    assert len(ephemeral["sequences"]) == 2 and len(set(ephemeral["sequence_ids"])) == 2
    assert ephemeral["sequences"] == named["sequences"], "greedy samples of the same weights agree"
    for sequence in ephemeral["sequences"]:
        assert 1 <= len(sequence["tokens"]) <= 6 and len(sequence["logprobs"]) == len(sequence["tokens"])
        assert sequence["stop_reason"] == ("length" if len(sequence["tokens"]) == 6 else "stop")
    prompt_logprobs = ephemeral["prompt_logprobs"]
    assert prompt_logprobs[0] is None and len(prompt_logprobs) == len(seen["samples"]["prompt"])
    assert prompt_logprobs[1:] == pytest.approx(seen["samples"]["forward_logprobs"], rel=1e-4, abs=1e-5)
    computed = seen["samples"]["computed"]
    assert computed[0] is None and computed[1:] == pytest.approx(prompt_logprobs[1:], rel=1e-6)
    assert named["base_model"] == MODEL


def test_save_and_load_state_with_and_without_the_optimizer(trained):
    _, seen = trained
    state = seen["state"]
    assert (
        state["path"] == f"tinker://{seen['run']}/weights/ckpt"
        and state["sampler_path"] == f"tinker://{seen['run']}/sampler_weights/sampler"
    )
    assert state["resumed_loss"] == pytest.approx(state["saved_loss"], rel=1e-9)
    assert state["weights_only_loss"] == pytest.approx(state["saved_loss"], rel=1e-9)
    after = state["after_one_step"]
    assert after["with_optimizer"] == pytest.approx(after["original"], rel=1e-9), (
        "resumed Adam moments continue the run exactly"
    )
    assert after["weights_only"] != pytest.approx(after["original"], rel=1e-6), "a fresh optimizer steps differently"
    assert state["reloaded_loss"] == pytest.approx([state["saved_loss"]] * 2, rel=1e-9)
    assert state["reloaded_step"] == pytest.approx([after["weights_only"], after["with_optimizer"]], rel=1e-9)


def test_runs_and_checkpoints_are_listed(trained):
    _, seen = trained
    listing = seen["listing"]
    assert {seen["run"], *seen["resumed_runs"]} <= set(listing["runs"])
    assert listing["checkpoints"] == [
        ["weights/ckpt", "training", seen["state"]["path"]],
        ["sampler_weights/sampler", "sampler", seen["state"]["sampler_path"]],
    ]
    assert (
        listing["last_checkpoint"] == "weights/ckpt" and listing["last_sampler_checkpoint"] == "sampler_weights/sampler"
    )
    assert {seen["state"]["path"], seen["state"]["sampler_path"]} <= set(listing["user_checkpoints"])
    assert seen["weights_info"] == [MODEL, 8, True, True, True]


def test_unsupported_features_are_refused_without_stalling_the_run(trained):
    _, seen = trained
    assert seen["unsupported"]["encrypted_external"] == "BadRequestError"
    assert seen["unsupported"]["forward_after"] == pytest.approx(seen["unsupported"]["forward_before"], rel=1e-9)


def test_checkpoint_archives_download_as_peft_adapters(trained, server):
    from bios.server.auth import owner_of
    from bios.server.tinker.ids import Runs

    version, seen = trained
    if version == "0.38.0":
        assert seen["archives"] is None, "0.38 has no archive call (its CLI downloads through save_weights_external)"
        return
    archives = seen["archives"]
    for archive in archives.values():
        assert archive["members"] == ["adapter_config.json", "adapter_model.safetensors", "checkpoint_complete"]
    sampler = Runs(server.service.records.engine).bios_path(owner_of(KEY_A), seen["state"]["sampler_path"])
    exported = (server.service.engine.store.peft_directory(sampler) / "adapter_model.safetensors").read_bytes()
    assert archives["sampler"]["adapter_sha256"] == hashlib.sha256(exported).hexdigest()
    assert archives["state"]["adapter_sha256"] == archives["sampler"]["adapter_sha256"], (
        "both were saved from the same weights"
    )


def test_a_key_sees_none_of_another_keys_runs_or_checkpoints(trained, server):
    version, seen = trained
    bob = run_sdk(
        version,
        "intruder",
        url=server.url,
        key=KEY_B,
        run=seen["run"],
        state=seen["state"]["path"],
        sampler=seen["state"]["sampler_path"],
    )
    assert seen["run"] not in bob["runs"] and bob["own_run"] in bob["runs"]
    assert set(bob["user_checkpoints"]).isdisjoint({seen["state"]["path"], seen["state"]["sampler_path"]})
    assert bob["own_checkpoints"] == [], "bob deleted his only checkpoint"
    assert bob["refused"] == {
        "delete_checkpoint": "NotFoundError",
        "get_training_run": "NotFoundError",
        "list_checkpoints": "NotFoundError",
        "weights_info": "NotFoundError",
        "create_training_client_from_state": "NotFoundError",
        "create_sampling_client": "NotFoundError",
    }


def test_the_sdk_trains_through_simulated_faults_to_the_same_losses(server, simulated_server):
    """5xx, 408 and 429 answers (and a restart) from a simulating server: the SDK carries on and
    its losses are exactly those of a server without faults."""
    import httpx

    version = SDK_RELEASES[0]
    clean = run_sdk(version, "sft_steps", url=server.url, key=KEY_A, text=TEXTS, steps=16)
    faulty = run_sdk(version, "sft_steps", url=simulated_server.url, key=KEY_A, text=TEXTS, steps=16)
    assert faulty["losses"] == clean["losses"]
    assert faulty["losses"][-1] < 0.8 * faulty["losses"][0]
    stats = httpx.get(f"{simulated_server.url}/v1/stats", headers={"Authorization": f"Bearer {KEY_A}"}).json()
    heard = stats["retried_attempts_by_status"]
    assert {"408", "429", "503"} <= set(heard), heard  # the SDK's polls were answered with each
    report = simulated_server.service.simulation_report()
    assert (
        report.faults["restart"] == 1
        and min(report.faults[k] for k in ("transient", "timeout", "rate_limit", "session_expiry")) >= 1
    )
    assert sum(report.retries.values()) >= sum(heard.values())


def test_a_checkpoint_saved_with_the_sdks_ttl_expires(server):
    seen = run_sdk("0.38.0", "expiring_checkpoint", url=server.url, key=KEY_B)
    assert seen == {"at_once": "no error", "later": "NotFoundError"}


def test_the_clis_checkpoint_download_is_a_peft_adapter_that_computes_what_bios_does(server, service, tmp_path):
    """0.38's `tinker checkpoint download` of a trained run's checkpoint: a PEFT adapter that
    `peft` loads on the base model (Bios's merged export of an untrained adapter), giving the
    run's logprobs; the CLI's temporary external weights are deleted afterwards."""
    import numpy as np
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from bios.export import export_merged

    tokens = list(range(5, 29))
    seen = run_sdk(
        "0.38.0", "checkpoint_download", url=server.url, key=KEY_B, tokens=tokens, steps=3, output=str(tmp_path)
    )
    exit_code, stdout, error = seen["cli"]
    assert exit_code == 0, (stdout, error)
    destination = Path(json.loads(stdout)["destination"])
    assert destination.parent == tmp_path and sorted(p.name for p in destination.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert seen["checkpoints"] == [seen["path"]], "the temporary export is deleted"
    commands = seen["commands"]
    assert all(code == 0 for code, _ in commands.values()), commands
    run_id = seen["path"].split("/")[2]
    assert run_id in commands["run list"][1] and run_id in commands["run info"][1]
    assert seen["path"] in commands["checkpoint list"][1] and seen["path"] in commands["checkpoint info"][1]
    assert seen["after_delete"] == [], "tinker checkpoint delete removed it"

    untrained = service.create_lora_training_client(MODEL, rank=4).save_state("sdk-download-base").result().path
    base = export_merged(untrained, tmp_path / "base", catalog=service.transport.catalog)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager")
    adapted = peft.PeftModel.from_pretrained(model, destination).eval()

    def logprobs() -> np.ndarray:
        with torch.no_grad():
            logits = adapted(input_ids=torch.tensor([tokens[:-1]]), use_cache=False).logits[0].double()
        return logits.log_softmax(-1)[torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])].numpy()

    np.testing.assert_allclose(logprobs(), seen["logprobs"], rtol=0, atol=1e-4)
    with adapted.disable_adapter():
        assert np.abs(logprobs() - seen["logprobs"]).max() > 1e-2, "the adapter changes nothing"


def test_the_sdks_topk_prompt_logprobs_are_bioss(server, service):
    """0.38's `topk_prompt_logprobs` (and with `prompt_logprobs_last_n`) give the top-k rows
    the native API gives for the same base model."""
    prompt, k = [5, 17, 99, 3, 250], 3
    seen = run_sdk("0.38.0", "topk_prompt", url=server.url, key=KEY_B, prompt=prompt, k=k)
    ours = (
        service.create_sampling_client(base_model=MODEL)
        .sample(types.ModelInput.from_ints(prompt), types.SamplingParams(max_tokens=1), 1, True, k)
        .result()
    )
    assert seen["whole"][0] is None and seen["tail"][:3] == [None] * 3
    for theirs, row in zip(seen["whole"][1:], ours.topk_prompt_logprobs[1:], strict=True):
        assert [token for token, _ in theirs] == [token for token, _ in row]
        assert [lp for _, lp in theirs] == pytest.approx([lp for _, lp in row], abs=1e-5)
    assert seen["tail"][3:] == seen["whole"][3:]
    assert seen["prompt_logprobs"][1:] == pytest.approx(ours.prompt_logprobs[1:], abs=1e-5)


def test_the_sdks_session_listing_sees_the_keys_sessions_runs_samplers_and_metadata(server):
    seen = run_sdk("0.38.0", "sessions", url=server.url, key=KEY_D)
    assert seen["listed"] == [seen["session_id"], seen["other"]], "the key's sessions, oldest first"
    assert seen["second_page"] == [seen["other"]]
    session = seen["session"]
    assert session["training_run_ids"] == [seen["model_id"]] and len(session["sampler_ids"]) == 1
    assert (session["user_metadata"], session["display_name"]) == ({"team": "bios"}, "sessions test")
    assert seen["unknown"] == "NotFoundError"
    assert seen["publicity"] == [False, True, False]


def test_the_sdks_account_calls_see_the_keys_own_usage_sizes_and_trace(server):
    """0.38's login check, AdminClient usage and storage, checkpoint sizes and the CLI's
    export-trace and billing commands, for a key that did exactly this scenario's work."""
    from bios.server.auth import owner_of

    seen = run_sdk("0.38.0", "accounts", url=server.url, key=KEY_C, text=TEXTS, steps=3, prompt=[5, 17, 99])
    owner = owner_of(KEY_C)
    assert seen["me"]["key_id"] == int(owner, 16) and seen["me"]["name"] == "BIOS_API_KEYS"
    events = {e["event_info"]["type"]: e for e in seen["usage"]["data"]}
    assert {t: e["event_info"].get("token_count", e["event_info"].get("count")) for t, e in events.items()} == {
        "training": seen["trained"],
        "sampling_prefill": 3,
        "sampling_sample": seen["sampled"],
        "checkpoint": 1,
    }
    assert seen["sampled"] == 2 * 4 and {e["session_id"] for e in events.values()} == {seen["session_id"]}
    assert events["training"]["base_model"] == MODEL and seen["session_id"] in seen["usage"]["sessions"]
    (size,) = seen["checkpoints"].values()
    (held,) = seen["storage"]["data"]
    assert held["checkpoint_count"] == 1 and held["size_bytes"] == size > 0
    ((path, _),) = [(p, s) for p, s in seen["checkpoints"].items()]
    directory = server.service.engine.store.root / server.service.records.sessions_of(owner)[0][0] / "weights"
    assert size == sum(f.stat().st_size for f in directory.rglob("*") if f.is_file()), path
    code, out = seen["cli"]["export_trace"]
    assert code == 0 and json.loads(out)["session_id"] == seen["session_id"]
    spans = [e["name"] for e in seen["trace"]["traceEvents"] if e["ph"] == "X"]
    assert spans[0] == "create_model" and spans[-2:] == ["save_weights", "sample"]
    assert spans.count("optim_step") == 3 and "forward_backward" in spans
    code, out = seen["cli"]["checkpoint_storage"]
    assert code == 0 and json.loads(out)["data"][0]["size_bytes"] == size
