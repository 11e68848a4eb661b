"""The GPU suite's profiles: sizes, step counts and time budgets of a run (imports no JAX)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Profile:
    """Sizes, step counts and time budgets of one suite run."""

    name: str
    train_models: tuple[str, ...]
    """Presets trained, in order; the first also gets the warm-compile section."""
    decode_model: str
    dtype: str
    """Base weights' dtype (backend option)."""
    rows: int
    """Rows per training step, split evenly among the adapters of a case."""
    length: int
    """Tokens per row."""
    rank: int
    adapters: tuple[int, ...]
    """Adapters (sessions) training side by side, one case each."""
    steps: int
    """Timed training steps per case (after one untimed)."""
    decode_rows: tuple[int, ...]
    prompt_length: int
    max_tokens: int
    attention: tuple[int, int, int, int, int]
    """(B, T, H, K, E) of the attention check."""
    lora: tuple[int, int, int, int, int]
    """(N, D, F, R, S) of the ragged_dot check."""
    lora_dtypes: tuple[str, ...]
    matmul: int
    """Side of the ceiling's square matmul."""
    copy_elements: int
    """float32 values of the ceiling's elementwise pass."""
    loop: int
    """Kernel calls per timed loop."""
    time_limit_s: float
    """The whole suite's wall-clock limit."""
    budgets: dict[str, float] = field(default_factory=dict)
    """Seconds each section may take, by section kind (`kernels`, `train`, ...) or full name."""

    def sections(self) -> list[str]:
        """Every section of the run, in order."""
        first, *rest = self.train_models
        return ["kernels", f"train/{first}", f"compile/{first}", *(f"train/{m}" for m in rest)] + [
            f"decode/{self.decode_model}"
        ]

    def budget(self, section: str) -> float:
        """Seconds `section` may take."""
        return self.budgets.get(section, self.budgets[section.split("/")[0]])

    @property
    def slots(self) -> int:
        """Adapter slots to allocate up front: every case's adapters plus the bare model's,
        as a power of two, so that no case grows the slot table (a new shape)."""
        return 1 << max(self.adapters).bit_length()


PROFILES = {
    "gpu": Profile(
        name="gpu",
        train_models=("llama-1b", "llama-8b"),
        decode_model="llama-8b",
        dtype="bfloat16",
        rows=8,
        length=2048,
        rank=32,
        adapters=(1, 8),
        steps=4,
        decode_rows=(1, 64, 256),
        prompt_length=384,
        max_tokens=128,
        attention=(8, 2048, 32, 8, 128),
        lora=(8 * 2048, 4096, 14336, 32, 16),
        lora_dtypes=("float32", "bfloat16"),
        matmul=8192,
        copy_elements=1 << 28,
        loop=20,
        time_limit_s=470.0,
        budgets={"kernels": 80.0, "train": 100.0, "train/llama-8b": 120.0, "compile": 45.0, "decode": 110.0},
    ),
    "cpu-tiny": Profile(
        name="cpu-tiny",
        train_models=("tiny-a", "tiny-b"),
        decode_model="tiny-b",
        dtype="float32",
        rows=8,
        length=32,
        rank=8,
        adapters=(1, 8),
        steps=2,
        decode_rows=(1, 4, 16),
        prompt_length=24,
        max_tokens=8,
        attention=(2, 64, 4, 2, 16),
        lora=(256, 64, 128, 8, 16),
        lora_dtypes=("float32",),
        matmul=256,
        copy_elements=1 << 20,
        loop=3,
        time_limit_s=600.0,
        budgets={"kernels": 120.0, "train": 150.0, "compile": 90.0, "decode": 150.0},
    ),
}
