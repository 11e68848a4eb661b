"""The SDK side of tests/server/test_tinker_sdk.py and test_tinker_restart.py: run as
`python sdk_side.py SCENARIO JSON` in a child process whose path holds one release of the
official `tinker` SDK. Each scenario drives the SDK against a server and prints what it saw as
one line of JSON; the test makes every assertion. Imports only the standard library and `tinker`.
"""

from __future__ import annotations

import hashlib
import json
import sys

MODEL = "bios/tiny"
AGE_RECIPIENT = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p"


def _value(x):
    """The value of an SDK future (the SDKs return futures or values depending on the release)."""
    return x.result() if hasattr(x, "result") else x


def _failure(call) -> str:
    """The name of the exception `call()` raises (the SDK's error classes)."""
    try:
        _value(call())
    except Exception as exc:  # noqa: BLE001 - reported to the test
        return type(exc).__name__
    return "no error"


def training(url: str, key: str, text: list[str], prompt: str) -> dict:
    """One training run through the SDK: SFT steps, custom loss, save, sample, resume, list."""
    import tinker
    from tinker import types

    seen: dict = {}
    service = tinker.ServiceClient(base_url=url, api_key=key)
    client, tokenizer, data = _start(service, text, seen)
    adam = types.AdamParams(learning_rate=1e-2)
    _sft(client, data, adam, seen)
    _custom_loss(client, data, adam, seen)
    state = {
        "path": client.save_state("ckpt").result().path,
        "sampler_path": client.save_weights_for_sampler("sampler").result().path,
    }
    state["saved_loss"] = _forward(client, data)
    seen["samples"] = _samples(service, client, tokenizer.encode(prompt), state["sampler_path"])
    seen["state"] = _resume(service, client, data, adam, state, seen)
    seen["unsupported"] = {
        "forward_before": _forward(client, data),
        "encrypted_external": _failure(
            lambda: client.save_weights_external("hf", age_encryption_recipients=[AGE_RECIPIENT])
        ),
    }
    seen["unsupported"]["forward_after"] = _forward(client, data)
    _listing(service.create_rest_client(), state, seen)
    return seen


def _start(service, text: list[str], seen: dict) -> tuple:
    """A seeded rank-8 run; what the server says of it, and `text` tokenized as SFT data."""
    from tinker import types

    seen["models"] = [m.model_name for m in _value(service.get_server_capabilities()).supported_models]
    client = _value(service.create_lora_training_client(MODEL, rank=8, seed=3))
    seen["run"] = client.model_id
    info = client.get_info()
    seen["info"] = {
        "model_id": info.model_id,
        "model_name": info.model_data.model_name,
        "tokenizer_id": info.model_data.tokenizer_id,
        "lora_rank": info.lora_rank,
    }
    tokenizer = client.get_tokenizer()
    ids = [tokenizer.encode(t) for t in text]
    seen["tokenizer"] = {"ids": ids, "eos_token_id": tokenizer.eos_token_id}
    data = [
        types.Datum(
            model_input=types.ModelInput.from_ints(t[:-1]),
            loss_fn_inputs={"target_tokens": t[1:], "weights": [1.0] * (len(t) - 1)},
        )
        for t in ids
    ]
    return client, tokenizer, data


def _forward(on, data) -> float:
    return on.forward(data, "cross_entropy").result().metrics["loss:sum"]


def _step(on, data, adam) -> float:
    on.forward_backward(data, "cross_entropy").result()
    on.optim_step(adam).result()
    return _forward(on, data)


def _sft(client, data, adam, seen: dict) -> None:
    """Six pipelined SFT steps, then a forward pass."""
    seen["losses"] = []
    for _ in range(6):
        backward = client.forward_backward(data, "cross_entropy")
        client.optim_step(adam).result()
        output = backward.result()
        seen["losses"].append(output.metrics["loss:sum"])
    seen["output_shapes"] = [out["logprobs"].shape for out in output.loss_fn_outputs]
    out = client.forward(data, "cross_entropy").result()
    seen["forward_loss"], seen["forward_logprobs"] = (
        out.metrics["loss:sum"],
        [o["logprobs"].data for o in out.loss_fn_outputs],
    )


