"""Hardware and model profiles for the simulator's cost model: what a device can do, how much of
it a well-tuned stack achieves, and the architecture of models whose cost is projected.

Every figure is a `Figure`: a number with the source it was taken from, so that a report can say
where a projected time comes from. Peak FLOP/s and HBM bandwidth come from
`bios.accounting.PEAKS` (one source of truth with `bench/`); the efficiencies are measured or
derived figures cited in docs/simulator.md ("Hardware and model profiles").

Imports only the contract layer (`bios.accounting`, `bios.catalog`, `bios.errors`,
`bios.simulation`): no jax, no engine.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from bios.accounting import PEAKS
from bios.catalog import Catalog, ModelSpec, spec_from_hf_directory
from bios.errors import InvalidRequestError
from bios.simulation import SimulationConfig


@dataclass(frozen=True, slots=True)
class Figure:
    """A number and where it comes from (a citation, or "assumption: <reason>")."""

    value: float
    source: str


@dataclass(frozen=True, slots=True)
class Hardware:
    """One accelerator. peak_flops: dense bf16 FLOP/s; hbm_bytes_per_s and memory_bytes: device
    memory bandwidth (bytes/s) and size (bytes); link_bytes_per_s: its GPU-to-GPU link (bytes/s,
    both directions), kept for the record — the cost model does not model communication."""

    name: str
    peak_flops: Figure
    hbm_bytes_per_s: Figure
    memory_bytes: Figure
    link_bytes_per_s: Figure


@dataclass(frozen=True, slots=True)
class Efficiency:
    """Achieved fractions of a device's peaks, each in (0, 1]: train_mfu of peak FLOP/s in a LoRA
    forward_backward; prefill_mfu of peak FLOP/s in a prompt's prefill (and a decode step's
    compute); decode_mbu of HBM bandwidth in a decode step; optimizer_mbu of HBM bandwidth in
    the Adam update."""

    train_mfu: Figure
    prefill_mfu: Figure
    decode_mbu: Figure
    optimizer_mbu: Figure


def _peaks(name: str, datasheet: str) -> tuple[Figure, Figure]:
    flops, bandwidth = PEAKS[name]
    return (
        Figure(flops, f"bios.accounting.PEAKS: {datasheet}, dense BF16 tensor core (half the sparse figure)"),
        Figure(bandwidth, f"bios.accounting.PEAKS: {datasheet}, memory bandwidth"),
    )


def _hardware(name: str, datasheet: str, memory: float, link: float, link_source: str) -> Hardware:
    flops, bandwidth = _peaks(name, datasheet)
    return Hardware(name, flops, bandwidth, Figure(memory, f"{datasheet}, memory size"), Figure(link, link_source))


HARDWARE: dict[str, Hardware] = {
    hw.name: hw
    for hw in (
        _hardware(
            "H100",
            "NVIDIA H100 SXM5 datasheet",
            80e9,
            900e9,
            "NVIDIA H100 datasheet: NVLink 4, 900 GB/s both directions",
        ),
        _hardware(
            "H200",
            "NVIDIA H200 SXM datasheet",
            141e9,
            900e9,
            "MLCommons inference v4.1 H200-SXM-141GBx8 system: 18x NVLink 4, 900 GB/s",
        ),
        _hardware(
            "A100",
            "NVIDIA A100 80GB SXM4 datasheet",
            80e9,
            600e9,
            "NVIDIA A100 datasheet: NVLink 3, 600 GB/s both directions",
        ),
        _hardware(
            "L40S",
            "NVIDIA L40S datasheet",
            48e9,
            64e9,
            "NVIDIA L40S datasheet: no NVLink; PCIe Gen4 x16, 64 GB/s both directions",
        ),
    )
}
"""The known accelerators by name; `hardware(name)` looks them up case-insensitively."""

_DGXC_LORA = "NVIDIA dgxc-benchmarking ft_llama3 README_8b: Llama3 8B LoRA BF16, 8xH100, seq 4096, GBS 32: 53.9% MFU"
_DECODE = (
    "rounded between gpt-fast README (Llama-2-7B BF16 bs1, A100: 1,397 GB/s = 68.5%) and NVIDIA NIM 1.8.0 "
    "Llama-3.3-70B FP8 TP2 on H100 (ITL 18.58 ms => ~56% derived)"
)
_ADAM = (
    "assumption: a fused elementwise Adam streams near the achievable HBM ceiling; gpt-fast README measured "
    "~1,700 GB/s of 2,039 (83%) on A100"
)

DEFAULT_EFFICIENCY: dict[str, Efficiency] = {
    "H100": Efficiency(
        train_mfu=Figure(0.539, _DGXC_LORA),
        prefill_mfu=Figure(
            0.50,
            "derived from TensorRT-LLM v0.5 performance.md (LLaMA-7B, 2048-token first-token latency): "
            "39% of the FP8 peak on H100, 67% of the FP16 peak on A100; 0.5 of the BF16 peak assumed in between",
        ),
        decode_mbu=Figure(0.60, _DECODE),
        optimizer_mbu=Figure(0.80, _ADAM),
    ),
    "H200": Efficiency(
        train_mfu=Figure(0.539, f"assumption: same GH100 compute as H100, so its figure: {_DGXC_LORA}"),
        prefill_mfu=Figure(0.50, "assumption: same GH100 compute as H100, so its prefill figure"),
        decode_mbu=Figure(0.60, _DECODE),
        optimizer_mbu=Figure(0.80, _ADAM),
    ),
    "A100": Efficiency(
        train_mfu=Figure(
            0.582,
            "assumption carried over from full training (no LoRA figure published for A100): "
            "torchtitan docs/performance.md, Llama 3 8B, 64xA100-80GB FSDP2: 58.2% MFU",
        ),
        prefill_mfu=Figure(
            0.60,
            "derived from TensorRT-LLM v0.5 performance.md first-token latency on A100 FP16: "
            "LLaMA-7B 2048 tokens 67%, LLaMA-70B TP4 61%; rounded down",
        ),
        decode_mbu=Figure(0.685, "gpt-fast README: Llama-2-7B BF16 bs1 on A100-80GB, 1,397 GB/s of 2,039 = 68.5%"),
        optimizer_mbu=Figure(0.80, _ADAM),
    ),
    "L40S": Efficiency(
        train_mfu=Figure(
            0.40,
            "assumption: no LoRA or full-training figure published for L40S; set below the H100's 0.539 "
            "because its PCIe-only link and GDDR6 feed the tensor cores less well",
        ),
        prefill_mfu=Figure(
            0.50,
            "derived from TensorRT-LLM v0.5 performance.md: LLaMA-7B 2048-token prefill on L40S "
            "reaches ~52% of the FP8 peak; the same fraction assumed for BF16, rounded down",
        ),
        decode_mbu=Figure(0.60, f"assumption: as H100, {_DECODE}"),
        optimizer_mbu=Figure(0.80, _ADAM),
    ),
}
"""Default efficiencies per hardware name; `efficiency(config, hw)` applies a profile's overrides."""


