"""The cookbook side of tests/server/test_tinker_cookbook.py: run as `python cookbook_side.py
SCENARIO JSON` in a child process whose path holds tinker-cookbook, the `tinker` SDK and this
repository. The served scenarios run one of the cookbook's training loops (`main(config)`)
against a server, and print what the cookbook logged and every training call it sent; the
in-process one hands Bios's native clients to the cookbook's pieces that take a client object,
and prints what they computed. Each prints one line of JSON; the test makes every assertion.
Imports only the standard library, `tinker`, `tinker_cookbook`, `chz`, `torch` and `bios`.

What the cookbook would fetch from the network is supplied here: it loads a model's tokenizer
from the Hugging Face hub by name, so `bios/tiny` is registered (`register_tokenizer`) with the
local tokenizer directory the test passes; its trainers download a pricing file, which is
answered with "no prices", as the cookbook does itself when that download fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import chz
import tinker
import torch
from tinker_cookbook import checkpoint_utils, renderers, tokenizer_utils
from tinker_cookbook.completers import TinkerTokenCompleter
from tinker_cookbook.rl import train as rl_train
from tinker_cookbook.rl.data_processing import assemble_training_data, compute_advantages
from tinker_cookbook.rl.metrics import compute_kl_sample_train, compute_post_kl
from tinker_cookbook.rl.problem_env import ProblemEnv, ProblemGroupBuilder
from tinker_cookbook.rl.rollouts import do_group_rollout
from tinker_cookbook.rl.types import RLDataset, RLDatasetBuilder
from tinker_cookbook.supervised import train as sl_train
from tinker_cookbook.supervised.common import compute_mean_nll
from tinker_cookbook.supervised.data import conversation_to_datum
from tinker_cookbook.supervised.types import ChatDatasetBuilder, ChatDatasetBuilderCommonConfig, SupervisedDataset
from tinker_cookbook.utils import cost_estimation

import bios

MODEL = "bios/tiny"
RENDERER = "qwen3_instruct"
"""The ChatML turns of Qwen3-Instruct-2507, which are exactly bios/tiny's chat template."""


def supervised(url: str, key: str, tokenizer: str, log_path: str, conversations: list, batch_size: int) -> dict:
    """Two epochs of the cookbook's supervised loop on `conversations`, held in memory."""
    calls = _offline(key, tokenizer)
    builder = InMemoryChats(
        conversations=conversations,
        common_config=ChatDatasetBuilderCommonConfig(
            model_name_for_tokenizer=MODEL, renderer_name=RENDERER, max_length=None, batch_size=batch_size
        ),
    )
    config = sl_train.Config(
        log_path=log_path,
        model_name=MODEL,
        recipe_name="bios_cookbook_test",
        renderer_name=RENDERER,
        dataset_builder=builder,
        learning_rate=1e-2,
        num_epochs=2,
        lora_rank=8,
        base_url=url,
        save_every=0,
        eval_every=0,
    )
    asyncio.run(sl_train.main(config))
    return _logged(log_path, calls)


def reinforcement(url: str, key: str, tokenizer: str, log_path: str, steps: int, groups: int, group_size: int) -> dict:
    """`steps` iterations of the cookbook's synchronous RL loop on a one-question environment,
    saving a checkpoint (and a new sampler) at every step."""
    calls = _offline(key, tokenizer)
    config = rl_train.Config(
        learning_rate=1e-2,
        dataset_builder=LetterU(steps=steps, groups=groups, group_size=group_size),
        model_name=MODEL,
        recipe_name="bios_cookbook_test",
        renderer_name=RENDERER,
        max_tokens=8,
        log_path=log_path,
        base_url=url,
        lora_rank=8,
        save_every=1,
        eval_every=0,
        compute_post_kl=True,
    )
    asyncio.run(rl_train.main(config))
    return _logged(log_path, calls)


def in_process(tokenizer: str, log_path: str, groups: int, group_size: int, conversation: list) -> dict:
    """Bios's native in-process clients (emulator) handed to the cookbook's pieces that take a
    client object, on one session: an RL step, an SFT step, then a checkpoint and a refreshed
    sampler (`_rl_step`, `_sft_step`, `_refresh`)."""
    _register_tokenizer(tokenizer)
    Path(log_path).mkdir(parents=True, exist_ok=True)
    return asyncio.run(_in_process(log_path, groups, group_size, conversation))