def _custom_loss(client, data, adam, seen: dict) -> None:
    """A custom loss, with an optim_step submitted before its backward pass."""

    def custom_loss(batch, logprobs):
        return sum((-lp).sum() for lp in logprobs), {"datums:sum": float(len(batch))}

    custom = client.forward_backward_custom(data, custom_loss)
    stepped = client.optim_step(adam)  # submitted before the custom loss's backward pass
    metrics = _value(custom).metrics
    seen["custom"] = {
        "loss": metrics["loss:sum"],
        "surrogate": metrics["surrogate_loss:sum"],
        "metric": metrics["datums:sum"],
        "forward_loss": seen["forward_loss"],
        "step": stepped.result().metrics["optimizer_step"],
    }


def _samples(service, client, prompt_ids: list[int], sampler_path: str) -> dict:
    """Greedy samples from an ephemeral and a named sampler, and the prompt's logprobs three ways."""
    from tinker import types

    greedy = types.SamplingParams(max_tokens=6, temperature=0.0)

    def sampled(sampler) -> dict:
        response = sampler.sample(
            types.ModelInput.from_ints(prompt_ids), 2, greedy, include_prompt_logprobs=True
        ).result()
        return {
            "sequences": [
                {"tokens": s.tokens, "logprobs": s.logprobs, "stop_reason": s.stop_reason} for s in response.sequences
            ],
            "sequence_ids": [s.sequence_id for s in response.sequences],
            "prompt_logprobs": response.prompt_logprobs,
        }

    ephemeral = _value(client.save_weights_and_get_sampling_client())
    named = _value(service.create_sampling_client(model_path=sampler_path))
    prompt_datum = types.Datum(
        model_input=types.ModelInput.from_ints(prompt_ids[:-1]), loss_fn_inputs={"target_tokens": prompt_ids[1:]}
    )
    return {
        "prompt": prompt_ids,
        "ephemeral": sampled(ephemeral),
        "named": {**sampled(named), "base_model": named.get_base_model()},
        "computed": ephemeral.compute_logprobs(types.ModelInput.from_ints(prompt_ids)).result(),
        "forward_logprobs": client.forward([prompt_datum], "cross_entropy")
        .result()
        .loss_fn_outputs[0]["logprobs"]
        .data,
    }


def _resume(service, client, data, adam, state: dict, seen: dict) -> dict:
    """Runs resumed from the checkpoint with and without the optimizer, and loads into live runs."""
    resumed = _value(service.create_training_client_from_state_with_optimizer(state["path"]))
    fresh = _value(service.create_training_client_from_state(state["path"]))
    seen["resumed_runs"] = [resumed.model_id, fresh.model_id]
    state["resumed_loss"], state["weights_only_loss"] = _forward(resumed, data), _forward(fresh, data)
    state["after_one_step"] = {
        "original": _step(client, data, adam),
        "with_optimizer": _step(resumed, data, adam),
        "weights_only": _step(fresh, data, adam),
    }
    client.load_state(state["path"]).result()
    resumed.load_state_with_optimizer(state["path"]).result()
    state["reloaded_loss"] = [_forward(client, data), _forward(resumed, data)]
    state["reloaded_step"] = [_step(client, data, adam), _step(resumed, data, adam)]
    return state


def _listing(rest, state: dict, seen: dict) -> None:
    """What the REST client lists of the run, its weights info, and its checkpoint archives."""
    run = _value(rest.get_training_run(seen["run"]))
    seen["listing"] = {
        "runs": [r.training_run_id for r in _value(rest.list_training_runs(limit=100)).training_runs],
        "checkpoints": [
            [c.checkpoint_id, c.checkpoint_type, c.tinker_path]
            for c in _value(rest.list_checkpoints(seen["run"])).checkpoints
        ],
        "user_checkpoints": [c.tinker_path for c in _value(rest.list_user_checkpoints()).checkpoints],
        "last_checkpoint": run.last_checkpoint.checkpoint_id,
        "last_sampler_checkpoint": run.last_sampler_checkpoint.checkpoint_id,
    }
    info = _value(rest.get_weights_info_by_tinker_path(state["path"]))
    seen["weights_info"] = [info.base_model, info.lora_rank, info.train_attn, info.train_mlp, info.train_unembed]
    seen["archives"] = None
    if hasattr(rest, "get_checkpoint_archive_url_from_tinker_path"):
        seen["archives"] = {
            kind: _archive(_value(rest.get_checkpoint_archive_url_from_tinker_path(state[key])).url)
            for kind, key in (("state", "path"), ("sampler", "sampler_path"))
        }


