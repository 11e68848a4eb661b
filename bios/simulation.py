"""What the service simulator is asked to simulate: `SimulationConfig`, and what it reports.

The simulator (`emulator.simulator`) wraps a backend without touching its arithmetic and
simulates time, capacity and faults. A configuration comes from `SimulationConfig(...)`, a
TOML profile (`SimulationConfig.from_toml`), or the `BIOS_SIMULATION` variable naming one.
The formulas behind every figure are in docs/simulator.md.

`simulate` finds the simulator (entry point `default` of the `bios.simulator` group) and puts
a backend under it.

Contract layer: imports pydantic, the standard library and the other contract modules only.
"""

from __future__ import annotations

import os
import tomllib
from importlib.metadata import entry_points
from pathlib import Path
from typing import Literal, Protocol

from pydantic import Field, field_validator, model_validator

from bios.accounting import PEAKS
from bios.admission import RequestHook
from bios.backend import Backend
from bios.catalog import Catalog
from bios.errors import InvalidRequestError
from bios.types._base import RequestModel, ResultModel, field_error

FaultKind = Literal["transient", "timeout", "straggler", "rate_limit", "session_expiry", "restart"]
RequestKind = Literal["forward_backward", "optim_step", "sample", "any"]
FAILURE_KINDS = ("transient", "timeout", "rate_limit", "session_expiry")
"""Fault kinds drawn per request attempt, in this order, from one uniform draw (their rates add up)."""


class ScheduledFault(RequestModel):
    """A fault at a chosen request: `kind` hits the `nth` (1-based) first attempt of `request`
    requests, counted across the whole service ("fail the 3rd optim_step")."""

    kind: FaultKind
    request: RequestKind = "any"
    nth: int = Field(ge=1)


class FaultRates(RequestModel):
    """Probability that one request attempt is hit by each fault kind. The failure kinds
    (transient, timeout, rate_limit, session_expiry) are exclusive and must add up to at most 1;
    a straggler is only slow and is drawn independently."""

    transient: float = Field(0.0, ge=0.0, le=1.0)
    timeout: float = Field(0.0, ge=0.0, le=1.0)
    rate_limit: float = Field(0.0, ge=0.0, le=1.0)
    session_expiry: float = Field(0.0, ge=0.0, le=1.0)
    straggler: float = Field(0.0, ge=0.0, le=1.0)


