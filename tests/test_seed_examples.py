"""Every example of the two reference pages, run as written on the emulator.

Where a page reads futures it never created (`fwd_future` after a `train()` call), the test
does what the reader obviously means: the pipelined forward_backward + optim_step of the
same page, or the `train()` result itself.
"""

from __future__ import annotations

import asyncio

import pytest

import bios
from bios import types

pytestmark = pytest.mark.api


def _finance_client(service: bios.ServiceClient) -> bios.TrainingClient:
    return service.create_lora_training_client(base_model="ultrasafe/usf-finance", rank=16, alpha=32)


def _batch(tokenizer: bios.Tokenizer, texts: list[str]) -> list[types.Datum]:
    data = []
    for text in texts:
        tokens = tokenizer.encode(text)
        input_tokens, target_tokens = tokens[:-1], tokens[1:]
        loss_weights = [1.0] * len(target_tokens)
        data.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(input_tokens),
                loss_fn_inputs={"target_tokens": target_tokens, "weights": loss_weights},
            )
        )
    return data


def test_train_example(service):
    training_client = _finance_client(service)
    tokenizer = training_client.get_tokenizer()
    tokens = tokenizer.encode("The quarterly revenue grew by twelve percent.")
    input_tokens, target_tokens, loss_weights = tokens[:-1], tokens[1:], [1.0] * (len(tokens) - 1)

    datum = types.Datum(
        model_input=types.ModelInput.from_ints(input_tokens),
        loss_fn_inputs={"target_tokens": target_tokens, "weights": loss_weights},
    )
    result = training_client.train([datum], loss_fn="cross_entropy", learning_rate=2e-4)

    assert isinstance(result, types.TrainingResult)
    assert result.step == 1 and result.loss > 0
    assert f"{result.loss:.4f}" and result.metrics["grad_norm"] > 0


def test_sample_example(service):
    training_client = _finance_client(service)
    sampling_client = training_client.save_weights_and_get_sampling_client(name="seed-sample")
    tokenizer = sampling_client.get_tokenizer()

    prompt_tokens = tokenizer.encode("Analyze the stock market trend for")
    prompt = types.ModelInput.from_ints(prompt_tokens)
    params = types.SamplingParams(max_tokens=256, temperature=0.7, top_p=0.9, stop=["\n\n", "END"])
    result = sampling_client.sample(prompt=prompt, sampling_params=params, num_samples=3).result()

    assert len(result.sequences) == 3
    for seq in result.sequences:
        text = tokenizer.decode(seq.tokens)
        assert 1 <= len(seq.tokens) <= 256 and len(seq.logprobs) == len(seq.tokens)
        if seq.stop_reason == "stop":
            assert "\n\n" in text or "END" in text
        else:
            assert len(seq.tokens) == 256


def test_save_state_example(service):
    training_client = _finance_client(service)
    checkpoint = training_client.save_state(
        name="epoch_5_step_1000",
        metadata={"epoch": 5, "step": 1000, "loss": 0.234, "accuracy": 0.89},
    ).result()

    assert checkpoint.path.startswith("bios://") and checkpoint.path.endswith("/weights/epoch_5_step_1000")
    assert checkpoint.id and checkpoint.metadata["accuracy"] == 0.89


def test_get_tokenizer_example(service):
    training_client = _finance_client(service)
    tokenizer = training_client.get_tokenizer()
    text = "Hello, world!"
    tokens = tokenizer.encode(text, add_special_tokens=True)
    decoded = tokenizer.decode(tokens)
    vocab_size = tokenizer.vocab_size

    assert tokens[0] == tokenizer.bos_token_id
    assert decoded.endswith(text) and tokenizer.decode(tokens, skip_special_tokens=True) == text
    assert vocab_size == 4096


def test_async_training_example(service):
    training_client = _finance_client(service)
    dataloader = [_batch(training_client.get_tokenizer(), ["buy low", "sell high"]) for _ in range(3)]
    losses = []

    async def train_async(training_client, dataloader):
        for batch in dataloader:
            result = await training_client.train_async(batch, loss_fn="cross_entropy", learning_rate=1e-4)
            losses.append(result.loss)

    asyncio.run(train_async(training_client, dataloader))
    assert len(losses) == 3 and training_client.get_info().step == 3