def _archive(url: str) -> dict:
    """Download a checkpoint archive as the SDK's CLI does (plain GET, no key) and summarise it."""
    import io
    import tarfile
    import urllib.request

    with urllib.request.urlopen(url, timeout=60) as response, tarfile.open(fileobj=io.BytesIO(response.read())) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    return {
        "members": sorted(members),
        "adapter_sha256": hashlib.sha256(members["adapter_model.safetensors"]).hexdigest(),
    }


def intruder(url: str, key: str, run: str, state: str, sampler: str) -> dict:
    """Another key's view: what it lists, and how it is refused another key's objects."""
    import tinker

    service = tinker.ServiceClient(base_url=url, api_key=key)
    own = _value(service.create_lora_training_client(MODEL, rank=4))
    doomed = own.save_state("doomed").result().path
    rest = service.create_rest_client()
    _value(rest.delete_checkpoint_from_tinker_path(doomed))
    refused = {
        "delete_checkpoint": _failure(lambda: rest.delete_checkpoint_from_tinker_path(state)),
        "get_training_run": _failure(lambda: rest.get_training_run(run)),
        "list_checkpoints": _failure(lambda: rest.list_checkpoints(run)),
        "weights_info": _failure(lambda: rest.get_weights_info_by_tinker_path(state)),
        "create_training_client_from_state": _failure(lambda: service.create_training_client_from_state(state)),
        "create_sampling_client": _failure(lambda: service.create_sampling_client(model_path=sampler)),
    }
    return {
        "own_run": own.model_id,
        "refused": refused,
        "own_checkpoints": [c.tinker_path for c in _value(rest.list_checkpoints(own.model_id)).checkpoints],
        "runs": [r.training_run_id for r in _value(rest.list_training_runs(limit=100)).training_runs],
        "user_checkpoints": [c.tinker_path for c in _value(rest.list_user_checkpoints()).checkpoints],
    }


def sft_steps(url: str, key: str, text: list[str], steps: int) -> dict:
    """`steps` SFT steps (forward_backward, then optim_step) on a fresh seeded run: the losses."""
    import tinker
    from tinker import types

    client = _value(tinker.ServiceClient(base_url=url, api_key=key).create_lora_training_client(MODEL, rank=8, seed=3))
    tokenizer = client.get_tokenizer()
    data = [
        types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]), loss_fn_inputs={"target_tokens": ids[1:]})
        for ids in map(tokenizer.encode, text)
    ]
    losses = []
    for _ in range(steps):
        backward = client.forward_backward(data, "cross_entropy")
        client.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        losses.append(backward.result().metrics["loss:sum"])
    return {"losses": losses}


def interrupted_training(url: str, key: str, seed: int, batches: list, adam: dict, progress: str) -> dict:
    """A seeded rank-4 run trained on `batches` (per step, a list of token sequences), each
    step's forward_backward and optim_step pipelined, while the server may die and restart;
    each acknowledged step is appended to the file `progress`. What it saw: the run, the steps
    acknowledged (optim_step's "optimizer_step"), the first error (None) and the final checkpoint."""
    import tinker
    from tinker import types

    service = tinker.ServiceClient(base_url=url, api_key=key)
    client = _value(service.create_lora_training_client(MODEL, rank=4, seed=seed))
    seen: dict = {"model_id": client.model_id, "steps": [], "error": None, "path": None}
    try:
        for batch in batches:
            data = [
                types.Datum(model_input=types.ModelInput.from_ints(t[:-1]), loss_fn_inputs={"target_tokens": t[1:]})
                for t in batch
            ]
            backward = client.forward_backward(data, "cross_entropy")
            stepped = client.optim_step(types.AdamParams(**adam))
            backward.result()
            seen["steps"].append(stepped.result().metrics["optimizer_step"])
            with open(progress, "a") as file:
                file.write(f"{seen['steps'][-1]}\n")
        seen["path"] = client.save_state("final").result().path
    except Exception as exc:  # noqa: BLE001 - reported to the test
        seen["error"] = f"{type(exc).__name__}: {exc}"
    return seen


def expiring_checkpoint(url: str, key: str) -> dict:
    """A checkpoint saved with `ttl_seconds=1`: resumable at once, gone once the second passed."""
    import time

    import tinker

    service = tinker.ServiceClient(base_url=url, api_key=key)
    client = _value(service.create_lora_training_client(MODEL, rank=4, seed=2))
    path = client.save_state("brief", ttl_seconds=1).result().path
    at_once = _failure(lambda: service.create_training_client_from_state(path))
    time.sleep(1.2)
    return {"at_once": at_once, "later": _failure(lambda: service.create_training_client_from_state(path))}


