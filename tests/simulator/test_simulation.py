"""The service simulator end to end, in-process: faults that change nothing, replayable traces,
queueing as the model predicts, memory admission, and the clients' retry contract.

Everything runs on the virtual clock: nothing here sleeps, and no test looks at wall time.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import bios
from bios import types
from bios.simulation import FaultRates, ScheduledFault, SimulationConfig
from emulator.simulator import profiles
from emulator.simulator.costs import CostModel, DeviceGroup

MODEL = "bios/tiny"
TEXT = "the quick brown fox jumps over the lazy dog, again and again"
EVERY_FAULT = FaultRates(transient=0.1, timeout=0.1, rate_limit=0.1, session_expiry=0.1, straggler=0.1)
RESTART_AT_15TH_STEP = (ScheduledFault(kind="restart", request="optim_step", nth=15),)


def sft_loop(config: SimulationConfig, steps: int = 30) -> dict:
    """An SFT loop with sampling every 10 steps (from the session and from a snapshot):
    its losses, samples, final adapter state, results and the simulator's report."""
    service = bios.ServiceClient(backend="emulator", simulation=config)
    training = service.create_lora_training_client(MODEL, rank=4, seed=3)
    ids = training.get_tokenizer().encode(TEXT)
    datum = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]), loss_fn_inputs={"target_tokens": ids[1:]})
    prompt = types.ModelInput.from_ints(ids[:5])
    params = types.SamplingParams(max_tokens=6, temperature=1.0, seed=11)
    run: dict = {"losses": [], "samples": [], "results": []}
    for step in range(steps):
        forward = training.forward_backward([datum])
        update = training.optim_step(types.AdamParams(learning_rate=2e-2))
        run["results"] += [forward.result(), update.result()]
        run["losses"].append(run["results"][-2].loss)
        if step % 10 == 9:
            sampler = training.save_weights_and_get_sampling_client(f"step-{step}")
            for future in (sampler.sample(prompt, params, num_samples=2), training.sample(prompt, params)):
                run["results"].append(future.result())
                run["samples"].append([s.tokens for s in run["results"][-1].sequences])
    run["state"] = service.transport.export_state(training.session_id).result()
    run["step"] = training.get_info().step
    run["report"] = service.simulation_report()
    return run


def test_faults_and_a_restart_leave_training_bit_identical(bios_home):
    clean = sft_loop(SimulationConfig(seed=5))
    faulty = sft_loop(SimulationConfig(seed=5, faults=EVERY_FAULT, schedule=RESTART_AT_15TH_STEP))

    assert faulty["losses"] == clean["losses"]  # exact float equality, every step
    assert faulty["samples"] == clean["samples"]
    assert faulty["step"] == clean["step"] == 30  # a lost answer's step was applied once
    for name, weights in clean["state"].weights.items():
        assert np.array_equal(faulty["state"].weights[name], weights), name
        assert np.array_equal(faulty["state"].adam_m[name], clean["state"].adam_m[name]), name

    report = faulty["report"]
    for kind in ("transient", "timeout", "rate_limit", "session_expiry", "straggler"):
        assert report.faults.get(kind, 0) >= 1, (kind, report.faults)
    assert report.faults["restart"] == 1 and report.faults["lost_in_restart"] >= 1
    failed_attempts = sum(
        report.faults.get(k, 0) for k in ("transient", "timeout", "rate_limit", "session_expiry", "lost_in_restart")
    )
    assert sum(report.retries.values()) == failed_attempts  # every failed attempt was retried once
    client_retries = sum(r.timing.attempts - 1 for r in faulty["results"])
    assert client_retries == failed_attempts
    assert sum(r.metrics.get("retries", 0) for r in faulty["results"] if hasattr(r, "metrics")) == sum(
        r.timing.attempts - 1 for r in faulty["results"] if hasattr(r, "metrics")
    )
    assert clean["report"].faults == {} and clean["report"].retries == {}
    assert report.wall_s > clean["report"].wall_s  # backoff, timeouts and the restart cost simulated time


def test_the_same_seed_replays_the_same_trace_and_another_seed_other_faults(bios_home, tmp_path):
    def trace_of(seed: int, name: str) -> bytes:
        path = tmp_path / name
        sft_loop(SimulationConfig(seed=seed, faults=EVERY_FAULT, trace=str(path)), steps=10)
        return path.read_bytes()

    first, again, other = trace_of(1, "a.json"), trace_of(1, "b.json"), trace_of(2, "c.json")
    assert first == again
    assert first != other
    assert b'"transient"' in first and b'"traceEvents"' in first