class SimulationConfig(RequestModel):
    """A simulated deployment: hardware, the model whose cost is projected, capacity, faults.

    Times are simulated seconds. `model` None projects the cost of the model each request
    names; otherwise a catalog name, a known model name (docs/simulator.md lists them) or the
    path of a Hugging Face `config.json` (or its directory), so that e.g. Llama-3.1-8B on 8×H100
    is simulated while the arithmetic runs on the tiny built-in model.
    """

    hardware: str = "H100"
    devices: int = Field(1, ge=1, le=4096)
    model: str | None = None
    weight_bytes: int = Field(2, ge=1, le=8, description="bytes per base weight (2 = bf16)")
    mfu_train: float | None = Field(None, gt=0.0, le=1.0, description="overrides the hardware profile's training MFU")
    mfu_prefill: float | None = Field(None, gt=0.0, le=1.0)
    mbu_decode: float | None = Field(None, gt=0.0, le=1.0)
    cycle_s: float = Field(
        0.0, ge=0.0, description="batching window: device passes start on multiples of it (0: as soon as ready)"
    )
    max_batch_tokens: int | None = Field(
        None, ge=1, description="tokens one device pass holds (None: limited by memory only)"
    )
    faults: FaultRates = FaultRates()
    schedule: tuple[ScheduledFault, ...] = ()
    straggler_factor: float = Field(4.0, ge=1.0)
    retry_after_s: float = Field(2.0, ge=0.0, description="the Retry-After of a rate-limited answer")
    request_timeout_s: float = Field(60.0, gt=0.0, description="when a client gives up on a lost answer")
    restart_s: float = Field(30.0, ge=0.0, description="how long a service restart keeps the device down")
    seed: int = 0
    time_scale: float = Field(0.0, ge=0.0, description="0: never sleep; s > 0: a simulated second lasts s real seconds")
    trace: str | None = Field(None, description="write a Chrome trace-event JSON file here")

    @field_validator("hardware")
    @classmethod
    def _known_hardware(cls, name: str) -> str:
        """The accelerator's canonical name (case-insensitive: "h100" is "H100")."""
        for known in PEAKS:
            if known.lower() == name.strip().lower():
                return known
        raise ValueError(f"unknown accelerator {name!r}; known: {', '.join(sorted(PEAKS))}")

    @model_validator(mode="after")
    def _failure_rates_add_up_to_at_most_one(self) -> SimulationConfig:
        total = sum(getattr(self.faults, kind) for kind in FAILURE_KINDS)
        if total > 1.0 + 1e-12:
            message = (
                f"the failure rates (transient + timeout + rate_limit + session_expiry) add up to {total:g}; "
                "they are exclusive per request, so keep their sum <= 1"
            )
            raise field_error(("faults",), message, self.faults.model_dump())
        return self

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> SimulationConfig:
        """The configuration in TOML file `path`; relative `model` and `trace` paths are taken
        relative to the file. InvalidRequestError naming the key when a value is wrong."""
        file = Path(path)
        try:
            data = tomllib.loads(file.read_text())
        except OSError as exc:
            raise InvalidRequestError(
                f"simulation profile {file}: cannot read it ({exc})", field="simulation"
            ) from None
        except tomllib.TOMLDecodeError as exc:
            raise InvalidRequestError(
                f"simulation profile {file}: not valid TOML ({exc})", field="simulation"
            ) from None
        for key in ("model", "trace"):
            value = data.get(key)
            if isinstance(value, str) and (value.endswith(".json") or key == "trace") and not Path(value).is_absolute():
                data[key] = str(file.parent / value)
        if isinstance(data.get("model"), str) and (file.parent / data["model"]).is_dir():
            data["model"] = str(file.parent / data["model"])
        return cls(**data)

    @classmethod
    def from_env(cls) -> SimulationConfig | None:
        """The profile named by `BIOS_SIMULATION`, or None when it is unset or empty.

        `BIOS_SIMULATION_TRACE`, when set and not empty, replaces the profile's `trace`: the
        trace file is written there instead (a relative path is taken from the working
        directory, not from the profile's). Without `BIOS_SIMULATION` it does nothing.
        InvalidRequestError naming the key when the profile is wrong.
        """
        path = os.environ.get("BIOS_SIMULATION", "").strip()
        if not path:
            return None
        config = cls.from_toml(path)
        trace = os.environ.get("BIOS_SIMULATION_TRACE", "").strip()
        return config.model_copy(update={"trace": trace}) if trace else config


class SimulationReport(ResultModel):
    """The summary of a simulated run (all times in simulated seconds)."""

    hardware: str
    devices: int
    model: str
    requests: dict[str, int] = Field(default_factory=dict, description="request attempts by kind")
    retries: dict[str, int] = Field(default_factory=dict, description="attempts after the first, by request kind")
    faults: dict[str, int] = Field(default_factory=dict, description="injected faults by kind")
    wall_s: float = 0.0
    device_busy_s: float = 0.0
    busy_fraction: float = 0.0
    device_hours: float = 0.0
    text: str = ""
    """The report as printed: a few lines ending in the projected cost."""

    def __str__(self) -> str:
        return self.text


class Simulator(Protocol):
    """A backend under the service simulator: the engine calls `backend` and admits every
    request through `hook`; `report` is the run so far (writing the trace file, if any)."""

    @property
    def backend(self) -> Backend: ...

    @property
    def hook(self) -> RequestHook: ...

    def report(self) -> SimulationReport: ...


SIMULATOR_GROUP = "bios.simulator"


def simulate(backend: Backend, config: SimulationConfig, catalog: Catalog) -> Simulator:
    """`backend` under the simulated deployment `config` (the simulator registered as entry
    point `default` of `bios.simulator`); InvalidRequestError naming `simulation` if none is installed."""
    for ep in entry_points(group=SIMULATOR_GROUP):
        if ep.name == "default":
            simulator: Simulator = ep.load()(backend, config, catalog)
            return simulator
    raise InvalidRequestError(
        "simulation: no service simulator is installed (entry point bios.simulator:default)", field="simulation"
    )
