"""Adapters round-trip with Hugging Face PEFT: what Bios saves for sampling, PEFT loads and computes
identically; a PEFT LoRA adapter trained elsewhere starts a Bios session that computes what PEFT
does and trains on; every PEFT setting Bios cannot honour is refused, naming it, changing nothing."""

from __future__ import annotations

import gc
import json
import uuid
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
from helpers import MODEL, make_datum, random_batch
from reference_models import build_reference_model, random_tokens
from safetensors.numpy import load_file, save_file
from safetensors.torch import save_file as save_torch_file
from transformers import AutoModelForCausalLM

from bios import types
from bios.backend import AdapterSpec, AdapterState
from bios.catalog import BUILTIN_MODELS
from bios.engine import peft as bios_peft
from bios.engine.peft import CONFIG_FILE, WEIGHTS_FILE, read_peft_adapter, write_peft_adapter
from bios.errors import InvalidRequestError, NotFoundError
from bios.weights import lora_shapes

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
TINY = BUILTIN_MODELS[MODEL]
VOCAB, LENGTH = 128, 20  # the reference models' vocabulary; tokens per checked sequence


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, service):
    """config → (catalog name, HF directory), each built once and served by the engine."""
    root, built = tmp_path_factory.mktemp("peft-reference"), {}

    def get(config: str) -> tuple[str, Path]:
        if config not in built:
            directory, _ = build_reference_model(config, root / config)
            name = f"hf/peft-{config}-{uuid.uuid4().hex[:6]}"
            service.transport.catalog.register_hf_directory(name, directory)
            built[config] = (name, directory)
        return built[config]

    return get


def hf_model(directory: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()


def torch_logprobs(model: torch.nn.Module, tokens: np.ndarray) -> np.ndarray:
    """log p(tokens[t] | tokens[:t]) for t = 1..T-1 under a transformers / PEFT model: [T-1]."""
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(tokens[None]), use_cache=False).logits[0].double()
    return logits.log_softmax(-1)[torch.arange(len(tokens) - 1), torch.from_numpy(tokens[1:])].numpy()


def tiny_state(
    rank: int = 4, modules: tuple[str, ...] = ("q_proj", "v_proj", "down_proj", "lm_head"), seed: int = 0
) -> AdapterState:
    rng = np.random.default_rng(seed)
    spec = AdapterSpec("a", MODEL, rank=rank, alpha=1.5 * rank, target_modules=modules, dropout=0.1, seed=9)
    weights = {k: rng.standard_normal(s).astype(np.float32) for k, s in lora_shapes(TINY, modules, rank).items()}
    return AdapterState(spec=spec, step=5, weights=weights)


def bios_state_of(service) -> tuple[int, int, list[str]]:
    """(sessions, adapters, checkpoint paths) of the engine, after collecting garbage: a client
    an earlier test dropped must not end its session in the middle of a comparison."""
    gc.collect()
    engine = service.transport
    engine.scheduler.call(lambda: None).result()  # sessions ended by that collection are freed
    return len(engine.session_ids()), len(engine.backend.adapter_ids()), [r.path for r in engine.store.list()]


# ---- export: Bios → PEFT ------------------------------------------------------------------------


