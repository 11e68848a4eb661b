"""`BiosFuture`: blocking and asyncio use, callbacks, timeouts, the warning when a wait stalls
a running event loop, the standard-future and coroutine views, and giving up a wait without
cancelling the request. Then the async
calling patterns of the seed examples against the emulator."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from pathlib import Path

import pytest
from helpers import MODEL, random_batch

import bios
from bios import types
from bios.errors import APITimeoutError, BiosError, NotFoundError
from bios.futures import BiosFuture
from bios.transport.inprocess import default_pool

pytestmark = pytest.mark.api


def pending(method: str = "forward_backward") -> tuple[concurrent.futures.Future, BiosFuture]:
    inner: concurrent.futures.Future = concurrent.futures.Future()
    return inner, BiosFuture(inner, method)


def test_result_done_and_exception_of_a_successful_future() -> None:
    inner, future = pending()
    assert not future.done()
    assert "pending" in repr(future) and "forward_backward" in repr(future)
    inner.set_result(42)
    assert future.done()
    assert future.result() == 42
    assert future.result(timeout=0) == 42
    assert future.exception() is None
    assert "done" in repr(future)


def test_a_failed_request_raises_its_bios_error() -> None:
    inner, future = pending()
    error = NotFoundError("path: no checkpoint at bios://x/weights/y", field="path")
    inner.set_exception(error)
    assert future.done()
    assert future.exception() is error
    with pytest.raises(NotFoundError) as info:
        future.result()
    assert info.value is error and info.value.field == "path"


def test_completed_holds_its_value() -> None:
    future = BiosFuture.completed({"a": 1}, "sample")
    assert future.done() and future.result() == {"a": 1} and future.exception() is None


def test_result_with_a_timeout_raises_api_timeout_error() -> None:
    _, future = pending("optim_step")
    with pytest.raises(APITimeoutError) as info:
        future.result(timeout=0)
    assert "optim_step" in info.value.message
    assert info.value.retryable and isinstance(info.value, TimeoutError)
    with pytest.raises(APITimeoutError):
        future.exception(timeout=0)
    assert not future.done()


def test_add_done_callback_before_and_after_completion() -> None:
    inner, future = pending()
    seen: list[object] = []
    future.add_done_callback(lambda f: seen.append(("early", f is future, f.result())))
    assert seen == []
    inner.set_result(7)
    assert seen == [("early", True, 7)]
    future.add_done_callback(lambda f: seen.append(("late", f is future, f.result())))  # runs at once
    assert seen == [("early", True, 7), ("late", True, 7)]


def test_await_gives_the_result_or_raises() -> None:
    async def main() -> tuple[object, BaseException | None]:
        ok_inner, ok = pending()
        bad_inner, bad = pending()
        loop = asyncio.get_running_loop()
        loop.call_soon(ok_inner.set_result, "value")
        loop.call_soon(bad_inner.set_exception, NotFoundError("gone", field="path"))
        value = await ok
        try:
            await bad
        except BiosError as exc:
            return value, exc
        return value, None

    value, error = asyncio.run(main())
    assert value == "value"
    assert isinstance(error, NotFoundError) and error.field == "path"


def test_result_async_returns_and_times_out() -> None:
    async def main() -> tuple[object, BaseException]:
        inner, future = pending("sample")
        asyncio.get_running_loop().call_soon(inner.set_result, 3)
        got = await future.result_async(timeout=30)
        _, never = pending("sample")
        try:
            await never.result_async(timeout=0)
        except APITimeoutError as exc:
            return got, exc
        raise AssertionError("no timeout")

    got, error = asyncio.run(main())
    assert got == 3
    assert isinstance(error, APITimeoutError) and "sample" in error.message


def test_giving_up_a_wait_does_not_cancel_the_request() -> None:
    """A timed-out `result_async` or a cancelled awaiting task must leave the request alone:
    the engine resolves it later, and its result can still be collected."""
    inner_a, a = pending("forward_backward")
    inner_b, b = pending("train")
    inner_c, c = pending("sample")

    async def wrapped(future: BiosFuture) -> object:
        return await future

    async def main() -> None:
        with pytest.raises(APITimeoutError):
            await a.result_async(timeout=0)
        tasks = [asyncio.ensure_future(b.result_async()), asyncio.ensure_future(wrapped(c))]
        inner_turn, turn = pending()  # one trip through the loop, so both tasks start awaiting
        asyncio.get_running_loop().call_soon(inner_turn.set_result, None)
        await turn
        for task in tasks:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())
    assert not any(inner.cancelled() for inner in (inner_a, inner_b, inner_c))
    for inner, value in ((inner_a, "late a"), (inner_b, "late b"), (inner_c, "late c")):
        inner.set_result(value)  # the engine resolving it later must not fail
    assert (a.result(), b.result(), c.result()) == ("late a", "late b", "late c")


def test_result_inside_a_running_loop_waits_and_warns_naming_the_async_method(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> object:
        inner, future = pending("forward_backward")
        threading.Timer(0.05, inner.set_result, ("ready",)).start()  # the engine answers from its thread
        return future.result(timeout=5)

    with caplog.at_level("WARNING", logger="bios.futures"):
        assert asyncio.run(main()) == "ready"
    (record,) = caplog.records
    assert "forward_backward_async" in record.getMessage() and "await" in record.getMessage()


def test_a_finished_future_read_inside_a_running_loop_does_not_warn(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> object:
        future = BiosFuture.completed("ready", "sample")
        return future.result(), future.exception()

    with caplog.at_level("WARNING", logger="bios.futures"):
        assert asyncio.run(main()) == ("ready", None)
    assert not caplog.records


def test_a_sync_call_inside_a_running_loop_completes_on_the_engine(training: bios.TrainingClient) -> None:
    async def main() -> types.ForwardBackwardResult:
        return training.forward_backward(random_batch(1), "cross_entropy").result(timeout=30)

    assert asyncio.run(main()).loss > 0


def test_future_gives_a_standard_future_that_mirrors_the_request() -> None:
    inner, future = pending("sample")
    standard = future.future()
    assert isinstance(standard, concurrent.futures.Future) and not standard.done()
    inner.set_result(7)
    assert standard.result(timeout=1) == 7
    failed_inner, failed = pending("optim_step")
    failed_standard = failed.future()
    error = NotFoundError("session_id: no training session 's'", field="session_id")
    failed_inner.set_exception(error)
    assert failed_standard.exception(timeout=1) is error


def test_cancelling_the_standard_future_leaves_the_request_running() -> None:
    inner, future = pending("sample")
    standard = future.future()
    assert standard.cancel()
    inner.set_result("late")  # the engine resolving it later must not fail
    assert not inner.cancelled() and future.result() == "late"


def test_coroutine_awaits_the_future_as_a_task() -> None:
    async def main() -> object:
        inner, future = pending("sample")
        task = asyncio.create_task(future.coroutine())
        asyncio.get_running_loop().call_later(0.01, inner.set_result, "sampled")
        return await task

    assert asyncio.run(main()) == "sampled"


# ---- the seed's async pattern on the emulator ----------------------------------------------


def test_train_async_returns_a_training_result(training: bios.TrainingClient) -> None:
    async def main() -> types.TrainingResult:
        return await training.train_async(random_batch(1), learning_rate=1e-3)

    result = asyncio.run(main())
    assert isinstance(result, types.TrainingResult)
    assert result.step == 1 and result.loss > 0
    assert result.metrics["learning_rate"] == 1e-3
    assert training.get_info().step == 1


def test_forward_backward_async_gives_a_future_to_await(service: bios.ServiceClient) -> None:
    async_session = service.create_lora_training_client(base_model="bios/tiny", rank=8, seed=0)
    sync_session = service.create_lora_training_client(base_model="bios/tiny", rank=8, seed=0)
    batch = random_batch(2)

    async def main() -> tuple[types.ForwardBackwardResult, types.OptimStepResult]:
        fut = await async_session.forward_backward_async(batch)
        assert isinstance(fut, BiosFuture)
        step_fut = await async_session.optim_step_async(types.AdamParams(learning_rate=1e-3))
        res = await fut
        return res, await step_fut

    res, step = asyncio.run(main())
    expected = sync_session.forward_backward(batch).result()
    expected_step = sync_session.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    assert res.loss == expected.loss and step.step == expected_step.step == 1
    assert step.metrics["grad_norm"] == expected_step.metrics["grad_norm"] > 0
    # the very same future also works with a blocking wait outside the loop
    fut = async_session.forward(batch)
    assert fut.result().loss == sync_session.forward(batch).result().loss


@pytest.mark.inprocess  # holds the in-process engine's worker; a server's request would not wait for it
def test_blocking_call_from_async_code_on_a_real_request(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`.result()` inside a coroutine on a request that has not finished waits for it (the
    in-process engine's worker is held, then released from another thread) and warns once."""
    monkeypatch.delenv("BIOS_BASE_URL", raising=False)  # in-process even under --remote
    service = bios.ServiceClient(backend="emulator")
    training = service.create_lora_training_client(base_model=MODEL, rank=8, seed=0)
    engine = default_pool().engine("emulator", Path(os.environ["BIOS_HOME"]), service.config.backend_options)
    entered, gate = threading.Event(), threading.Event()
    engine.scheduler.call(lambda: (entered.set(), gate.wait()))
    entered.wait()

    async def main() -> types.SampleResult:
        fut = training.sample(types.ModelInput.from_ints([5, 6, 7]), types.SamplingParams(max_tokens=4, seed=1))
        threading.Timer(0.05, gate.set).start()
        return fut.result(timeout=30)

    with caplog.at_level("WARNING", logger="bios.futures"):
        result = asyncio.run(main())
    assert len(result.sequences) == 1 and 1 <= len(result.sequences[0].tokens) <= 4
    assert ["sample_async" in record.getMessage() for record in caplog.records] == [True]


def test_exception_inside_a_running_loop_waits_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    inner, future = pending("sample")

    async def inside_loop() -> BaseException | None:
        threading.Timer(0.05, inner.set_result, ("sampled",)).start()
        return future.exception(timeout=5)

    with caplog.at_level("WARNING", logger="bios.futures"):
        assert asyncio.run(inside_loop()) is None
    assert "sample_async" in caplog.records[0].getMessage()
