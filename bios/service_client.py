"""`ServiceClient`: the entry point. Discovers models and creates training and sampling clients."""

from __future__ import annotations

import asyncio
import os

from bios.config import ClientConfig
from bios.errors import InvalidRequestError
from bios.sampling_client import SamplingClient
from bios.simulation import SimulationConfig, SimulationReport
from bios.training_client import TrainingClient
from bios.transport import connect
from bios.transport.inprocess import simulator_of
from bios.types import LoraConfig, ServerCapabilities


class ServiceClient:
    """Connects to Bios: in this process when there is no base URL, on the chosen backend.

    Configuration is resolved once, here: explicit argument, then environment, then default.
    Environment: `BIOS_API_KEY`, `BIOS_BASE_URL`, `BIOS_BACKEND` (default "jax" when JAX is
    installed, else "emulator"), `BIOS_BACKEND_OPTIONS` (`key=value,...`, e.g. the jax
    backend's `devices`, `model_parallel`, `dtype`), `BIOS_HOME` (checkpoints; default ~/.bios),
    `BIOS_SIMULATION` (a TOML profile: run the backend under the service simulator, as
    `simulation=SimulationConfig(...)` does; see docs/simulator.md) and `BIOS_SIMULATION_TRACE`
    (where that simulation writes its trace, overriding the profile's `trace`).
    """

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        backend: str | None = None,
        backend_options: dict[str, str] | None = None,
        simulation: SimulationConfig | None = None,
    ) -> None:
        self.config = ClientConfig.resolve(
            api_key=api_key, base_url=base_url, backend=backend, backend_options=backend_options, simulation=simulation
        )
        self._transport = connect(self.config)

    def simulation_report(self) -> SimulationReport | None:
        """Under the service simulator: the run so far — requests, retries and faults by kind,
        simulated wall time, device-busy fraction and projected cost (printing it gives the
        text); the trace file, if the simulation names one, is written too. None otherwise."""
        simulator = simulator_of(self._transport)
        return simulator.report() if simulator is not None else None

    def get_server_capabilities(self) -> ServerCapabilities:
        """The models this deployment serves, with their architecture facts."""
        return self._transport.capabilities()

    async def get_server_capabilities_async(self) -> ServerCapabilities:
        return self.get_server_capabilities()

    def create_lora_training_client(
        self,
        base_model: str,
        rank: int | None = None,
        alpha: float | None = None,
        *,
        lora_config: LoraConfig | None = None,
        seed: int | None = None,
        target_modules: list[str] | None = None,
        train_mlp: bool | None = None,
        train_attn: bool | None = None,
        train_unembed: bool | None = None,
        dropout: float | None = None,
    ) -> TrainingClient:
        """A new LoRA training session on `base_model`.

        Give the adapter either as keywords (rank defaults to 32, alpha to 2 * rank) or as a
        `LoraConfig` — not both.
        """
        fields = {
            "rank": rank,
            "alpha": alpha,
            "seed": seed,
            "target_modules": target_modules,
            "train_mlp": train_mlp,
            "train_attn": train_attn,
            "train_unembed": train_unembed,
            "dropout": dropout,
        }
        given = {k: v for k, v in fields.items() if v is not None}
        if lora_config is not None and given:
            raise InvalidRequestError(f"give either lora_config or {', '.join(given)}, not both", field="lora_config")
        config = lora_config if lora_config is not None else LoraConfig(**given)
        return TrainingClient(self._transport, self._transport.create_session(base_model, config))

    async def create_lora_training_client_async(
        self, base_model: str, rank: int | None = None, alpha: float | None = None, **kwargs: object
    ) -> TrainingClient:
        return await asyncio.to_thread(self.create_lora_training_client, base_model, rank, alpha, **kwargs)  # type: ignore[arg-type]

    def create_training_client_from_state(
        self, path: str | os.PathLike, base_model: str | None = None
    ) -> TrainingClient:
        """A new session resuming the state saved at `path` (bios://SESSION/weights/NAME: weights,
        optimizer moments, step), or starting at step 0 from the Hugging Face PEFT LoRA adapter in
        local directory `path` on `base_model` (required then)."""
        return TrainingClient(self._transport, self._transport.create_session_from_state(path, base_model=base_model))

    async def create_training_client_from_state_async(
        self, path: str | os.PathLike, base_model: str | None = None
    ) -> TrainingClient:
        return await asyncio.to_thread(self.create_training_client_from_state, path, base_model)

    def create_sampling_client(self, model_path: str | None = None, base_model: str | None = None) -> SamplingClient:
        """Sample from saved weights (`model_path`, a bios:// path) or a bare `base_model`."""
        return SamplingClient(
            self._transport, self._transport.create_sampler(model_path=model_path, base_model=base_model)
        )

    async def create_sampling_client_async(
        self, model_path: str | None = None, base_model: str | None = None
    ) -> SamplingClient:
        return await asyncio.to_thread(self.create_sampling_client, model_path, base_model)
