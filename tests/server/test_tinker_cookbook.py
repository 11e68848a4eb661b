"""tinker-cookbook's supervised and RL training loops against `bios serve`, end to end.

The cookbook's own `main(config)` of each loop runs unmodified in a child process
(tests/support/cookbook_release.py, cookbook_side.py) against a `ThreadedServer` on the emulator,
with an in-memory chat dataset and a one-question environment on bios/tiny. The child reports what
the cookbook logged and every training call it sent; here those calls are replayed on a native
in-process session, which must pass through the same numbers. The cookbook's pieces that take a
client object (completer, rollouts, RL data assembly, `train_step`, checkpointing, KL metrics)
are also handed Bios's native in-process clients directly.
"""

from __future__ import annotations

import math

import pytest
from cookbook_release import run_cookbook

from bios import types
from bios.tokenizer import Tokenizer

pytestmark = pytest.mark.slow  # installs the cookbook and runs it in child processes

MODEL = "bios/tiny"
KEY = "tml-tinker-cookbook-0123456789"
CONVERSATIONS = [
    [
        {"role": "user", "content": f"What is {a} plus {b}?"},
        {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
    ]
    for a in range(3)
    for b in range(4)
]
BATCH = 4


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from server_process import ThreadedServer

    from bios.server import ServerOptions

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BIOS_API_KEYS", KEY)
        with ThreadedServer(
            ServerOptions(backend="emulator", home=tmp_path_factory.mktemp("cookbook-home"))
        ) as running:
            yield running


def cookbook(scenario: str, server, tmp_path, **arguments: object) -> dict:
    """What the cookbook logged and sent in `scenario`, run with Bios's own bios/tiny tokenizer."""
    tokenizer = Tokenizer.builtin().name_or_path
    return run_cookbook(
        scenario, url=server.url, key=KEY, tokenizer=tokenizer, log_path=str(tmp_path / scenario), **arguments
    )


def replay(service, calls: list[dict]) -> list[types.ForwardBackwardResult]:
    """The cookbook's training calls sent in order to a fresh native in-process session with the
    served run's adapter (the SDK's: rank 8, seed 0, unembedding trained too): each
    forward_backward's result."""
    training = service.create_lora_training_client(base_model=MODEL, rank=8, seed=0, train_unembed=True)
    results = []
    for call in calls:
        if call["call"] == "optim_step":
            training.optim_step(types.AdamParams(**call["adam"])).result()
            continue
        data = [
            types.Datum(model_input=types.ModelInput.from_ints(d["tokens"]), loss_fn_inputs=d["inputs"])
            for d in call["data"]
        ]
        results.append(training.forward_backward(data, call["loss_fn"], call["config"]).result())
    return results


def mean_nll(result: types.ForwardBackwardResult, data: list[dict]) -> float:
    """The cookbook's `train_mean_nll` of a batch: -sum(weight * logprob) / sum(weight)."""
    pairs = [
        (lp, w)
        for out, d in zip(result.loss_fn_outputs, data)
        for lp, w in zip(out["logprobs"].data, d["inputs"]["weights"])
    ]
    return -sum(lp * w for lp, w in pairs) / sum(w for _, w in pairs)


def steps(seen: dict, metric: str) -> list[dict]:
    """The metrics rows of the training steps: those that carry `metric`, in order."""
    return [row for row in seen["metrics"] if metric in row]


def test_the_supervised_loop_lowers_the_loss_as_the_native_loop_does(server, service, tmp_path):
    seen = cookbook("supervised", server, tmp_path, conversations=CONVERSATIONS, batch_size=BATCH)
    rows = steps(seen, "train_mean_nll")
    losses = [row["train_mean_nll"] for row in rows]
    per_epoch = len(CONVERSATIONS) // BATCH
    assert len(losses) == 2 * per_epoch
    assert [row["step"] for row in rows] == list(range(len(losses))), "the cookbook's own step count is logged"
    assert all(second < first for first, second in zip(losses, losses[per_epoch:])), "each batch's loss fell"
    assert losses[-1] < 0.8 * losses[0], losses

    first = seen["calls"][0]["data"][0]
    rendered = [*first["tokens"], first["inputs"]["target_tokens"][-1]]
    template = Tokenizer.builtin().apply_chat_template(CONVERSATIONS[0])
    assert template[: len(rendered)] == rendered, "the cookbook's renderer writes bios/tiny's chat template"
    assert [call["call"] for call in seen["calls"]] == ["forward_backward", "optim_step"] * len(losses)

    sent = seen["calls"][::2]
    native = [mean_nll(result, call["data"]) for result, call in zip(replay(service, seen["calls"]), sent)]
    assert native == pytest.approx(losses, rel=1e-6)
    (final,) = seen["checkpoints"]
    assert final["name"] == "final" and final["sampler_path"].endswith("/sampler_weights/final")


def test_the_rl_loop_samples_groups_trains_and_refreshes_its_sampler(server, service, tmp_path):
    n_steps, groups, group_size = 3, 2, 4
    seen = cookbook("reinforcement", server, tmp_path, steps=n_steps, groups=groups, group_size=group_size)
    rows = steps(seen, "optim/kl_sample_train_v1")
    assert len(rows) == n_steps
    assert all(math.isfinite(v) for row in rows for v in row.values() if isinstance(v, float)), rows
    assert all(-0.1 <= row["env/all/reward/total"] <= 1.0 for row in rows)
    assert all(row["optim/kl_sample_train_v2"] == pytest.approx(0.0, abs=1e-9) for row in rows), (
        "each step sampled from the weights it trained: the sampler was refreshed after every update"
    )
    assert any(row["kl_pre_post_v2"] > 0 for row in rows), "an update moved the policy the next sampler serves"
    samplers = [record["sampler_path"] for record in seen["checkpoints"]]
    assert [p.rsplit("/", 1)[1] for p in samplers] == ["000001", "000002", "000003", "final"]
    assert len(set(samplers)) == len(samplers)

    backwards = [call for call in seen["calls"] if call["call"] == "forward_backward"]
    assert [call["loss_fn"] for call in backwards] == ["importance_sampling"] * n_steps
    assert all(len(call["data"]) == groups * group_size for call in backwards), "one datum per episode"
    for result, call in zip(replay(service, seen["calls"]), backwards):
        for out, datum in zip(result.loss_fn_outputs, call["data"]):
            sampled = datum["inputs"]["logprobs"]
            trained = [lp for lp, s in zip(out["logprobs"].data, sampled) if s != 0.0]
            assert trained == pytest.approx([s for s in sampled if s != 0.0], rel=1e-6, abs=1e-6), (
                "the native loop's logprobs are the served sampler's at every step"
            )


@pytest.fixture(scope="module")
def in_process(tmp_path_factory) -> dict:
    """What the cookbook's pieces computed with Bios's native in-process clients (cookbook_side's
    `in_process`): an RL step of 2 groups of 4 LetterU episodes, an SFT step on one conversation,
    a checkpoint and a refreshed sampler."""
    return run_cookbook(
        "in_process",
        tokenizer=Tokenizer.builtin().name_or_path,
        log_path=str(tmp_path_factory.mktemp("cookbook-in-process")),
        groups=2,
        group_size=4,
        conversation=CONVERSATIONS[5],
    )


def _actions(values: list[float], datum: dict) -> list[float]:
    """The entries of `values` (aligned with `datum`'s targets) at its action tokens (mask 1)."""
    return [v for v, m in zip(values, datum["mask"]) if m > 0]


def test_cookbook_rollouts_and_train_step_run_on_native_clients(in_process):
    rl = in_process["rl"]
    assert [len(rewards) for rewards in rl["rewards"]] == [4, 4]
    assert all(math.isfinite(r) and -0.1 <= r <= 1.0 for rewards in rl["rewards"] for r in rewards)
    episodes = [
        (reward - sum(rewards) / len(rewards), turns)
        for rewards, group in zip(rl["rewards"], rl["actions"])
        for reward, turns in zip(rewards, group)
    ]
    assert len(rl["data"]) == len(episodes) == 8, "one datum per single-turn episode"
    for datum, (advantage, (sampled,)) in zip(rl["data"], episodes):
        assert _actions(datum["logprobs"], datum) == pytest.approx(sampled, rel=1e-6), "the Bios sampler's"
        assert _actions(datum["advantages"], datum) == pytest.approx([advantage] * len(sampled), abs=1e-6)
    for datum, trained in zip(rl["data"], rl["trained_logprobs"]):
        assert _actions(trained, datum) == pytest.approx(_actions(datum["logprobs"], datum), rel=1e-6, abs=1e-6), (
            "Bios's forward_backward scores the actions as its sampler did"
        )
    assert rl["kl_sample_train"]["optim/kl_sample_train_v2"] == pytest.approx(0.0, abs=1e-9)

    surrogate = -sum(
        a * math.exp(lp - s)
        for datum, after in zip(rl["data"], rl["logprobs_after"])
        for lp, s, a in zip(after, datum["logprobs"], datum["advantages"])
    )
    assert rl["loss_after"] == pytest.approx(surrogate, rel=1e-5, abs=1e-6), "L2: -sum r[t] A[t]"
    if any(a != 0 for datum in rl["data"] for a in datum["advantages"]):
        assert rl["loss_after"] < 0, "the step raised the ratio of the tokens with positive advantage"


def test_a_cookbook_rendered_conversation_trains_on_native_clients(in_process):
    sft = in_process["sft"]
    assert sft["weight_sum"] == pytest.approx(1.0), "the cookbook's mean reduction"
    assert sft["loss"] == pytest.approx(sft["mean_nll"] * sft["weight_sum"], rel=1e-6)
    assert sft["loss_after"] < sft["loss"]


def test_cookbook_checkpoints_and_kl_see_the_refreshed_native_sampler(in_process):
    refresh = in_process["refresh"]
    (record,) = refresh["checkpoints"]
    assert record["name"] == "000001" and record["batch"] == 1
    assert record["state_path"].startswith("bios://") and record["state_path"].endswith("/weights/000001")
    assert record["sampler_path"].endswith("/sampler_weights/000001")
    assert refresh["kl_before"]["kl_pre_post_v2"] == pytest.approx(0.0, abs=1e-9), "the old sampler is unchanged"
    assert refresh["kl_after"]["kl_pre_post_v2"] > 1e-3, "the new sampler serves the trained weights"
