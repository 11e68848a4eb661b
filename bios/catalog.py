"""The model catalog: which base models exist and their architecture facts.

Built-in models have weights generated on the host from a seed (`bios.weights`), so every
backend gets bit-identical weights. An entry may instead point at a local Hugging Face model
directory (`config.json` + safetensors + `tokenizer.json`).
Contract layer: imports only the standard library, numpy-free modules of `bios` and `bios.tokenizer`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from bios.errors import InvalidRequestError, NotFoundError
from bios.tokenizer import Tokenizer

Architecture = str  # "llama" | "qwen2" | "qwen3"
INSTALLED_MARKER = "bios-model.json"
"""The file that marks a subdirectory of `BIOS_HOME/models` as an installed model (`Catalog.register_installed`)."""
ARCHITECTURES = ("llama", "qwen2", "qwen3")


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A decoder-only transformer: Llama layout, with Qwen2's qkv bias or Qwen3's q/k norm.

    Widths: D = d_model, H = n_heads, K = n_kv_heads, E = head_dim, F = d_ff, V = vocab_size.
    Exactly one of `weights_seed` (built-in, generated) and `hf_path` (local HF dir) is set.
    """

    name: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    architecture: Architecture = "llama"
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, float], ...] | None = None
    """Llama-3 style scaling as sorted (key, value) pairs: factor, low_freq_factor,
    high_freq_factor, original_max_position_embeddings."""
    rms_eps: float = 1e-5
    tie_embeddings: bool = False
    weights_seed: int | None = None
    hf_path: str | None = None
    max_lora_rank: int = 64
    description: str = ""

    @property
    def qkv_bias(self) -> bool:
        return self.architecture == "qwen2"

    @property
    def qk_norm(self) -> bool:
        return self.architecture == "qwen3"

    @property
    def random_init(self) -> bool:
        return self.hf_path is None

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of every adaptable linear layer, by Hugging Face module name."""
        d, q, kv, f = self.d_model, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.d_ff
        return {
            "q_proj": (d, q),
            "k_proj": (d, kv),
            "v_proj": (d, kv),
            "o_proj": (q, d),
            "gate_proj": (d, f),
            "up_proj": (d, f),
            "down_proj": (f, d),
            "lm_head": (d, self.vocab_size),
        }

    @property
    def n_params(self) -> int:
        shapes = self.linear_shapes()
        per_layer = sum(i * o for m, (i, o) in shapes.items() if m != "lm_head") + 2 * self.d_model
        per_layer += (self.n_heads + 2 * self.n_kv_heads) * self.head_dim if self.qkv_bias else 0
        per_layer += 2 * self.head_dim if self.qk_norm else 0
        embed = self.vocab_size * self.d_model
        return self.n_layers * per_layer + embed * (1 if self.tie_embeddings else 2) + self.d_model

    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer: its directory's for HF models, the built-in one otherwise."""
        return Tokenizer.from_directory(self.hf_path) if self.hf_path else Tokenizer.builtin()


def _stand_in(name: str, seed: int, description: str, **arch: object) -> ModelSpec:
    shape: dict[str, object] = dict(
        vocab_size=4096, d_model=128, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=16, d_ff=384
    )
    shape.update(arch)
    label = "random-initialised stand-in architecture; point the catalog at real weights to serve them"
    return ModelSpec(name=name, weights_seed=seed, description=f"{description} ({label})", **shape)  # type: ignore[arg-type]


BUILTIN_MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="bios/tiny",
            vocab_size=4096,
            d_model=64,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            head_dim=16,
            d_ff=128,
            max_seq_len=256,
            weights_seed=1,
            max_lora_rank=32,
            description="Tiny Llama-style model for tests and demos (random-initialised)",
        ),
        _stand_in("ultrasafe/usf-healthcare", 11, "UltraSafe healthcare expert"),
        _stand_in("ultrasafe/usf-finance", 12, "UltraSafe finance expert"),
        _stand_in("ultrasafe/usf-code", 13, "UltraSafe code expert", architecture="qwen2"),
        _stand_in("ultrasafe/usf-conversation", 14, "UltraSafe conversation expert", architecture="qwen3"),
        _stand_in("ultrasafe/usf-general", 15, "UltraSafe general expert", tie_embeddings=True),
    )
}


