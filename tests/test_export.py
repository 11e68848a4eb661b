"""`bios export`: what Bios trained, Hugging Face loads and computes identically.

A merged export loads with `AutoModelForCausalLM.from_pretrained` and gives Bios's logprobs and
Bios's greedy tokens; a PEFT export on top of the merged export of an untrained adapter does the
same. Built-in models (Llama, Qwen2, Qwen3 with tied embeddings, so lm_head must untie) and small
random Hugging Face directories (the path a real checkpoint such as SmolLM2 takes) are covered.
Bad input raises a typed error naming the field and writes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import uuid
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
from helpers import MODEL, make_datum, random_batch
from reference_models import build_reference_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GenerationConfig

from bios import types
from bios.catalog import BUILTIN_MODELS, Catalog
from bios.cli import main as bios_cli
from bios.engine.peft import CONFIG_FILE, WEIGHTS_FILE
from bios.errors import InvalidRequestError, NotFoundError
from bios.export import export_merged, export_peft

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
LENGTH, NEW_TOKENS, ATOL = 20, 12, 1e-4
TINY = BUILTIN_MODELS[MODEL]
BUILTIN_VARIANTS = {
    "tiny": None,
    "tiny-qwen2": dict(architecture="qwen2", rope_theta=1e6, rms_eps=1e-6),
    "tiny-qwen3-tied": dict(architecture="qwen3", head_dim=32, tie_embeddings=True, rms_eps=1e-6),
}
"""Built-in models to export: bios/tiny itself, and variants of it registered for this module."""
HF_CONFIGS = ("llama3-tied", "qwen2")
"""Reference configurations (tests/support/reference_models.py) served from HF directories."""


@pytest.fixture(scope="module")
def model_name(service, tmp_path_factory: pytest.TempPathFactory):
    """variant → a catalog name served by the shared engine (registered once)."""
    catalog, root, names = service.transport.catalog, tmp_path_factory.mktemp("export-hf"), {}

    def get(variant: str) -> str:
        if variant not in names:
            if variant == "tiny":
                names[variant] = MODEL
            elif variant in BUILTIN_VARIANTS:
                names[variant] = f"bios/export-{variant}-{uuid.uuid4().hex[:6]}"
                catalog.register(
                    dataclasses.replace(TINY, name=names[variant], weights_seed=7, **BUILTIN_VARIANTS[variant])
                )
            else:
                directory, _ = build_reference_model(variant, root / variant)
                names[variant] = f"hf/export-{variant}-{uuid.uuid4().hex[:6]}"
                catalog.register_hf_directory(names[variant], directory)
        return names[variant]

    return get


def vocab_of(service, name: str) -> int:
    return service.transport.catalog.get(name).vocab_size


def train(service, name: str, steps: int = 3):
    """A session on `name` with LoRA on every projection and lm_head, alpha != rank, `steps` trained."""
    client = service.create_lora_training_client(base_model=name, rank=4, alpha=12.0, target_modules=ALL, seed=3)
    batch = random_batch(seed=1, vocab=vocab_of(service, name))
    for _ in range(steps):
        client.train(batch, learning_rate=1e-2)
    return client


def tokens_for(service, name: str) -> list[int]:
    return np.random.default_rng(11).integers(4, vocab_of(service, name), LENGTH).tolist()


def bios_logprobs(client, tokens: list[int]) -> np.ndarray:
    """log p(tokens[t] | tokens[:t]), t = 1..T-1, from the session's `forward`: [T-1]."""
    result = client.forward([make_datum(tokens)], "cross_entropy").result()
    return np.asarray(result.loss_fn_outputs[0]["logprobs"].data, dtype=np.float64)


def hf_logprobs(model: torch.nn.Module, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens]), use_cache=False).logits[0].double()
    return logits.log_softmax(-1)[torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])].numpy()


def load(directory: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()


def catalog_of(service) -> Catalog:
    return service.transport.catalog


@pytest.mark.parametrize("variant", [*BUILTIN_VARIANTS, *HF_CONFIGS])
def test_merged_export_computes_what_bios_does(variant: str, service, model_name, tmp_path: Path) -> None:
    name = model_name(variant)
    spec = catalog_of(service).get(name)
    client = train(service, name)
    path = client.save_state("merged").result().path
    out = export_merged(path, tmp_path / "merged", catalog=catalog_of(service))
    assert out == tmp_path / "merged" and {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False  # lm_head is adapted: a tied base model must untie
    tensors = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" in tensors and all(t.dtype == torch.float32 for t in tensors.values())
    if spec.tie_embeddings:
        assert not torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])

    model = load(out)
    assert (
        type(model).__name__
        == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[spec.architecture]
    )
    tokens = tokens_for(service, name)
    theirs, ours = hf_logprobs(model, tokens), bios_logprobs(client, tokens)
    np.testing.assert_allclose(theirs, ours, atol=ATOL, rtol=0)

    sampler = client.save_weights_and_get_sampling_client(f"greedy-{variant}")
    prompt = tokens[:5]
    greedy = sampler.sample(
        types.ModelInput.from_ints(prompt), types.SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
    ).result()
    generation = GenerationConfig(
        do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0
    )
    with torch.no_grad():
        generated = model.generate(torch.tensor([prompt]), generation_config=generation)[0, len(prompt) :].tolist()
    assert generated == greedy.sequences[0].tokens