async def _in_process(log_path: str, groups: int, group_size: int, conversation: list) -> dict:
    service = bios.ServiceClient(backend="emulator")
    training = await service.create_lora_training_client_async(MODEL, rank=8, seed=0, train_unembed=True)
    renderer = renderers.get_renderer(RENDERER, tokenizer_utils.get_tokenizer(MODEL))
    sampler = await training.save_weights_and_get_sampling_client_async()
    data, rl = await _rl_step(training, sampler, LetterUBatches(renderer, 1, groups, group_size))
    sft = await _sft_step(training, conversation_to_datum(conversation, renderer, max_length=None))
    return {"rl": rl, "sft": sft, "refresh": await _refresh(service, training, sampler, data, log_path)}


async def _rl_step(
    training: bios.TrainingClient, sampler: bios.SamplingClient, batches: LetterUBatches
) -> tuple[list[tinker.Datum], dict]:
    """Group rollouts through `TinkerTokenCompleter` on `sampler`, the cookbook's advantages and
    datums, its `train_step` (forward_backward and optim_step) on `training`, then a Bios
    `forward` of the datums under the updated weights: the datums, and what each stage gave."""
    policy = TinkerTokenCompleter(sampling_client=sampler, max_tokens=8)
    rollouts = await asyncio.gather(*(do_group_rollout(builder, policy) for builder in batches.get_batch(0)))
    data, _ = assemble_training_data(rollouts, compute_advantages(rollouts))
    trained = await rl_train.train_step(data, training, 1e-2, num_substeps=1, loss_fn="importance_sampling")
    after = await training.forward([_unmasked(d) for d in data], "importance_sampling")
    return data, {
        "rewards": [group.get_total_rewards() for group in rollouts],
        "actions": [[[t.ac.logprobs for t in traj.transitions] for traj in group.trajectories_G] for group in rollouts],
        "data": [{k: v.tolist() for k, v in d.loss_fn_inputs.items()} for d in data],
        "trained_logprobs": [logprobs.tolist() for logprobs in trained],
        "kl_sample_train": compute_kl_sample_train(data, trained),
        "loss_after": after.loss,
        "logprobs_after": [out["logprobs"].tolist() for out in after.loss_fn_outputs],
    }


def _unmasked(datum: tinker.Datum) -> tinker.Datum:
    """`datum` as the cookbook's `train_step` sends it: without the `mask`, which no loss reads."""
    return tinker.Datum(
        model_input=datum.model_input,
        loss_fn_inputs={k: v for k, v in datum.loss_fn_inputs.items() if k != "mask"},
    )


async def _sft_step(training: bios.TrainingClient, datum: tinker.Datum) -> dict:
    """A conversation rendered by the cookbook, through Bios's forward_backward and optim_step:
    the loss, the cookbook's mean NLL of the logprobs, the weights' sum and the loss after."""
    result = await training.forward_backward([datum], "cross_entropy")
    await training.optim_step(tinker.AdamParams(learning_rate=1e-2))
    after = await training.forward([datum], "cross_entropy")
    weights = datum.loss_fn_inputs["weights"]
    return {
        "loss": result.loss,
        "mean_nll": compute_mean_nll([out["logprobs"] for out in result.loss_fn_outputs], [weights]),
        "weight_sum": float(torch.sum(weights.to_torch())),
        "loss_after": after.loss,
    }


async def _refresh(
    service: bios.ServiceClient,
    training: bios.TrainingClient,
    before: bios.SamplingClient,
    data: list[tinker.Datum],
    log_path: str,
) -> dict:
    """`checkpoint_utils` saves the session's state and sampler weights; a sampler on the saved
    weights, and the cookbook's KL of the RL datums' sampled logprobs to the old sampler's and
    the new one's: the records and both KLs."""
    paths = await checkpoint_utils.save_checkpoint_async(training, "000001", log_path, {"batch": 1}, kind="both")
    after = await service.create_sampling_client_async(model_path=paths["sampler_path"])
    return {
        "checkpoints": [record.to_dict() for record in checkpoint_utils.load_checkpoints_file(log_path)],
        "kl_before": (await compute_post_kl(data, before))[0],
        "kl_after": (await compute_post_kl(data, after))[0],
    }


# ---- the datasets and the environment ------------------------------------------------------------


class Conversations(SupervisedDataset):
    """Rendered conversations in batches of `batch_size`, in order every epoch."""

    def __init__(self, data: list[tinker.Datum], batch_size: int) -> None:
        self.data, self.batch_size = data, batch_size

    def get_batch(self, index: int) -> list[tinker.Datum]:
        return self.data[index * self.batch_size : (index + 1) * self.batch_size]

    def __len__(self) -> int:
        return len(self.data) // self.batch_size

    def set_epoch(self, seed: int = 0) -> None:
        """No shuffling: the test replays the batches in the order they were sent."""