def _queue(config: SimulationConfig, sessions: int, tokens: int) -> list[types.RequestTiming]:
    """`sessions` sessions submit one forward_backward of `tokens` tokens each at once."""
    service = bios.ServiceClient(backend="emulator", simulation=config)
    clients = [service.create_lora_training_client(MODEL, rank=4, seed=i) for i in range(sessions)]
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(list(range(1, tokens + 1))),
        loss_fn_inputs={"target_tokens": list(range(2, tokens + 2))},
    )
    futures = [client.forward_backward([datum]) for client in clients]
    return [future.result().timing for future in futures]


@pytest.mark.parametrize("cycle_s", [0.0, 5.0])
def test_queueing_latency_grows_with_sessions_as_the_model_predicts(bios_home, cycle_s):
    tokens = 64
    config = SimulationConfig(
        hardware="H100", devices=8, model="meta-llama/Llama-3.1-8B", max_batch_tokens=tokens, cycle_s=cycle_s
    )
    hardware = profiles.hardware("H100")
    costs = CostModel(
        DeviceGroup(hardware, 8, profiles.efficiency(config, hardware)),
        profiles.KNOWN_MODELS["meta-llama/Llama-3.1-8B"],
    )
    modules = bios.types.LoraConfig(rank=4).target_modules
    step = costs.forward_backward_s([tokens], 4, tuple(modules), True)
    for sessions in (1, 2, 4, 8):
        timings = _queue(config.model_copy(update={"seed": sessions}), sessions, tokens)
        latencies = [t.finished_at - t.enqueued_at for t in timings]
        # capacity for one request per pass: the k-th waits for k-1 passes, each starting on a window boundary
        expected = [(k - 1) * max(step, cycle_s) + step if cycle_s else k * step for k in range(1, sessions + 1)]
        assert latencies == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_a_pass_with_room_batches_sessions_into_one_window(bios_home):
    tokens, sessions = 64, 4
    config = SimulationConfig(
        devices=8, model="meta-llama/Llama-3.1-8B", max_batch_tokens=tokens * sessions, cycle_s=5.0
    )
    timings = _queue(config, sessions, tokens)
    starts = [t.started_at for t in timings]
    step = timings[0].finished_at - timings[0].started_at
    assert starts == pytest.approx([k * step for k in range(sessions)], rel=1e-9)  # one pass, run back to back
    assert timings[-1].finished_at < 5.0  # all done before the next window


def test_memory_admission_rejects_what_never_fits_and_changes_nothing(bios_home):
    config = SimulationConfig(hardware="H100", devices=1, model="meta-llama/Llama-3.1-8B")
    service = bios.ServiceClient(backend="emulator", simulation=config)
    training = service.create_lora_training_client(MODEL, rank=4, seed=3)
    twin = bios.ServiceClient(
        backend="emulator", simulation=config.model_copy(update={"seed": 1})
    ).create_lora_training_client(MODEL, rank=4, seed=3)
    long = types.Datum(model_input=types.ModelInput.from_ints([5] * 255), loss_fn_inputs={"target_tokens": [6] * 255})
    with pytest.raises(bios.InvalidRequestError) as refused:
        training.forward_backward([long] * 64)  # ~16k tokens of activations of an 8B model: more than one H100 holds
    assert refused.value.field == "data" and "GiB" in refused.value.message
    short = [long] * 2
    assert training.forward_backward(short).result().loss == twin.forward_backward(short).result().loss
    assert training.optim_step().result().step == twin.optim_step().result().step == 1


def test_a_request_larger_than_a_pass_is_refused(bios_home):
    service = bios.ServiceClient(backend="emulator", simulation=SimulationConfig(max_batch_tokens=32))
    training = service.create_lora_training_client(MODEL, rank=4)
    datum = types.Datum(model_input=types.ModelInput.from_ints([5] * 40), loss_fn_inputs={"target_tokens": [6] * 40})
    with pytest.raises(bios.InvalidRequestError, match="max_batch_tokens"):
        training.forward_backward([datum])
    assert (
        training.forward_backward(
            [types.Datum(model_input=types.ModelInput.from_ints([5] * 8), loss_fn_inputs={"target_tokens": [6] * 8})]
        )
        .result()
        .loss
        > 0
    )


def test_a_scheduled_fault_hits_the_nth_request_and_is_retried(bios_home):
    config = SimulationConfig(
        schedule=(
            ScheduledFault(kind="transient", request="optim_step", nth=3),
            ScheduledFault(kind="timeout", request="optim_step", nth=5),
        )
    )
    service = bios.ServiceClient(backend="emulator", simulation=config)
    training = service.create_lora_training_client(MODEL, rank=4, seed=2)
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([3, 4, 5, 6]), loss_fn_inputs={"target_tokens": [4, 5, 6, 7]}
    )
    steps = []
    for _ in range(6):
        training.forward_backward([datum]).result()
        steps.append(training.optim_step().result())
    assert [s.step for s in steps] == [1, 2, 3, 4, 5, 6]  # the timed-out 5th step ran once, its retry got its answer
    assert [s.timing.attempts for s in steps] == [1, 1, 2, 1, 2, 1]
    assert steps[2].metrics["retries"] == 1 and "retries" not in steps[0].metrics
    lost = steps[4].timing
    assert lost.finished_at - lost.enqueued_at >= config.request_timeout_s  # the client waited out the timeout first
    report = service.simulation_report()
    assert report.faults == {"timeout": 1, "transient": 1}
    assert report.retries == {"optim_step": 2}


