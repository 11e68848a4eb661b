"""The clients' `*_async` methods truly await: every one is a coroutine function, none makes a
blocking network call on the caller's event loop, and while a request is held by the server the
loop runs other tasks. Checked against a live server (and every method also in-process)."""

from __future__ import annotations

import asyncio
import inspect
import threading

import pytest
from helpers import MODEL, random_batch
from server_process import ThreadedServer

import bios
from bios import types
from bios.server import ServerOptions
from bios.transport.loop import LoopThread

CLIENTS = (bios.ServiceClient, bios.TrainingClient, bios.SamplingClient, bios.RestClient)
PROMPT, GREEDY = types.ModelInput.from_ints([7, 300, 41]), types.SamplingParams(max_tokens=3, temperature=0.0)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    options = ServerOptions(backend="emulator", no_auth=True, home=tmp_path_factory.mktemp("async-server"))
    with ThreadedServer(options) as running:
        yield running


def _async_methods(cls: type) -> set[str]:
    return {name for name in dir(cls) if name.endswith("_async") and not name.startswith("_")}


def test_every_async_method_is_a_coroutine_function_below_its_sync_twin() -> None:
    for cls in CLIENTS:
        for name in _async_methods(cls):
            assert inspect.iscoroutinefunction(getattr(cls, name)), f"{cls.__name__}.{name}"
            assert callable(getattr(cls, name.removesuffix("_async"), None)), f"{cls.__name__}.{name}: no sync twin"


def _sum_of_logprobs(data, logprobs):
    loss = sum(-lp.sum() for lp in logprobs)
    return loss, {"tokens": float(sum(lp.shape[0] for lp in logprobs))}


async def _call_every_async_method(service: bios.ServiceClient) -> set[str]:
    """Drive each public `*_async` method once; the names of those called."""
    batch = random_batch(seed=5, size=2, length=8)
    called: set[str] = set()

    async def run(owner: object, name: str, *args: object, **kwargs: object) -> object:
        called.add(f"{type(owner).__name__}.{name}")
        return await getattr(owner, name)(*args, **kwargs)

    assert (await run(service, "get_server_capabilities_async")).supported_models
    training = await run(service, "create_lora_training_client_async", MODEL, rank=4, seed=0)
    await (await run(training, "forward_async", batch))
    await (await run(training, "forward_backward_async", batch))
    await (await run(training, "forward_backward_custom_async", batch, _sum_of_logprobs))
    assert (await (await run(training, "optim_step_async"))).step == 1
    assert (await run(training, "train_async", batch, learning_rate=1e-2)).step == 2
    assert (await run(training, "sample_async", PROMPT, GREEDY)).sequences
    state = (await (await run(training, "save_state_async", "async-state"))).path
    assert await run(training, "load_state_with_optimizer_async", state) is training
    assert (await run(training, "get_info_async")).step == 2
    await (await run(training, "save_weights_for_sampler_async", "async-frozen"))
    sampler = await run(training, "save_weights_and_get_sampling_client_async", "async-sampler")
    resumed = await run(service, "create_training_client_from_state_with_optimizer_async", state)
    assert (await run(resumed, "get_info_async")).step == 2
    fresh = await run(service, "create_training_client_from_state_async", state)
    assert await run(fresh, "load_state_async", state) is fresh and (await fresh.get_info_async()).step == 0
    base = await run(service, "create_sampling_client_async", base_model=MODEL)
    for client in (sampler, base):
        assert (await run(client, "sample_async", PROMPT, GREEDY)).sequences
        assert len(await run(client, "compute_logprobs_async", PROMPT)) == 3
    assert await run(training, "result_async") is training and await run(base, "result_async") is base
    rest = service.create_rest_client()
    assert (await run(rest, "get_training_run_async", training.session_id)).step == 2
    assert state in {c.path for c in (await run(rest, "list_checkpoints_async", training.session_id)).checkpoints}
    assert state in {c.path for c in (await run(rest, "list_user_checkpoints_async")).checkpoints}
    await run(rest, "delete_checkpoint_async", training.session_id, "sampler_weights/async-frozen")
    await run(rest, "delete_checkpoint_from_tinker_path_async", state)
    external = (await (await run(training, "save_weights_external_async", "async-external"))).path
    assert "adapter_config.json" in (await run(rest, "get_external_weights_urls_async", external)).urls
    assert (await run(rest, "set_checkpoint_ttl_from_tinker_path_async", external, 60.0)).expires_at
    assert (await run(rest, "get_weights_info_by_tinker_path_async", external)).kind == "external"
    assert (await run(rest, "publish_checkpoint_from_tinker_path_async", external)).public
    assert not (await run(rest, "unpublish_checkpoint_from_tinker_path_async", external)).public
    runs = (await run(rest, "list_training_runs_async", limit=1000)).training_runs
    assert training.session_id in {r.session_id for r in runs}
    return called