def hardware(name: str) -> Hardware:
    """The profile of accelerator `name` (case-insensitive: "h100" is "H100").

    Raises InvalidRequestError(field="hardware") naming the known accelerators.
    """
    for key, hw in HARDWARE.items():
        if key.lower() == name.strip().lower():
            return hw
    raise InvalidRequestError(
        f"hardware: unknown accelerator {name!r}; known: {', '.join(sorted(HARDWARE))}", field="hardware"
    )


def efficiency(config: SimulationConfig, hw: Hardware) -> Efficiency:
    """`hw`'s default efficiencies, with the profile's `mfu_train`, `mfu_prefill` and `mbu_decode`
    replacing them where set (their source then reads "set in the simulation profile")."""
    base = DEFAULT_EFFICIENCY[hw.name]
    overrides = {"train_mfu": config.mfu_train, "prefill_mfu": config.mfu_prefill, "decode_mbu": config.mbu_decode}
    return replace(
        base, **{k: Figure(v, "set in the simulation profile") for k, v in overrides.items() if v is not None}
    )


def _known(name: str, **arch: object) -> ModelSpec:
    description = "architecture only, for cost projection (from the model's public config.json; no weights)"
    return ModelSpec(name=name, weights_seed=0, description=description, **arch)  # type: ignore[arg-type]