@pytest.mark.parametrize("variant", ["tiny", "tiny-qwen3-tied", "llama3-tied"])
def test_peft_export_on_the_untrained_merged_base_computes_what_bios_does(
    variant: str, service, model_name, tmp_path: Path
) -> None:
    name = model_name(variant)
    untrained = train(service, name, steps=0).save_state("untrained").result().path  # B = 0: the bare base model
    export_merged(untrained, tmp_path / "base", catalog=catalog_of(service))
    client = train(service, name)
    path = client.save_state("peft").result().path
    out = export_peft(path, tmp_path / "peft", catalog=catalog_of(service))
    assert {p.name for p in out.iterdir()} == {CONFIG_FILE, WEIGHTS_FILE}

    model = peft.PeftModel.from_pretrained(load(tmp_path / "base"), out).eval()
    tokens = tokens_for(service, name)
    theirs = hf_logprobs(model, tokens)
    np.testing.assert_allclose(theirs, bios_logprobs(client, tokens), atol=ATOL, rtol=0)
    with model.disable_adapter():
        assert np.abs(hf_logprobs(model, tokens) - theirs).max() > 1e-2, "the adapter changes nothing"


def test_a_sampler_checkpoint_exports_both_forms_from_the_command_line(service, tmp_path: Path, bios_home: str) -> None:
    client = train(service, MODEL, steps=2)
    path = client.save_weights_for_sampler("cli-export").result().path
    assert bios_cli(["export", path, "--peft", str(tmp_path / "peft")]) == 0
    assert bios_cli(["checkpoints", "export", path, str(tmp_path / "legacy")]) == 0
    for file in (CONFIG_FILE, WEIGHTS_FILE):
        assert (tmp_path / "peft" / file).read_bytes() == (tmp_path / "legacy" / file).read_bytes()
    assert bios_cli(["export", path, "--merged", str(tmp_path / "merged"), "--dtype", "bfloat16"]) == 0
    export_merged(path, tmp_path / "merged32", home=Path(bios_home))
    low, full = (
        load_file(str(tmp_path / "merged" / "model.safetensors")),
        load_file(str(tmp_path / "merged32" / "model.safetensors")),
    )
    assert (
        low.keys() == full.keys()
        and json.loads((tmp_path / "merged" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    )
    for key, value in full.items():  # rounded to nearest even, exactly as torch rounds
        assert low[key].dtype == torch.bfloat16 and torch.equal(low[key], value.to(torch.bfloat16)), key
    tokens = tokens_for(service, MODEL)
    np.testing.assert_allclose(
        hf_logprobs(load(tmp_path / "merged32"), tokens), bios_logprobs(client, tokens), atol=ATOL, rtol=0
    )


def test_bad_input_raises_a_typed_error_and_writes_nothing(service, tmp_path: Path, capsys) -> None:
    path = train(service, MODEL, steps=1).save_state("bad-input").result().path
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    cases = [
        (lambda out: export_merged("bios://nobody/weights/nothing", out), NotFoundError, "path"),
        (lambda out: export_peft("bios://nobody/sampler_weights/nothing", out), NotFoundError, "path"),
        (lambda out: export_peft("/not/a/checkpoint", out), InvalidRequestError, "path"),
        (lambda out: export_merged(path, out, dtype="float16"), InvalidRequestError, "dtype"),
        (lambda out: export_merged(path, out, catalog=Catalog({})), NotFoundError, "base_model"),
        (lambda out: export_peft(path, out, catalog=Catalog({})), NotFoundError, "base_model"),
        (lambda out: export_merged(path, occupied), InvalidRequestError, "out"),
        (lambda out: export_peft(path, occupied), InvalidRequestError, "out"),
    ]
    for call, error, field in cases:
        with pytest.raises(error) as info:
            call(tmp_path / "new" / "out")
        assert info.value.field == field, info.value
    assert sorted(p.name for p in tmp_path.iterdir()) == ["occupied"]  # no out, no parent, no staging
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"] and (occupied / "keep.txt").read_text() == "mine"

    assert bios_cli(["export", path, "--merged", str(occupied)]) == 2
    assert "out" in capsys.readouterr().err and [p.name for p in occupied.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export_peft(path, empty) == empty and {p.name for p in empty.iterdir()} == {CONFIG_FILE, WEIGHTS_FILE}


def test_an_installed_model_is_found_without_a_catalog(service, model_name, bios_home: str, tmp_path: Path) -> None:
    """The default catalog is the service's: built-in models and those under BIOS_HOME/models
    (`bios models fetch`), so a checkpoint of a fetched model exports with no catalog given."""
    name = model_name("qwen2")
    client = train(service, name, steps=2)
    path = client.save_state("installed").result().path
    home = tmp_path / "home"
    session, kind, checkpoint = path.removeprefix("bios://").split("/")
    shutil.copytree(
        Path(bios_home) / "checkpoints" / session / kind / checkpoint,
        home / "checkpoints" / session / kind / checkpoint,
    )
    with pytest.raises(NotFoundError) as info:  # not installed (yet)
        export_merged(path, tmp_path / "nowhere", home=home)
    assert info.value.field == "base_model" and not (tmp_path / "nowhere").exists()
    shutil.copytree(catalog_of(service).get(name).hf_path, home / "models" / "fetched")
    (home / "models" / "fetched" / "bios-model.json").write_text(json.dumps({"name": name}))
    out = export_merged(path, tmp_path / "merged", home=home)
    tokens = tokens_for(service, name)
    np.testing.assert_allclose(hf_logprobs(load(out), tokens), bios_logprobs(client, tokens), atol=ATOL, rtol=0)
