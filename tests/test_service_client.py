"""ServiceClient configuration, backend discovery and catalog entries backed by HF directories."""

from __future__ import annotations

import json
import shutil
from importlib.resources import files

import pytest
from helpers import random_batch
from safetensors.numpy import save_file

import bios
from bios.catalog import BUILTIN_MODELS, spec_from_hf_directory
from bios.weights import generate_base_weights

pytestmark = pytest.mark.api


def test_configuration_reads_the_environment_and_arguments_win(monkeypatch):
    monkeypatch.setenv("BIOS_BACKEND", "emulator")
    monkeypatch.setenv("BIOS_API_KEY", "env-key")
    assert bios.ServiceClient().config.backend == "emulator"
    assert bios.ServiceClient(api_key="arg-key").config.api_key == "arg-key"


@pytest.mark.inprocess
def test_backends_by_entry_point_or_module_factory():
    by_name = bios.ServiceClient(backend="emulator").create_lora_training_client("bios/tiny", rank=4, seed=2)
    by_factory = bios.ServiceClient(backend="emulator:create_backend").create_lora_training_client(
        "bios/tiny", rank=4, seed=2
    )
    batch = random_batch(seed=21)
    assert by_name.train(batch).loss == by_factory.train(batch).loss
    for bad in ("no-such-backend", "no_such_module:create", "emulator:no_such_factory"):
        with pytest.raises(bios.InvalidRequestError) as err:
            bios.ServiceClient(backend=bad)
        assert err.value.field == "backend"


def _hf_directory(tmp_path, config: dict) -> str:
    directory = tmp_path / "model"
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    shutil.copy(files("bios") / "data" / "tokenizer" / "tokenizer.json", directory / "tokenizer.json")
    return str(directory)


TINY_CONFIG = {
    "model_type": "llama",
    "vocab_size": 4096,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}


@pytest.mark.inprocess
def test_an_hf_directory_serves_the_same_model_as_its_seed(tmp_path, service):
    directory = _hf_directory(tmp_path, TINY_CONFIG)
    save_file(generate_base_weights(BUILTIN_MODELS["bios/tiny"]), f"{directory}/model.safetensors")
    engine = service.transport
    engine.catalog.register_hf_directory("local/tiny", directory)
    info = next(m for m in service.get_server_capabilities().supported_models if m.model_name == "local/tiny")
    assert not info.random_init and info.n_params == BUILTIN_MODELS["bios/tiny"].n_params
    batch = random_batch(seed=22)
    local = service.create_lora_training_client("local/tiny", rank=4, seed=1)
    builtin = service.create_lora_training_client("bios/tiny", rank=4, seed=1)
    assert [local.train(batch).loss for _ in range(2)] == [builtin.train(batch).loss for _ in range(2)]


def test_hf_configs_of_both_rope_conventions_are_read(tmp_path):
    legacy = dict(
        TINY_CONFIG,
        model_type="qwen3",
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128,
        },
    )
    spec = spec_from_hf_directory("legacy", _hf_directory(tmp_path / "a", legacy))
    modern = {k: v for k, v in legacy.items() if k not in ("rope_theta", "rope_scaling")}
    modern["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, **legacy["rope_scaling"]}
    modern_spec = spec_from_hf_directory("modern", _hf_directory(tmp_path / "b", modern))
    assert spec.architecture == modern_spec.architecture == "qwen3"
    assert spec.rope_theta == modern_spec.rope_theta == 500000.0
    assert spec.rope_scaling == modern_spec.rope_scaling and dict(spec.rope_scaling)["factor"] == 8.0
    with pytest.raises(bios.InvalidRequestError) as err:
        spec_from_hf_directory("gpt", _hf_directory(tmp_path / "c", dict(TINY_CONFIG, model_type="gpt2")))
    assert err.value.field == "model_type"


@pytest.mark.parametrize(
    "extra", [{"attention_bias": True}, {"mlp_bias": True}, {"use_sliding_window": True}, {"hidden_act": "gelu"}]
)
def test_hf_configs_the_decoder_cannot_serve_are_rejected(tmp_path, extra):
    with pytest.raises(bios.InvalidRequestError) as err:
        spec_from_hf_directory("odd", _hf_directory(tmp_path, dict(TINY_CONFIG, **extra)))
    assert err.value.field in ("attention_bias", "mlp_bias", "sliding_window", "hidden_act")