def _every_async_method() -> set[str]:
    return {f"{cls.__name__}.{name}" for cls in CLIENTS for name in _async_methods(cls)}


def _refuse_blocking_waits_on_a_running_loop(monkeypatch) -> None:
    """Make the one blocking path of the HTTP transport fail on a thread whose event loop runs."""
    blocking = LoopThread.wait

    def refuse_on_a_running_loop(self, coro):
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return blocking(self, coro)
        coro.close()
        raise AssertionError("a blocking network call on the caller's event loop")

    monkeypatch.setattr(LoopThread, "wait", refuse_on_a_running_loop)


def test_the_async_methods_never_make_a_blocking_call_on_the_loop(server, monkeypatch) -> None:
    """The one blocking path of the HTTP transport refuses to run on a thread whose event loop
    is running; every async method still works."""
    _refuse_blocking_waits_on_a_running_loop(monkeypatch)
    service = bios.ServiceClient(base_url=server.url)
    try:
        assert asyncio.run(_call_every_async_method(service)) == _every_async_method()
    finally:
        service.transport.close()


def test_train_async_sends_its_step_off_the_loop_when_the_forward_is_done_first(server, monkeypatch) -> None:
    """The optimizer step of `train_async` is chained to its forward_backward; when that is
    done before the chaining, the step is still sent off the caller's event loop."""
    service = bios.ServiceClient(base_url=server.url)
    training = service.create_lora_training_client(MODEL, rank=4, seed=0)
    forward_backward_async = bios.TrainingClient.forward_backward_async

    async def done_first(self, *args, **kwargs):
        future = await forward_backward_async(self, *args, **kwargs)
        await future
        return future

    monkeypatch.setattr(bios.TrainingClient, "forward_backward_async", done_first)
    _refuse_blocking_waits_on_a_running_loop(monkeypatch)
    try:
        trained = asyncio.run(training.train_async(random_batch(seed=6, size=2, length=8), learning_rate=1e-2))
        assert trained.step == 1 and trained.loss > 0
    finally:
        service.transport.close()


@pytest.mark.inprocess
def test_the_async_methods_work_in_process(service: bios.ServiceClient) -> None:
    assert asyncio.run(_call_every_async_method(service)) == _every_async_method()


def test_the_loop_runs_other_tasks_while_the_server_holds_a_request(server, monkeypatch) -> None:
    engine = server.service.engine
    entered, gate = threading.Event(), threading.Event()
    submit = engine.forward_backward

    def held(*args, **kwargs):
        entered.set()
        gate.wait(timeout=60)  # a transport that blocked the loop would make the test fail, not hang
        return submit(*args, **kwargs)

    service = bios.ServiceClient(base_url=server.url)
    training = service.create_lora_training_client(MODEL, rank=4, seed=1)
    monkeypatch.setattr(engine, "forward_backward", held)

    async def other_work() -> int:
        await asyncio.sleep(0)
        return len((await service.get_server_capabilities_async()).supported_models)

    async def main() -> tuple[int, bool, float]:
        sent = asyncio.create_task(training.forward_backward_async(random_batch(seed=1)))
        await asyncio.to_thread(entered.wait, 60)  # the server is now holding the request
        models = await asyncio.create_task(other_work())
        still_waiting = not sent.done()
        gate.set()
        return models, still_waiting, (await (await sent)).loss

    try:
        models, still_waiting, loss = asyncio.run(main())
    finally:
        gate.set()
        service.transport.close()
    assert models >= 1 and still_waiting and loss > 0


def test_a_blocking_wait_on_the_transports_own_loop_is_refused_not_deadlocked() -> None:
    """The one wait that could never return (on the thread of the loop that must answer it)."""
    loop = LoopThread("refusal")

    async def nested() -> str:
        inner = asyncio.sleep(0, "never run")
        try:
            loop.wait(inner)
        except bios.BlockingCallError as error:
            return error.message
        return "waited"

    async def nothing() -> None:
        pass

    try:
        message = loop.wait(nested())
    finally:
        loop.close(nothing)
    assert "own loop would never return" in message