@pytest.mark.parametrize("config", ["llama", "qwen3-tied"])
def test_peft_computes_what_bios_exported(config: str, service, reference) -> None:
    name, directory = reference(config)
    client = service.create_lora_training_client(base_model=name, rank=4, alpha=6.0, target_modules=list(ALL), seed=3)
    batch = random_batch(seed=1, vocab=VOCAB)
    for _ in range(3):
        client.train(batch, learning_rate=1e-2)
    record = client.save_weights_for_sampler("peft-export").result()
    peft_dir = service.transport.store.peft_directory(record.path)
    assert peft_dir.parent.name == "peft-export" and {p.name for p in peft_dir.iterdir()} == {CONFIG_FILE, WEIGHTS_FILE}
    saved = load_file(str(peft_dir / WEIGHTS_FILE))
    assert all(v.dtype == np.float32 for v in saved.values())
    assert saved["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape == (4, 96)  # [R, in]
    assert saved["base_model.model.lm_head.lora_B.weight"].shape == (VOCAB, 4)  # [out, R]
    assert all(np.abs(v).max() > 0 for k, v in saved.items() if "lora_B" in k), (
        "B still zero: the check would prove little"
    )
    config_json = json.loads((peft_dir / CONFIG_FILE).read_text())
    assert (config_json["r"], config_json["lora_alpha"], config_json["base_model_name_or_path"]) == (
        4,
        6,
        str(directory),
    )

    model = peft.PeftModel.from_pretrained(hf_model(directory), peft_dir).eval()
    tokens = random_tokens(VOCAB, 1, LENGTH, seed=11)[0]
    theirs = torch_logprobs(model, tokens)
    ours = (
        service.create_sampling_client(model_path=record.path)
        .compute_logprobs(types.ModelInput.from_ints(tokens.tolist()))
        .result()
    )
    np.testing.assert_allclose(np.array(ours[1:]), theirs, atol=1e-4, rtol=0)
    with model.disable_adapter():
        assert np.abs(torch_logprobs(model, tokens) - theirs).max() > 1e-2, "the adapter changes nothing"


def test_peft_directory_of_a_training_state_or_nothing_is_not_found(service, training) -> None:
    store = service.transport.store
    with pytest.raises(NotFoundError) as info:
        store.peft_directory(training.save_state("no-peft").result().path)
    assert info.value.field == "path" and "sampler" in info.value.message
    with pytest.raises(NotFoundError):
        store.peft_directory("bios://nobody/sampler_weights/nothing")


# ---- import: PEFT → Bios -------------------------------------------------------------------------


@pytest.mark.parametrize(("config", "targets"), [("llama", ALL[:7]), ("qwen3-tied", ("q_proj", "up_proj", "lm_head"))])
def test_a_peft_adapter_starts_a_bios_session(
    config: str, targets: tuple[str, ...], service, reference, tmp_path: Path
) -> None:
    name, directory = reference(config)
    torch.manual_seed(0)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False)
    model = peft.get_peft_model(hf_model(directory), lora).eval()
    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(str(tmp_path / "adapter" / WEIGHTS_FILE))
    assert ("base_model.model.lm_head.base_layer.weight" in saved) == ("lm_head" in targets)  # PEFT's copy, checked

    client = service.create_training_client_from_state(str(tmp_path / "adapter"), base_model=name)
    info = client.get_info()
    assert info.step == 0 and info.base_model == name
    assert (info.lora_config.rank, info.lora_config.alpha, info.lora_config.target_modules) == (4, 8.0, targets)
    tokens = random_tokens(VOCAB, 1, LENGTH, seed=5)[0]
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1].tolist()),
        loss_fn_inputs={"target_tokens": tokens[1:].tolist()},
    )
    ours = client.forward([datum]).result().loss_fn_outputs[0]["logprobs"].to_numpy()
    np.testing.assert_allclose(ours, torch_logprobs(model, tokens), atol=1e-4, rtol=0)

    batch = random_batch(seed=2, vocab=VOCAB)
    losses = [client.train(batch, learning_rate=1e-2).loss for _ in range(3)]
    assert losses[0] > losses[1] > losses[2]
    assert client.get_info().step == 3


def test_a_sampler_checkpoints_peft_export_resumes_as_the_same_adapter(service, training) -> None:
    batch = random_batch(seed=3)
    training.train(batch, learning_rate=1e-2)
    record = training.save_weights_for_sampler("re-import").result()
    resumed = service.create_training_client_from_state(
        service.transport.store.peft_directory(record.path), base_model=MODEL
    )
    assert resumed.get_info().step == 0 and resumed.get_info().lora_config.rank == 8
    tokens = np.random.default_rng(4).integers(4, 4096, 16).tolist()
    expected = (
        service.create_sampling_client(model_path=record.path)
        .compute_logprobs(types.ModelInput.from_ints(tokens))
        .result()[1:]
    )
    got = resumed.forward([make_datum(tokens)]).result().loss_fn_outputs[0]["logprobs"].to_numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)  # float32 PEFT file vs the float64 snapshot


