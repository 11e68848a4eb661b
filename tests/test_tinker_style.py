"""Code written for the tinker SDK runs on Bios unchanged: the `create_*` calls whose SDK
versions hand back a future of the client, `sample`'s SDK positional order and stop semantics,
the SDK's result fields, its own request objects, `save_weights_and_get_sampling_client()`
without a name, and `save_state` with `ttl_seconds` and `user_metadata`. In-process and
(`--remote`) served."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from pathlib import Path

import pytest
from helpers import MODEL, random_batch
from tinker_sdk import REPO, sdk_directory, sdk_result, start_child

import bios
from bios import types

pytestmark = pytest.mark.api

PROMPT, GREEDY = types.ModelInput.from_ints([7, 300, 41]), types.SamplingParams(max_tokens=3, temperature=0.0)


def test_a_created_training_client_is_also_its_own_finished_future(service: bios.ServiceClient) -> None:
    made = service.create_lora_training_client(MODEL, rank=4, seed=3)
    assert made.result() is made and made.result(timeout=1) is made
    assert isinstance(made.future(), concurrent.futures.Future) and made.future().result(timeout=0) is made
    training = service.create_lora_training_client(MODEL, rank=4, seed=3).result()  # the SDK's style
    assert training.forward_backward(random_batch(1), "cross_entropy").result().loss > 0


def test_awaiting_a_create_call_gives_the_client(service: bios.ServiceClient) -> None:
    async def main() -> tuple[bios.TrainingClient, bios.SamplingClient, bios.TrainingClient]:
        training = await service.create_lora_training_client(MODEL, rank=4, seed=3)
        sampler = await service.create_sampling_client(base_model=MODEL)
        task = asyncio.create_task(training.coroutine())
        return training, sampler, await task

    training, sampler, again = asyncio.run(main())
    assert isinstance(training, bios.TrainingClient) and again is training
    assert isinstance(sampler, bios.SamplingClient) and sampler.result() is sampler


def test_sample_takes_the_sdks_positional_order_with_the_same_answer(service: bios.ServiceClient) -> None:
    sampler = service.create_sampling_client(base_model=MODEL)
    ours = sampler.sample(PROMPT, GREEDY, 2).result()
    sdk_order = sampler.sample(PROMPT, 2, GREEDY).result()
    by_name = sampler.sample(prompt=PROMPT, num_samples=2, sampling_params=GREEDY).result()
    assert [s.tokens for s in sdk_order.sequences] == [s.tokens for s in ours.sequences]
    assert [s.tokens for s in by_name.sequences] == [s.tokens for s in ours.sequences]
    assert len(ours.sequences) == 2 and all(len(s.tokens) == 3 for s in ours.sequences)
    swapped_async = asyncio.run(sampler.sample_async(PROMPT, 2, GREEDY))
    assert [s.tokens for s in swapped_async.sequences] == [s.tokens for s in ours.sequences]


def test_a_sample_has_the_sdks_sequence_id_and_prompt_cache_hit_tokens(service: bios.ServiceClient) -> None:
    result = service.create_sampling_client(base_model=MODEL).sample(PROMPT, GREEDY, 2).result()
    assert result.prompt_cache_hit_tokens == 0, "no prefix cache"
    assert [s.sequence_id for s in result.sequences] == [None, None], "no provenance ids"


def test_the_sdks_own_request_objects_give_the_answers_of_bios_ones() -> None:
    """tinker.ModelInput, TensorData, Datum, AdamParams and SamplingParams handed to Bios's clients
    (in a child process with SDK 0.38 on its path, tests/support/sdk_objects_side.py)."""
    side = Path(__file__).parent / "support" / "sdk_objects_side.py"
    seen = sdk_result(start_child(side, [sdk_directory("0.38.0"), REPO], "objects", tokens=[5, 310, 52, 977, 41, 8]))
    sdk, ours = seen["sdk"], seen["bios"]
    assert sdk["loss"] == pytest.approx(ours["loss"], rel=1e-9) and ours["loss"] > 0
    assert sdk["loss_after"] == pytest.approx(ours["loss_after"], rel=1e-9) and ours["loss_after"] < ours["loss"]
    assert sdk["sampled"] == ours["sampled"] and len(ours["sampled"]) == 4
    assert sdk["positional"] == ours["positional"] == [ours["sampled"]] * 2
    assert sdk["prompt_logprobs"][0] is None and sdk["prompt_logprobs"][1:] == pytest.approx(
        ours["prompt_logprobs"][1:]
    )
    assert seen["refused"] == "SamplingParams.top_p", "an SDK object is validated as Bios's own"


def test_sample_with_neither_order_is_a_typed_error_naming_the_field(service: bios.ServiceClient) -> None:
    sampler = service.create_sampling_client(base_model=MODEL)
    with pytest.raises(bios.InvalidRequestError) as info:
        sampler.sample(PROMPT, 2, 3).result()  # type: ignore[arg-type]
    assert "sampling_params" in (info.value.field or "")


def test_save_weights_and_get_sampling_client_without_a_name(training: bios.TrainingClient) -> None:
    training.train(random_batch(2), learning_rate=1e-2)
    first = training.save_weights_and_get_sampling_client()
    second = training.save_weights_and_get_sampling_client()
    a, b = first.sample(PROMPT, GREEDY).result(), second.sample(PROMPT, GREEDY).result()
    assert a.sequences[0].tokens == b.sequences[0].tokens  # the same weights, two snapshots
    assert asyncio.run(training.save_weights_and_get_sampling_client_async()).sample(PROMPT, GREEDY).result() == a


def test_stop_none_ends_at_the_models_eos_and_an_empty_stop_list_at_nothing(service: bios.ServiceClient) -> None:
    """As in the tinker SDK. The model is first taught to answer the prompt with EOS."""
    training = service.create_lora_training_client(MODEL, rank=8, seed=6)
    eos = training.get_tokenizer().eos_token_id
    assert eos is not None
    prompt = [7, 300, 41, 9]
    taught = types.Datum(
        model_input=types.ModelInput.from_ints(prompt), loss_fn_inputs={"target_tokens": [*prompt[1:], eos]}
    )
    for _ in range(30):
        training.train([taught], learning_rate=5e-2)
    sampler = training.save_weights_and_get_sampling_client()

    def greedy(**stop: object) -> types.SampledSequence:
        params = types.SamplingParams(max_tokens=5, temperature=0.0, **stop)
        return sampler.sample(types.ModelInput.from_ints(prompt), params).result().sequences[0]

    at_eos, unstopped = greedy(), greedy(stop=[])
    assert (at_eos.tokens, at_eos.stop_reason) == ([eos], "stop")
    assert unstopped.tokens[0] == eos and len(unstopped.tokens) == 5 and unstopped.stop_reason == "length"
    assert greedy(stop=[eos]).tokens == [eos]


@pytest.mark.inprocess  # makes its own client; tests/server/test_crash.py holds a served one to the same
def test_user_metadata_of_the_service_client_and_the_create_call_is_in_the_training_info() -> None:
    with bios.ServiceClient(backend="emulator", user_metadata={"team": "bios", "run": "x"}) as service:
        fresh = service.create_lora_training_client(MODEL, rank=4, user_metadata={"run": "fresh"})
        assert fresh.get_info().user_metadata == {"team": "bios", "run": "fresh"}
        path = fresh.save_state("with-metadata").result().path
        resumed = service.create_training_client_from_state_with_optimizer(path, user_metadata={"from": path})
        assert resumed.get_info().user_metadata == {"team": "bios", "run": "x", "from": path}
        assert service.create_rest_client().get_training_run(fresh.session_id).result().user_metadata["run"] == "fresh"
        for bad in ({"n": 1}, ["run"], "run"):
            with pytest.raises(bios.InvalidRequestError) as refused:
                service.create_lora_training_client(MODEL, rank=4, user_metadata=bad)  # type: ignore[arg-type]
            assert refused.value.field == "user_metadata"
    with pytest.raises(bios.InvalidRequestError) as refused:
        bios.ServiceClient(backend="emulator", user_metadata={"n": 1})  # type: ignore[dict-item]
    assert refused.value.field == "user_metadata"


def test_no_max_tokens_generates_until_the_context_is_full(service: bios.ServiceClient) -> None:
    """As in the tinker SDK, where `max_tokens` is None unless given."""
    sampler = service.create_sampling_client(base_model=MODEL)
    context = next(m.max_seq_len for m in service.get_server_capabilities().supported_models if m.model_name == MODEL)
    prompt = types.ModelInput.from_ints([7, 300, 41])
    drawn = sampler.sample(prompt, types.SamplingParams(temperature=0.0, stop=[])).result().sequences[0]
    assert (len(drawn.tokens), drawn.stop_reason) == (context - 3, "length")


def test_a_checkpoint_saved_with_a_ttl_is_gone_once_it_runs_out(service: bios.ServiceClient) -> None:
    training = service.create_lora_training_client(MODEL, rank=4, seed=7)
    training.train(random_batch(1), learning_rate=1e-2)
    lasting = training.save_state("lasting", user_metadata={"run": "a"}).result()
    brief = training.save_state("brief", ttl_seconds=1.0).result()
    assert lasting.expires_at is None and lasting.metadata == {"run": "a"}
    assert brief.expires_at is not None and 0.9 <= brief.expires_at - brief.created_at <= 1.1
    assert service.create_training_client_from_state(brief.path).get_info().base_model == MODEL  # still there
    time.sleep(max(0.0, brief.expires_at - time.time()) + 0.05)
    with pytest.raises(bios.NotFoundError) as gone:
        service.create_training_client_from_state_with_optimizer(brief.path)
    assert gone.value.field == "path" and "expired" in gone.value.message
    assert service.create_training_client_from_state(lasting.path).get_info().base_model == MODEL
    assert training.save_state("after", ttl_seconds=60).result().step == 1  # the session goes on


@pytest.mark.parametrize("ttl", [0, -5, float("inf"), "1h", True])
def test_a_bad_ttl_is_a_typed_error_that_saves_nothing(service: bios.ServiceClient, ttl: object) -> None:
    training = service.create_lora_training_client(MODEL, rank=4, seed=8)
    with pytest.raises(bios.InvalidRequestError) as refused:
        training.save_state("never", ttl_seconds=ttl).result()  # type: ignore[arg-type]
    assert refused.value.field == "ttl_seconds"
    with pytest.raises(bios.InvalidRequestError) as both:
        training.save_state("never", metadata={"a": 1}, user_metadata={"b": "2"})
    assert both.value.field == "user_metadata"
    with pytest.raises(bios.NotFoundError):
        service.create_training_client_from_state(f"bios://{training.session_id}/weights/never")
    assert training.train(random_batch(1), learning_rate=1e-2).step == 1  # no sequence number was lost


def test_prompt_logprobs_last_n_scores_only_the_last_tokens(service: bios.ServiceClient) -> None:
    sampler = service.create_sampling_client(base_model=MODEL)
    prompt = types.ModelInput.from_ints([7, 300, 41, 9, 12, 800])
    every = sampler.compute_logprobs(prompt).result()
    assert sampler.compute_logprobs(prompt, prompt_logprobs_last_n=2).result() == [None] * 4 + every[4:]
    assert sampler.compute_logprobs(prompt, 50).result() == every
    sampled = sampler.sample(prompt, GREEDY, 1, True, prompt_logprobs_last_n=3).result()
    assert sampled.prompt_logprobs == [None] * 3 + every[3:]
    scored = asyncio.run(sampler.compute_logprobs_async(prompt, prompt_logprobs_last_n=1))
    assert scored == [None] * 5 + every[5:]


@pytest.mark.parametrize("last_n", [0, -1, 2.0, "2", True])
def test_a_bad_prompt_logprobs_last_n_is_a_typed_error(service: bios.ServiceClient, last_n: object) -> None:
    sampler = service.create_sampling_client(base_model=MODEL)
    with pytest.raises(bios.InvalidRequestError) as refused:
        sampler.compute_logprobs(PROMPT, prompt_logprobs_last_n=last_n)  # type: ignore[arg-type]
    assert refused.value.field == "prompt_logprobs_last_n"
    with pytest.raises(bios.InvalidRequestError) as without:
        sampler.sample(PROMPT, GREEDY, prompt_logprobs_last_n=2)  # no include_prompt_logprobs
    assert without.value.field == "prompt_logprobs_last_n"