def test_retries_give_up_with_the_typed_error_and_release_the_sequence(bios_home):
    service = bios.ServiceClient(
        backend="emulator", simulation=SimulationConfig(faults=FaultRates(rate_limit=1.0), retry_after_s=3.0)
    )
    training = service.create_lora_training_client(MODEL, rank=4)
    datum = types.Datum(model_input=types.ModelInput.from_ints([3, 4]), loss_fn_inputs={"target_tokens": [4, 5]})
    failing = training.forward_backward([datum])
    with pytest.raises(bios.RateLimitError) as refused:
        failing.result()
    assert refused.value.retry_after == 3.0 and refused.value.retryable
    report = service.simulation_report()
    assert report.requests == {"forward_backward": 12} and report.retries == {"forward_backward": 11}
    assert report.wall_s >= 11 * 3.0  # each retry waited at least Retry-After on the virtual clock
    with pytest.raises(bios.RateLimitError):  # the released number lets the next request run (and be refused too)
        training.optim_step().result()


def test_time_scale_replays_answers_in_simulated_order(bios_home):
    config = SimulationConfig(time_scale=1e-6, devices=8, model="meta-llama/Llama-3.1-8B")
    service = bios.ServiceClient(backend="emulator", simulation=config)
    assert service.transport.scheduler.inline is False  # scaled real time runs on the engine's worker
    training = service.create_lora_training_client(MODEL, rank=4)
    datum = types.Datum(model_input=types.ModelInput.from_ints([3, 4, 5]), loss_fn_inputs={"target_tokens": [4, 5, 6]})
    first, second = training.forward_backward([datum]), training.optim_step()
    timings = [first.result().timing, second.result().timing]
    assert timings[0].finished_at <= timings[1].started_at


def test_train_async_moves_the_clock_only_when_awaited(bios_home):
    config = SimulationConfig(hardware="H100", devices=8, model="meta-llama/Llama-3.1-8B", max_batch_tokens=64)
    service = bios.ServiceClient(backend="emulator", simulation=config)
    first, second = (service.create_lora_training_client(MODEL, rank=4, seed=i) for i in range(2))
    datum = types.Datum(model_input=types.ModelInput.from_ints([3, 4, 5]), loss_fn_inputs={"target_tokens": [4, 5, 6]})

    async def both() -> tuple[types.TrainingResult, types.ForwardBackwardResult]:
        # train's work runs inline, to its end, before the other task submits at t = 0
        trained, other = await asyncio.gather(
            first.train_async([datum], learning_rate=1e-2), second.forward_backward_async([datum])
        )
        return trained, await other

    trained, other = asyncio.run(both())
    assert other.timing.enqueued_at == 0.0
    assert other.timing.started_at >= trained.timing.finished_at > 0.0  # one pass at a time: it waited its turn


def test_bad_simulation_settings_are_typed_errors_naming_the_field(bios_home, tmp_path):
    with pytest.raises(bios.InvalidRequestError) as too_many:
        SimulationConfig(faults=FaultRates(transient=0.6, timeout=0.6))
    assert too_many.value.field == "SimulationConfig.faults" and "add up to 1.2" in too_many.value.message
    with pytest.raises(bios.InvalidRequestError) as unknown_hardware:
        SimulationConfig(hardware="TPU-v9")
    assert unknown_hardware.value.field == "SimulationConfig.hardware" and "H100" in unknown_hardware.value.message
    assert SimulationConfig(hardware="h200").hardware == "H200"
    with pytest.raises(bios.InvalidRequestError) as unknown_model:
        bios.ServiceClient(backend="emulator", simulation=SimulationConfig(model="no/such-model"))
    assert unknown_model.value.field == "model" and "Llama-3.1-8B" in unknown_model.value.message
    with pytest.raises(bios.InvalidRequestError) as remote:
        bios.ServiceClient(base_url="http://127.0.0.1:9", simulation=SimulationConfig())
    assert remote.value.field == "simulation"
    profile = tmp_path / "bad.toml"
    profile.write_text('hardware = "H100"\ndevice = 8\n')
    with pytest.raises(bios.InvalidRequestError) as misspelt:
        SimulationConfig.from_toml(profile)
    assert "device" in misspelt.value.message and "devices" in misspelt.value.message