def _llama3_rope(factor: float) -> tuple[tuple[str, float], ...]:
    """Llama 3's rope_scaling as ModelSpec stores it (sorted pairs), from the models' config.json."""
    return (
        ("factor", factor),
        ("high_freq_factor", 4.0),
        ("low_freq_factor", 1.0),
        ("original_max_position_embeddings", 8192.0),
    )


_LLAMA31_ROPE, _LLAMA32_ROPE = _llama3_rope(8.0), _llama3_rope(32.0)
_LLAMA3 = dict(vocab_size=128256, n_kv_heads=8, rope_theta=500000.0, rms_eps=1e-5, max_seq_len=131072)

KNOWN_MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        _known(
            "meta-llama/Llama-3.1-8B",
            d_model=4096,
            n_layers=32,
            n_heads=32,
            head_dim=128,
            d_ff=14336,
            rope_scaling=_LLAMA31_ROPE,
            **_LLAMA3,
        ),
        _known(
            "meta-llama/Llama-3.1-70B",
            d_model=8192,
            n_layers=80,
            n_heads=64,
            head_dim=128,
            d_ff=28672,
            rope_scaling=_LLAMA31_ROPE,
            **_LLAMA3,
        ),
        _known(
            "meta-llama/Llama-3.2-1B",
            d_model=2048,
            n_layers=16,
            n_heads=32,
            head_dim=64,
            d_ff=8192,
            rope_scaling=_LLAMA32_ROPE,
            tie_embeddings=True,
            **_LLAMA3,
        ),
        _known(
            "meta-llama/Llama-3.2-3B",
            d_model=3072,
            n_layers=28,
            n_heads=24,
            head_dim=128,
            d_ff=8192,
            rope_scaling=_LLAMA32_ROPE,
            tie_embeddings=True,
            **_LLAMA3,
        ),
        _known(
            "Qwen/Qwen3-8B",
            architecture="qwen3",
            vocab_size=151936,
            d_model=4096,
            n_layers=36,
            n_heads=32,
            n_kv_heads=8,
            head_dim=128,
            d_ff=12288,
            max_seq_len=40960,
            rope_theta=1000000.0,
            rms_eps=1e-6,
        ),
        _known(
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            vocab_size=49152,
            d_model=576,
            n_layers=30,
            n_heads=9,
            n_kv_heads=3,
            head_dim=64,
            d_ff=1536,
            max_seq_len=8192,
            rope_theta=100000.0,
            rms_eps=1e-5,
            tie_embeddings=True,
        ),
    )
}
"""Architectures of well-known models, for projecting their cost while a small model computes."""


def _known_model(ref: str) -> ModelSpec | None:
    wanted = ref.strip().lower()
    for name, spec in KNOWN_MODELS.items():
        if wanted in (name.lower(), name.rsplit("/", 1)[-1].lower()):
            return spec
    return None


def _config_directory(ref: str) -> Path | None:
    path = Path(ref).expanduser()
    if path.is_file() and path.name == "config.json":
        return path.parent
    if path.is_dir() and (path / "config.json").is_file():
        return path
    return None


def projection_model(ref: str | None, catalog: Catalog, fallback: ModelSpec) -> ModelSpec:
    """The model whose cost the simulator projects, from a profile's `model` entry.

    None gives `fallback` (the model the request names); otherwise, in this order: a name in
    `catalog`; a KNOWN_MODELS name, case-insensitive, with or without its organisation prefix
    ("Llama-3.1-8B"); the path of a Hugging Face `config.json` or of a directory holding one
    (named after the directory). Raises InvalidRequestError(field="model") listing the known
    names when `ref` is none of these; a config.json that Bios cannot read raises
    spec_from_hf_directory's InvalidRequestError, which names the offending key.
    """
    if ref is None:
        return fallback
    if ref in catalog.names():
        return catalog.get(ref)
    known = _known_model(ref)
    if known is not None:
        return known
    directory = _config_directory(ref)
    if directory is not None:
        return spec_from_hf_directory(directory.resolve().name, directory)
    raise InvalidRequestError(
        f"model: {ref!r} is not a catalog model, a known model or a path to a config.json (or its directory); "
        f"known models: {', '.join(KNOWN_MODELS)}; catalog: {', '.join(catalog.names())}",
        field="model",
    )