# ---- write / read ------------------------------------------------------------------------------


def test_write_then_read_is_exact(tmp_path: Path) -> None:
    state = tiny_state()
    write_peft_adapter(state, TINY, tmp_path)
    lora, weights = read_peft_adapter(tmp_path, TINY)
    assert lora == types.LoraConfig(
        rank=4, alpha=6.0, target_modules=("q_proj", "v_proj", "down_proj", "lm_head"), dropout=0.1
    )
    assert sorted(weights) == sorted(state.weights)
    for key, value in state.weights.items():
        assert weights[key].dtype == np.float32
        np.testing.assert_array_equal(weights[key], value)


def test_bf16_and_regex_adapters_are_read(tmp_path: Path) -> None:
    state = tiny_state(modules=("q_proj", "k_proj"))
    write_peft_adapter(state, TINY, tmp_path)
    tensors = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in load_file(str(tmp_path / WEIGHTS_FILE)).items()}
    save_torch_file(tensors, str(tmp_path / WEIGHTS_FILE))
    edit_config(tmp_path, target_modules=r"model\.layers\.\d+\.self_attn\.(q|k)_proj")
    lora, weights = read_peft_adapter(tmp_path, TINY)
    assert lora.target_modules == ("q_proj", "k_proj")
    for key, value in state.weights.items():
        np.testing.assert_array_equal(weights[key], torch.from_numpy(value).to(torch.bfloat16).float().numpy())


def edit_config(directory: Path, **changes: object) -> None:
    path = directory / CONFIG_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"use_rslora": True}, "adapter_config.use_rslora"),
        ({"use_dora": True}, "adapter_config.use_dora"),
        ({"fan_in_fan_out": True}, "adapter_config.fan_in_fan_out"),
        ({"rank_pattern": {"q_proj": 8}}, "adapter_config.rank_pattern"),
        ({"alpha_pattern": {"q_proj": 16}}, "adapter_config.alpha_pattern"),
        ({"layers_to_transform": [0]}, "adapter_config.layers_to_transform"),
        ({"modules_to_save": ["lm_head"]}, "adapter_config.modules_to_save"),
        ({"lora_bias": True}, "adapter_config.lora_bias"),
        ({"some_future_setting": 3}, "adapter_config.some_future_setting"),
        ({"bias": "lora_only"}, "adapter_config.bias"),
        ({"peft_type": "IA3"}, "adapter_config.peft_type"),
        ({"task_type": "SEQ_CLS"}, "adapter_config.task_type"),
        ({"init_lora_weights": "pissa"}, "adapter_config.init_lora_weights"),
        (
            {"target_modules": ["q_proj", "v_proj", "down_proj", "lm_head", "embed_tokens"]},
            "adapter_config.target_modules",
        ),
        ({"target_modules": r"model\.layers\.0\..*|lm_head"}, "adapter_config.target_modules"),  # layer 0 only
        (
            {"target_modules": ["q_proj", "v_proj"]},
            "adapter_model.base_model.model.lm_head.lora_A.weight",
        ),  # extra tensors
        ({"r": 8}, "adapter_model.base_model.model.lm_head.lora_A.weight"),
        ({"r": 0}, "adapter_config.r"),
        ({"lora_alpha": -1}, "adapter_config.lora_alpha"),
        ({"lora_dropout": 1.5}, "adapter_config.lora_dropout"),
    ],
)
def test_each_unsupported_setting_is_refused_by_name(changes: dict, field: str, tmp_path: Path) -> None:
    write_peft_adapter(tiny_state(), TINY, tmp_path)
    edit_config(tmp_path, **changes)
    with pytest.raises(InvalidRequestError) as info:
        read_peft_adapter(tmp_path, TINY)
    assert info.value.field == field, info.value.message
    key = field.removeprefix("adapter_config.")
    assert key in info.value.message or field.startswith("adapter_model")