def checkpoint_download(url: str, key: str, tokens: list[int], steps: int, output: str) -> dict:
    """`tinker checkpoint download` of a checkpoint of `steps` SFT steps on `tokens` into
    `output` (0.38's CLI exports it through temporary external weights), the run's logprobs of
    `tokens` and the run's checkpoints afterwards; then the CLI's other run and checkpoint
    commands on it (JSON output), ending with its deletion."""
    import os

    import tinker
    from click.testing import CliRunner
    from tinker import types
    from tinker.cli.__main__ import main_cli

    service = tinker.ServiceClient(base_url=url, api_key=key)
    client = _value(service.create_lora_training_client(MODEL, rank=4, seed=5))
    data = [
        types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={"target_tokens": tokens[1:]})
    ]
    for _ in range(steps):
        _step(client, data, types.AdamParams(learning_rate=1e-2))
    logprobs = client.forward(data, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()
    path = client.save_state("final").result().path
    os.environ.update(TINKER_BASE_URL=url, TINKER_API_KEY=key)
    downloaded = CliRunner().invoke(main_cli, ["--format", "json", "checkpoint", "download", path, "--output", output])
    rest = service.create_rest_client()
    checkpoints = [c.tinker_path for c in rest.list_checkpoints(client.model_id).result().checkpoints]
    commands = {
        "run list": ["run", "list"],
        "run info": ["run", "info", client.model_id],
        "checkpoint list": ["checkpoint", "list", "--run-id", client.model_id],
        "checkpoint info": ["checkpoint", "info", path],
        "checkpoint set-ttl": ["checkpoint", "set-ttl", path, "--ttl", "7200"],
        "checkpoint publish": ["checkpoint", "publish", path],
        "checkpoint unpublish": ["checkpoint", "unpublish", path],
        "checkpoint delete": ["checkpoint", "delete", path, "--yes"],
    }
    cli = {
        name: [(done := CliRunner().invoke(main_cli, ["--format", "json", *args])).exit_code, done.stdout]
        for name, args in commands.items()
    }
    return {
        "path": path,
        "cli": [downloaded.exit_code, downloaded.stdout, repr(downloaded.exception)],
        "logprobs": logprobs,
        "checkpoints": checkpoints,
        "commands": cli,
        "after_delete": [c.tinker_path for c in rest.list_checkpoints(client.model_id).result().checkpoints],
    }


def topk_prompt(url: str, key: str, prompt: list[int], k: int) -> dict:
    """Top-k prompt logprobs of `prompt` on the base model, whole and for the last 2 positions."""
    import tinker
    from tinker import types

    service = tinker.ServiceClient(base_url=url, api_key=key)
    sampler = _value(service.create_sampling_client(base_model=MODEL))
    params, tokens = types.SamplingParams(max_tokens=1, temperature=0.0), types.ModelInput.from_ints(prompt)
    whole = sampler.sample(tokens, 1, params, include_prompt_logprobs=True, topk_prompt_logprobs=k).result()
    tail = sampler.sample(tokens, 1, params, True, k, prompt_logprobs_last_n=2).result()
    return {
        "whole": whole.topk_prompt_logprobs,
        "prompt_logprobs": whole.prompt_logprobs,
        "tail": tail.topk_prompt_logprobs,
    }


def sessions(url: str, key: str) -> dict:
    """A session opened with user metadata and a display name, one run and one sampler in it,
    as `RestClient.list_sessions` and `get_session` see it; and another session's listing. A
    checkpoint published and unpublished, as the checkpoint list sees it."""
    import tinker

    service = tinker.ServiceClient(
        user_metadata={"team": "bios"}, display_name="sessions test", base_url=url, api_key=key
    )
    client = _value(service.create_lora_training_client(MODEL, rank=4, seed=1))
    sampler = _value(service.create_sampling_client(base_model=MODEL))
    sampler.sample(tinker.types.ModelInput.from_ints([5, 6]), 1, tinker.types.SamplingParams(max_tokens=1)).result()
    rest = service.create_rest_client()
    session_id = service.holder._session_id
    path = client.save_weights_for_sampler("published").result().path

    def public() -> bool:
        (checkpoint,) = rest.list_checkpoints(client.model_id).result().checkpoints
        return checkpoint.public

    publicity = [public()]
    for _ in range(2):  # twice: harmless
        rest.publish_checkpoint_from_tinker_path(path).result()
    publicity.append(public())
    for _ in range(2):
        rest.unpublish_checkpoint_from_tinker_path(path).result()
    publicity.append(public())
    other = tinker.ServiceClient(base_url=url, api_key=key)
    _value(other.create_sampling_client(base_model=MODEL))
    return {
        "session_id": session_id,
        "model_id": client.model_id,
        "listed": rest.list_sessions().result().sessions,
        "second_page": rest.list_sessions(limit=1, offset=1).result().sessions,
        "session": rest.get_session(session_id).result().model_dump(mode="json"),
        "other": other.holder._session_id,
        "unknown": _failure(lambda: rest.get_session("sess-0000000000000000")),
        "publicity": publicity,
    }


def accounts(url: str, key: str, text: list[str], steps: int, prompt: list[int]) -> dict:
    """0.38's account surface after `steps` SFT steps, a save and a greedy sample of 2 x 4
    tokens: the key as `tinker auth login` checks it, billing usage and checkpoint storage
    (AdminClient and `tinker billing`), checkpoint sizes, and `tinker session export-trace`."""
    import datetime
    import os
    import tempfile

    import httpx
    import tinker
    from click.testing import CliRunner
    from tinker import types
    from tinker.cli.__main__ import main_cli
    from tinker.cli.auth_api import TinkerAuthApi

    service = tinker.ServiceClient(base_url=url, api_key=key)
    client = _value(service.create_lora_training_client(MODEL, rank=8, seed=3))
    tokenizer = client.get_tokenizer()
    ids = [tokenizer.encode(t) for t in text]
    data = [
        types.Datum(model_input=types.ModelInput.from_ints(i[:-1]), loss_fn_inputs={"target_tokens": i[1:]})
        for i in ids
    ]
    for _ in range(steps):
        backward = client.forward_backward(data, "cross_entropy")
        client.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        backward.result()
    client.save_state("account-ckpt").result()
    sampler = _value(service.create_sampling_client(base_model=MODEL))
    params = types.SamplingParams(max_tokens=4, temperature=0.0)
    sample = sampler.sample(types.ModelInput.from_ints(prompt), num_samples=2, sampling_params=params).result()
    seen: dict = {
        "trained": steps * sum(len(i) - 1 for i in ids),
        "sampled": sum(len(s.tokens) for s in sample.sequences),
        "session_id": service.holder._session_id,
    }
    rest = service.create_rest_client()
    seen["checkpoints"] = {c.tinker_path: c.size_bytes for c in rest.list_user_checkpoints().result().checkpoints}
    with httpx.Client() as http:
        seen["me"] = TinkerAuthApi(http, base_url=url).get_self_api_key(key).model_dump(mode="json")
    admin = tinker.AdminClient(base_url=url, api_key=key)
    hour = datetime.datetime.now(datetime.UTC).replace(minute=0, second=0, microsecond=0)
    usage = admin.get_billing_usage(hour, hour + datetime.timedelta(hours=1)).result()
    seen["usage"] = usage.model_dump(mode="json")
    seen["storage"] = admin.get_current_checkpoint_storage_usage().result().model_dump(mode="json")
    os.environ.update(TINKER_BASE_URL=url, TINKER_API_KEY=key)
    out = os.path.join(tempfile.mkdtemp(), "session.pftrace")
    cli = CliRunner()
    exported = cli.invoke(main_cli, ["--format", "json", "session", "export-trace", seen["session_id"], "-o", out])
    storage = cli.invoke(main_cli, ["--format", "json", "billing", "checkpoint-storage"])
    seen["cli"] = {
        "export_trace": [exported.exit_code, exported.stdout],
        "checkpoint_storage": [storage.exit_code, storage.stdout],
    }
    with open(out, "rb") as trace:
        seen["trace"] = json.load(trace)
    return seen


SCENARIOS = {
    "training": training,
    "intruder": intruder,
    "sft_steps": sft_steps,
    "interrupted_training": interrupted_training,
    "accounts": accounts,
    "expiring_checkpoint": expiring_checkpoint,
    "checkpoint_download": checkpoint_download,
    "sessions": sessions,
    "topk_prompt": topk_prompt,
}

if __name__ == "__main__":
    scenario, arguments = sys.argv[1], json.loads(sys.argv[2])
    print(json.dumps(SCENARIOS[scenario](**arguments)))