@chz.chz
class InMemoryChats(ChatDatasetBuilder):
    """A chat dataset from conversations in memory, rendered by the cookbook."""

    conversations: list

    def __call__(self) -> tuple[SupervisedDataset, SupervisedDataset | None]:
        renderer, max_length = self.renderer, self.common_config.max_length
        data = [conversation_to_datum(c, renderer, max_length) for c in self.conversations]
        return Conversations(data, self.common_config.batch_size), None


class LetterUEnv(ProblemEnv):
    """Rewards an answer containing the letter "u": about half of bios/tiny's random answers do."""

    def get_question(self) -> str:
        return "Say a word with the letter u."

    def check_answer(self, sample_str: str) -> bool:
        return "u" in sample_str

    def check_format(self, sample_str: str) -> bool:
        return True

    def get_reference_answer(self) -> str:
        return "sun"


class LetterUBatches(RLDataset):
    """`steps` batches of `groups` groups of `group_size` LetterUEnv episodes."""

    def __init__(self, renderer: renderers.Renderer, steps: int, groups: int, group_size: int) -> None:
        self.renderer, self.steps, self.groups, self.group_size = renderer, steps, groups, group_size

    def get_batch(self, index: int) -> list[ProblemGroupBuilder]:
        return [ProblemGroupBuilder(lambda: LetterUEnv(self.renderer), self.group_size) for _ in range(self.groups)]

    def __len__(self) -> int:
        return self.steps


@chz.chz
class LetterU(RLDatasetBuilder):
    steps: int
    groups: int
    group_size: int

    async def __call__(self) -> tuple[RLDataset, RLDataset | None]:
        renderer = renderers.get_renderer(RENDERER, tokenizer_utils.get_tokenizer(MODEL))
        return LetterUBatches(renderer, self.steps, self.groups, self.group_size), None


# ---- offline, and what was sent ------------------------------------------------------------------


def _offline(key: str, tokenizer: str) -> list[dict]:
    """Run the cookbook offline with `key`; returns the list its training calls are recorded in."""
    os.environ["TINKER_API_KEY"] = key
    _register_tokenizer(tokenizer)
    cost_estimation.load_model_pricing = lambda **_: None
    return _record_training_calls()


def _register_tokenizer(tokenizer: str) -> None:
    """Make the cookbook load `MODEL`'s tokenizer from the local directory `tokenizer`."""
    tokenizer_utils.register_tokenizer(MODEL, lambda: tokenizer_utils.get_tokenizer(tokenizer))


def _record_training_calls() -> list[dict]:
    """Record every forward_backward and optim_step any training client sends, in order."""
    calls: list[dict] = []
    forward_backward, optim_step = tinker.TrainingClient.forward_backward, tinker.TrainingClient.optim_step

    def recorded_forward_backward(self, data, loss_fn, loss_fn_config=None):
        data_json = [
            {"tokens": d.model_input.to_ints(), "inputs": {k: v.tolist() for k, v in d.loss_fn_inputs.items()}}
            for d in data
        ]
        calls.append({"call": "forward_backward", "loss_fn": loss_fn, "config": loss_fn_config, "data": data_json})
        return forward_backward(self, data, loss_fn, loss_fn_config)

    def recorded_optim_step(self, optim_params=None, *, adam_params=None):
        calls.append({"call": "optim_step", "adam": (optim_params or adam_params).model_dump()})
        return optim_step(self, optim_params, adam_params=adam_params)

    tinker.TrainingClient.forward_backward = recorded_forward_backward
    tinker.TrainingClient.optim_step = recorded_optim_step
    return calls


def _logged(log_path: str, calls: list[dict]) -> dict:
    """The cookbook's metrics and checkpoint records in `log_path`, and the training calls."""
    logs = Path(log_path)

    def records(name: str) -> list[dict]:
        return [json.loads(line) for line in (logs / name).read_text().splitlines()]

    return {"metrics": records("metrics.jsonl"), "checkpoints": records("checkpoints.jsonl"), "calls": calls}


SCENARIOS = {"supervised": supervised, "reinforcement": reinforcement, "in_process": in_process}

if __name__ == "__main__":
    scenario, arguments = sys.argv[1], json.loads(sys.argv[2])
    print(json.dumps(SCENARIOS[scenario](**arguments)))