def test_bad_tensors_and_files_are_refused(tmp_path: Path) -> None:
    write_peft_adapter(tiny_state(modules=("q_proj",)), TINY, tmp_path)
    with pytest.raises(InvalidRequestError, match=r"shape \[4, 64\]") as info:  # another model: d_model 128
        read_peft_adapter(tmp_path, BUILTIN_MODELS["ultrasafe/usf-general"])
    assert info.value.field.startswith("adapter_model.")
    tensors = load_file(str(tmp_path / WEIGHTS_FILE))
    save_file(
        {**tensors, "base_model.model.model.embed_tokens.lora_embedding_A": np.zeros((4, 64), np.float32)},
        str(tmp_path / WEIGHTS_FILE),
    )
    with pytest.raises(InvalidRequestError) as info:
        read_peft_adapter(tmp_path, TINY)
    assert info.value.field == "adapter_model.base_model.model.model.embed_tokens.lora_embedding_A"
    (tmp_path / WEIGHTS_FILE).unlink()
    with pytest.raises(InvalidRequestError, match=WEIGHTS_FILE) as info:
        read_peft_adapter(tmp_path, TINY)
    assert info.value.field == "path"


def test_peft_base_layer_copy_is_checked_against_the_served_model(tmp_path: Path) -> None:
    write_peft_adapter(tiny_state(), TINY, tmp_path)
    tensors = load_file(str(tmp_path / WEIGHTS_FILE))
    unembedding = bios_peft.generate_base_weights(TINY)["lm_head.weight"]
    save_file({**tensors, "base_model.model.lm_head.base_layer.weight": unembedding}, str(tmp_path / WEIGHTS_FILE))
    read_peft_adapter(tmp_path, TINY)  # PEFT's copy of the untouched unembedding is accepted
    save_file(
        {**tensors, "base_model.model.lm_head.base_layer.weight": unembedding + 0.1}, str(tmp_path / WEIGHTS_FILE)
    )
    with pytest.raises(InvalidRequestError, match="another base model"):
        read_peft_adapter(tmp_path, TINY)


# ---- engine: bad imports change nothing ----------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "base_model", "error", "field"),
    [
        ({}, None, InvalidRequestError, "base_model"),
        ({}, "no/such-model", NotFoundError, "base_model"),
        ({"use_rslora": True}, MODEL, InvalidRequestError, "adapter_config.use_rslora"),
        ({"r": 40}, MODEL, InvalidRequestError, "adapter_model.base_model.model.lm_head.lora_A.weight"),
    ],
)
def test_a_bad_import_creates_nothing(
    changes: dict, base_model: str | None, error: type, field: str, service, tmp_path: Path
) -> None:
    write_peft_adapter(tiny_state(), TINY, tmp_path)
    edit_config(tmp_path, **changes)
    before = bios_state_of(service)
    with pytest.raises(error) as info:
        service.create_training_client_from_state(str(tmp_path), base_model=base_model)
    assert info.value.field == field
    assert bios_state_of(service) == before


def test_a_rank_above_the_models_maximum_creates_nothing(service, tmp_path: Path) -> None:
    write_peft_adapter(tiny_state(rank=TINY.max_lora_rank + 1), TINY, tmp_path)
    before = bios_state_of(service)
    with pytest.raises(InvalidRequestError) as info:
        service.create_training_client_from_state(tmp_path, base_model=MODEL)
    assert info.value.field == "rank"
    assert bios_state_of(service) == before


def test_path_forms(service, training, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match=r"adapter_config\.json") as info:
        service.create_training_client_from_state(str(tmp_path / "missing"), base_model=MODEL)
    assert info.value.field == "path" and "bios://SESSION/weights/NAME" in info.value.message
    with pytest.raises(InvalidRequestError, match=CONFIG_FILE) as info:
        service.create_training_client_from_state(str(tmp_path), base_model=MODEL)  # a directory, but empty
    assert info.value.field == "path"
    path = training.save_state("forms").result().path
    assert service.create_training_client_from_state(path, base_model=MODEL).get_info().step == 0
    with pytest.raises(InvalidRequestError) as info:
        service.create_training_client_from_state(path, base_model="ultrasafe/usf-code")
    assert info.value.field == "base_model"
