"""A plain SFT loop on the built-in model, with a sample every 10 steps.

Run it as is, or under the service simulator to see what it would cost on real hardware and
how it copes with a failing service:

    python examples/sft_loop.py --steps 30
    bios simulate examples/sft_loop.py --profile examples/profiles/h100x8-llama8b.toml
    bios simulate examples/sft_loop.py --profile examples/profiles/faults.toml --trace run.json
"""

from __future__ import annotations

import argparse

import bios
from bios import types

TEXT = "Bios trains LoRA adapters with plain Python loops: forward_backward, optim_step, sample."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--model", default="bios/tiny")
    args = parser.parse_args()

    service = bios.ServiceClient()
    training = service.create_lora_training_client(args.model, rank=8, seed=0)
    tokenizer = training.get_tokenizer()
    ids = tokenizer.encode(TEXT)
    batch = [
        types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]), loss_fn_inputs={"target_tokens": ids[1:]})
    ] * 8
    prompt = types.ModelInput.from_ints(ids[:4])
    for step in range(1, args.steps + 1):
        backward = training.forward_backward(batch)  # submitted together, run in order
        update = training.optim_step(types.AdamParams(learning_rate=1e-2))
        loss, _ = backward.result().loss, update.result()
        if step % 10 == 0 or step == args.steps:
            sampler = training.save_weights_and_get_sampling_client(f"step-{step}")
            completion = sampler.sample(prompt, types.SamplingParams(max_tokens=16, temperature=0.0)).result()
            print(f"step {step:3d}  loss {loss:8.3f}  sample {tokenizer.decode(completion.sequences[0].tokens)!r}")


if __name__ == "__main__":
    main()
