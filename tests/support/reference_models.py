"""Small random Hugging Face `transformers` models (PyTorch, CPU) to check Bios's decoders against.

Each reference configuration is a tiny Llama / Qwen2 / Qwen3 decoder built by `transformers`
itself from a fixed seed, with every tensor random: HF initialises linears and embeddings from
N(0, initializer_range²) but RMSNorm scales to 1 and biases to 0, so those are redrawn here
(scales ~ 1 + N(0, 0.2²), biases ~ N(0, 0.2²)) — otherwise a mixed-up norm weight or a
dropped bias would go unnoticed. `build_reference_model` writes the model the way a user's
model directory looks (`config.json` + `model.safetensors` + Bios's built-in tokenizer files)
and returns it in float32 eval mode; `reference_logits` runs it.

The configurations cover what `docs/losses.md` §Model names: RoPE with a non-default theta,
Llama-3 rope scaling with frequencies in all three bands, grouped-query attention (H=4, K=2,
so `h // 2` and `h % 2` differ), Qwen2's qkv bias, Qwen3's q/k norm with a head_dim that is
not d_model / H, distinct RMSNorm eps, tied and untied embeddings.
"""

from __future__ import annotations

import copy
import shutil
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

TOKENIZER_DIR = Path(str(files("bios") / "data" / "tokenizer"))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

_SHAPE = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=96,
    max_position_embeddings=64,
    initializer_range=0.2,
    hidden_act="silu",
)

LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # With head_dim 16 and theta 1e4 the wavelengths 2π/inv_freq are 6.3, 19.9, 62.8, ...:
    # with an original context of 32 the first is below 32/4 = 8 (kept), the second between
    # 8 and 32 (smoothly interpolated) and the rest above 32 (divided by `factor`), so every
    # branch of the Llama-3 formula is exercised. (16 would leave the "kept" band empty.)
    "original_max_position_embeddings": 32,
}

REFERENCE_CONFIGS: dict[str, dict] = {
    "llama": dict(model_type="llama", head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "llama3-tied": dict(
        model_type="llama",
        head_dim=16,
        rope_theta=10000.0,
        rope_scaling=LLAMA3_ROPE_SCALING,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
    "qwen2": dict(model_type="qwen2", rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=False),
    "qwen3-tied": dict(
        model_type="qwen3",
        head_dim=32,  # != hidden_size / heads = 16: q_proj is [128, 64], o_proj [64, 128]
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    ),
}
"""Name → `transformers` config kwargs (beyond the shared small shape). The kwargs are in the
transformers 4.x form (`rope_theta`/`rope_scaling`), which 5.x still accepts (checked on 5.23)."""


def hf_config(name: str):
    """The `transformers` config of reference configuration `name`."""
    kwargs = copy.deepcopy(REFERENCE_CONFIGS[name])  # transformers 5 edits rope_scaling in place
    model_type = kwargs.pop("model_type")
    return AutoConfig.for_model(model_type, **_SHAPE, **kwargs)


def _randomise_norms_and_biases(model: PreTrainedModel, seed: int) -> None:
    """Redraw what HF initialises to constants: RMSNorm scales and linear biases."""
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))
            elif name.endswith(".bias"):
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))


def build_reference_model(name: str, directory: str | Path, seed: int = 0) -> tuple[Path, PreTrainedModel]:
    """Build reference configuration `name` from `seed`, save it to `directory` as a HF model
    directory (config.json, safetensors, Bios's built-in tokenizer files) and return
    (directory, the model in float32 eval mode)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(name), attn_implementation="eager")
    model = model.to(torch.float32).eval()
    _randomise_norms_and_biases(model, seed)
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(directory)  # safetensors is the default (transformers >= 4.35)
    for file in TOKENIZER_FILES:
        shutil.copyfile(TOKENIZER_DIR / file, directory / file)
    return directory, model


def reference_logits(model: PreTrainedModel, tokens: np.ndarray) -> np.ndarray:
    """The HF model's logits for tokens [T] → [T, V] float64 (or [B, T] → [B, T, V]), positions 0..T-1."""
    tokens = np.asarray(tokens, dtype=np.int64)
    batch = torch.from_numpy(np.atleast_2d(tokens))
    with torch.no_grad():
        logits = model(input_ids=batch, use_cache=False).logits
    out = logits.to(torch.float64).numpy()
    return out[0] if tokens.ndim == 1 else out


def random_tokens(vocab_size: int, n_sequences: int, length: int, seed: int = 0) -> np.ndarray:
    """[n_sequences, length] token ids drawn uniformly below `vocab_size`."""
    return np.random.default_rng(seed).integers(0, vocab_size, size=(n_sequences, length))
