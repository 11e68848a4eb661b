"""The child of tests/test_tinker_style.py's test of the tinker SDK's own request objects: run as
`python sdk_objects_side.py objects JSON` with the SDK and this repository on its path. A Bios
session (in-process on the emulator, or remote when BIOS_BASE_URL is set) is driven with the
SDK's `ModelInput`, `TensorData`, `Datum`, `AdamParams` and `SamplingParams`, and a twin session
with Bios's own; both answers are printed as one line of JSON for the test to compare."""

from __future__ import annotations

import json
import sys
from types import ModuleType

import numpy as np
import tinker

import bios
import bios.types


def objects(tokens: list[int]) -> dict:
    """What a session answers when given the SDK's request objects and when given Bios's, and
    the field a Bios error names for an SDK `SamplingParams` whose `top_p` is out of range."""
    service = bios.ServiceClient(backend="emulator")
    seen = {"sdk": _session(service, tinker, tokens), "bios": _session(service, bios.types, tokens)}
    sampler = service.create_sampling_client(base_model="bios/tiny")
    try:
        sampler.sample(tinker.ModelInput.from_ints(tokens), tinker.SamplingParams(top_p=1.5)).result()
    except bios.InvalidRequestError as error:
        seen["refused"] = error.field
    return seen


def _session(service: bios.ServiceClient, types: ModuleType, tokens: list[int]) -> dict:
    """A training step, greedy samples (from the session, and in the SDK's positional order
    from a snapshot) and prompt logprobs, all requested with the classes of `types`."""
    training = service.create_lora_training_client("bios/tiny", rank=4, seed=7)
    weights = np.linspace(0.5, 1.0, len(tokens) - 1, dtype=np.float32)
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData.from_numpy(np.asarray(tokens[1:], dtype=np.int64)),
            "weights": types.TensorData.from_numpy(weights),
        },
    )
    loss = training.forward_backward([datum], "cross_entropy").result().loss
    training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    prompt, greedy = types.ModelInput.from_ints(tokens[:3]), types.SamplingParams(max_tokens=4, temperature=0.0)
    sampler = training.save_weights_and_get_sampling_client()
    return {
        "loss": loss,
        "loss_after": training.forward([datum], "cross_entropy").result().loss,
        "sampled": training.sample(prompt, greedy).result().sequences[0].tokens,
        "positional": [s.tokens for s in sampler.sample(prompt, 2, greedy).result().sequences],
        "prompt_logprobs": sampler.compute_logprobs(types.ModelInput.from_ints(tokens)).result(),
    }


SCENARIOS = {"objects": objects}

if __name__ == "__main__":
    scenario, arguments = sys.argv[1], json.loads(sys.argv[2])
    print(json.dumps(SCENARIOS[scenario](**arguments)))