def spec_from_hf_directory(name: str, path: str | os.PathLike) -> ModelSpec:
    """A ModelSpec read from a Hugging Face model directory's `config.json`.

    Accepts both `rope_theta`/`rope_scaling` (transformers < 5) and `rope_parameters` (>= 5).
    Raises InvalidRequestError naming the key when the config is not a supported decoder.
    """
    directory = Path(path)
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise InvalidRequestError(f"model {name}: cannot read {directory}/config.json ({exc})", field="path") from None
    model_type = config.get("model_type", "llama")
    arch = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}.get(model_type)
    if arch is None:
        raise InvalidRequestError(
            f"model {name}: model_type {model_type!r} is not supported (llama, qwen2, qwen3)", field="model_type"
        )
    unsupported = {
        "attention_bias": config.get("attention_bias", False) and arch != "qwen2",
        "mlp_bias": config.get("mlp_bias", False),
        "sliding_window": config.get("use_sliding_window", False),
        "hidden_act": config.get("hidden_act", "silu") != "silu",
    }
    for key, present in unsupported.items():
        if present:
            raise InvalidRequestError(
                f"model {name}: {key}={config.get(key)!r} is not supported by Bios's decoder", field=key
            )
    rope = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or (rope if rope.get("rope_type") == "llama3" else None)
    if scaling and scaling.get("rope_type", scaling.get("type")) not in ("llama3", "default", None):
        raise InvalidRequestError(f"model {name}: rope_scaling {scaling} is not supported", field="rope_scaling")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    if scaling and "original_max_position_embeddings" not in scaling:
        scaling = {**scaling, "original_max_position_embeddings": config.get("max_position_embeddings", 2048)}
    heads = config["num_attention_heads"]
    return ModelSpec(
        name=name,
        architecture=arch,
        vocab_size=config["vocab_size"],
        d_model=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=config.get("num_key_value_heads", heads),
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        d_ff=config["intermediate_size"],
        max_seq_len=config.get("max_position_embeddings", 2048),
        rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        rope_scaling=tuple(sorted((k, float(scaling[k])) for k in keys))
        if scaling and "factor" in scaling and scaling.get("rope_type", scaling.get("type")) == "llama3"
        else None,
        rms_eps=float(config.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        hf_path=str(directory),
        description=f"Hugging Face model from {directory}",
    )


class Catalog:
    """The models one deployment serves, by name. Mutable only through `register`."""

    def __init__(self, models: dict[str, ModelSpec] | None = None) -> None:
        self._models = dict(BUILTIN_MODELS if models is None else models)

    def get(self, name: str) -> ModelSpec:
        """The spec of `name`; NotFoundError (field `base_model`) listing what exists."""
        try:
            return self._models[name]
        except (KeyError, TypeError):
            raise NotFoundError(
                f"base_model: unknown model {name!r}; available: {', '.join(sorted(self._models))}",
                field="base_model",
            ) from None

    def names(self) -> list[str]:
        return sorted(self._models)

    def register(self, spec: ModelSpec) -> None:
        """Add or replace one model."""
        self._models[spec.name] = spec

    def register_hf_directory(self, name: str, path: str | os.PathLike) -> ModelSpec:
        """Read `path/config.json` and serve it as `name`."""
        spec = spec_from_hf_directory(name, path)
        self.register(spec)
        return spec

    def register_installed(self, directory: str | os.PathLike) -> list[str]:
        """Serve every model installed under `directory` (e.g. by `bios models fetch`); their names, sorted.

        An installed model is a subdirectory holding a Hugging Face model and a `bios-model.json`
        marker `{"name": ...}`, written last, so a half-written install is never registered. A
        missing `directory` registers nothing; a marker or config that cannot be read is skipped
        with a warning rather than failing the whole catalog.
        """
        root = Path(directory)
        if not root.is_dir():
            return []
        names = []
        for marker in sorted(root.glob(f"*/{INSTALLED_MARKER}")):
            try:
                name = json.loads(marker.read_text(encoding="utf-8"))["name"]
                if not isinstance(name, str):
                    raise ValueError(f"name must be a string, got {name!r}")
                self.register_hf_directory(name, marker.parent)
            except (OSError, ValueError, KeyError, InvalidRequestError) as exc:
                logging.getLogger(__name__).warning("skipping installed model %s: %s", marker.parent, exc)
                continue
            names.append(name)
        return sorted(names)