def test_service_client_example(service, monkeypatch):
    monkeypatch.setenv("BIOS_API_KEY", "from-the-environment")
    service_client = bios.ServiceClient()
    assert service_client.config.api_key == "from-the-environment"
    service_client = bios.ServiceClient(api_key="your-key-here")
    assert service_client.config.api_key == "your-key-here"

    capabilities = service_client.get_server_capabilities()
    names = [model.model_name for model in capabilities.supported_models]
    for expert in ("healthcare", "finance", "code", "conversation", "general"):
        assert f"ultrasafe/usf-{expert}" in names


def test_training_client_example_with_pipelined_futures(service):
    training_client = service.create_lora_training_client(base_model="ultrasafe/usf-finance", rank=16, alpha=32)
    data = _batch(training_client.get_tokenizer(), ["interest rates rose", "bond yields fell"])
    result = training_client.train(data, loss_fn="cross_entropy", learning_rate=1e-4)
    assert result.step == 1

    adam_params = types.AdamParams(learning_rate=1e-4)
    fwd_future = training_client.forward_backward(data, "cross_entropy")
    opt_future = training_client.optim_step(adam_params)
    fwd_result = fwd_future.result()
    opt_result = opt_future.result()
    assert fwd_result.loss < result.loss  # one step of training already lowered it
    assert opt_result.step == 2


def test_sampling_client_example(service):
    training_client = _finance_client(service)
    tokens = training_client.get_tokenizer().encode("Portfolio outlook:")
    sampling_client = training_client.save_weights_and_get_sampling_client(name="my-finance-model")
    result = sampling_client.sample(
        prompt=bios.types.ModelInput.from_ints(tokens),
        sampling_params=bios.types.SamplingParams(max_tokens=256, temperature=0.7, top_p=0.9),
        num_samples=4,
    ).result()
    eos = training_client.get_tokenizer().eos_token_id
    assert len(result.sequences) == 4
    for seq in result.sequences:  # no stop given: each ends at max_tokens or at the model's EOS
        assert (len(seq.tokens), seq.stop_reason) == (256, "length") or (
            seq.tokens[-1] == eos and seq.stop_reason == "stop" and len(seq.tokens) <= 256
        )


def test_async_train_step_example(service):
    training_client = _finance_client(service)
    batch = _batch(training_client.get_tokenizer(), ["credit spreads widened"])

    async def train_step(training_client, data):
        result = await training_client.train_async(data, loss_fn="cross_entropy", learning_rate=1e-4)
        fwd_future = await training_client.forward_backward_async(data, "cross_entropy")
        opt_future = await training_client.optim_step_async(types.AdamParams(learning_rate=1e-4))
        fwd_result = await fwd_future
        opt_result = await opt_future
        return result.loss, fwd_result.loss, opt_result.step

    first, second, step = asyncio.run(train_step(training_client, batch))
    assert second < first and step == 2


def test_complete_training_workflow(service):
    service_client = service
    training_client = service_client.create_lora_training_client(base_model="ultrasafe/usf-finance", rank=16, alpha=32)
    tokenizer = training_client.get_tokenizer()
    dataloader = [_batch(tokenizer, ["revenue up", "costs down"]), _batch(tokenizer, ["margins widened"])]
    num_epochs, saved, losses = 2, [], []

    for epoch in range(num_epochs):
        for batch in dataloader:
            result = training_client.train(batch, loss_fn="cross_entropy", learning_rate=1e-4)
            losses.append(result.loss)
        checkpoint = training_client.save_state(name=f"epoch_{epoch}").result()
        saved.append(checkpoint.path)

    sampling_client = training_client.save_weights_and_get_sampling_client(name="production-model")
    prompt_tokens = tokenizer.encode("Forecast:")
    result = sampling_client.sample(
        prompt=types.ModelInput.from_ints(prompt_tokens),
        sampling_params=types.SamplingParams(max_tokens=256, temperature=0.7),
    ).result()

    assert training_client.get_info().step == 4
    assert [p.rsplit("/", 1)[1] for p in saved] == ["epoch_0", "epoch_1"]
    assert isinstance(tokenizer.decode(result.sequences[0].tokens), str)
