"""`ServiceClient`: the entry point. Discovers models and creates training and sampling clients."""

from __future__ import annotations

import concurrent.futures
import os
from typing import TYPE_CHECKING

from bios import validation
from bios.clock import Clock
from bios.config import ClientConfig
from bios.errors import InvalidRequestError
from bios.rest_client import RestClient
from bios.retry import call_with_retries, call_with_retries_async
from bios.sampling_client import SamplingClient
from bios.simulation import SimulationConfig, SimulationReport
from bios.training_client import TrainingClient
from bios.transport import Transport, connect
from bios.types import LoraConfig, ServerCapabilities, TrainingInfo

if TYPE_CHECKING:
    from bios.transport.inprocess import EnginePool


class ServiceClient:
    """Connects to Bios: in this process when there is no base URL, on the chosen backend.

    Configuration is resolved once, here: explicit argument, then environment, then default.
    Environment: `BIOS_API_KEY`, `BIOS_BASE_URL`, `BIOS_BACKEND` (default "jax" when JAX is
    installed, else "emulator"), `BIOS_BACKEND_OPTIONS` (`key=value,...`, e.g. the jax
    backend's `devices`, `model_parallel`, `dtype`), `BIOS_HOME` (checkpoints; default ~/.bios),
    `BIOS_SIMULATION` (a TOML profile: run the backend under the service simulator, as
    `simulation=SimulationConfig(...)` does; see docs/simulator.md) and `BIOS_SIMULATION_TRACE`
    (where that simulation writes its trace, overriding the profile's `trace`).

    In-process, the engine comes from `engines` (default: the process's pool): clients of one
    pool with the same settings share it, batching together. Remote, the client owns its HTTP
    transport. `close()` (or leaving a `with` block) releases what the client owns.
    `user_metadata` (strings to strings, as in the tinker SDK) is given to every training
    session created here, under what a create call adds; it is in each `TrainingInfo`.
    """

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        backend: str | None = None,
        backend_options: dict[str, str] | None = None,
        simulation: SimulationConfig | None = None,
        *,
        engines: EnginePool | None = None,
        user_metadata: dict[str, str] | None = None,
    ) -> None:
        self._user_metadata = validation.user_metadata(user_metadata)
        self.config = ClientConfig.resolve(
            api_key=api_key, base_url=base_url, backend=backend, backend_options=backend_options, simulation=simulation
        )
        self._engines = _engine_pool(self.config, engines)
        self._transport = connect(self.config, self._engines)
        self._custom_losses = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="bios-custom-loss")
        """Where the training clients made here evaluate custom losses (threads start on first use)."""

    def close(self) -> None:
        """Release what this client owns: its custom-loss workers and, when remote, its HTTP
        transport (requests in flight fail, and its training and sampling clients can send no
        more). An in-process engine belongs to its pool and keeps serving. Idempotent."""
        self._custom_losses.shutdown(wait=False)
        if self._engines is None:
            self._transport.close()

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def transport(self) -> Transport:
        """What carries this client's calls: the in-process `bios.engine.Engine`, or the
        `bios.transport.http.HttpTransport` of a remote server (read-only; for tests and tools)."""
        return self._transport

    def _clock(self) -> Clock:
        return self._transport.clock

    def simulation_report(self) -> SimulationReport | None:
        """Under the service simulator: the run so far — requests, retries and faults by kind,
        simulated wall time, device-busy fraction and projected cost (printing it gives the
        text); the trace file, if the simulation names one, is written too. None otherwise."""
        simulator = self._engines.simulator_of(self._transport) if self._engines is not None else None
        return simulator.report() if simulator is not None else None

    def get_server_capabilities(self) -> ServerCapabilities:
        """The models this deployment serves, with their architecture facts."""
        return call_with_retries(self._transport.capabilities, "get_server_capabilities", self._clock)

    async def get_server_capabilities_async(self) -> ServerCapabilities:
        return await call_with_retries_async(self._transport.capabilities_async, "get_server_capabilities", self._clock)

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
        user_metadata: dict[str, str] | None = None,
    ) -> TrainingClient:
        """A new LoRA training session on `base_model`.

        Give the adapter either as keywords (rank defaults to 32, alpha to 2 * rank) or as a
        `LoraConfig` — not both.
        """
        config = _lora_config(
            lora_config,
            rank=rank,
            alpha=alpha,
            seed=seed,
            target_modules=target_modules,
            train_mlp=train_mlp,
            train_attn=train_attn,
            train_unembed=train_unembed,
            dropout=dropout,
        )
        t, label = self._transport, "create_lora_training_client"
        meta = self._session_metadata(user_metadata)
        info = call_with_retries(lambda: t.create_session(base_model, config, meta), label, self._clock)
        return self._training_client(info, call_with_retries(lambda: t.next_seq(info.session_id), label, self._clock))

    async def create_lora_training_client_async(
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
        user_metadata: dict[str, str] | None = None,
    ) -> TrainingClient:
        config = _lora_config(
            lora_config,
            rank=rank,
            alpha=alpha,
            seed=seed,
            target_modules=target_modules,
            train_mlp=train_mlp,
            train_attn=train_attn,
            train_unembed=train_unembed,
            dropout=dropout,
        )
        t, label = self._transport, "create_lora_training_client"
        meta = self._session_metadata(user_metadata)
        info = await call_with_retries_async(
            lambda: t.create_session_async(base_model, config, meta), label, self._clock
        )
        seq = await call_with_retries_async(lambda: t.next_seq_async(info.session_id), label, self._clock)
        return self._training_client(info, seq)

    def create_training_client_from_state(
        self, path: str | os.PathLike, base_model: str | None = None, *, user_metadata: dict[str, str] | None = None
    ) -> TrainingClient:
        """A new session starting from the weights saved at `path` (bios://SESSION/weights/NAME)
        with a fresh optimizer (step 0, zero Adam moments), as the tinker SDK's call does, or from
        the Hugging Face PEFT LoRA adapter in local directory `path` on `base_model` (required
        then). `create_training_client_from_state_with_optimizer` resumes the moments and step too."""
        return self._from_state(path, base_model, user_metadata, optimizer=False)

    async def create_training_client_from_state_async(
        self, path: str | os.PathLike, base_model: str | None = None, *, user_metadata: dict[str, str] | None = None
    ) -> TrainingClient:
        return await self._from_state_async(path, base_model, user_metadata, optimizer=False)

    def create_training_client_from_state_with_optimizer(
        self, path: str | os.PathLike, base_model: str | None = None, *, user_metadata: dict[str, str] | None = None
    ) -> TrainingClient:
        """A new session resuming the state saved at `path`: weights, Adam moments and step."""
        return self._from_state(path, base_model, user_metadata, optimizer=True)

    async def create_training_client_from_state_with_optimizer_async(
        self, path: str | os.PathLike, base_model: str | None = None, *, user_metadata: dict[str, str] | None = None
    ) -> TrainingClient:
        return await self._from_state_async(path, base_model, user_metadata, optimizer=True)

    def _session_metadata(self, user_metadata: object) -> dict[str, str]:
        """This client's user metadata under the create call's (a typed error for a bad one)."""
        return {**self._user_metadata, **validation.user_metadata(user_metadata)}

    def _from_state(
        self, path: str | os.PathLike, base_model: str | None, user_metadata: object, *, optimizer: bool
    ) -> TrainingClient:
        t, label, meta = self._transport, "create_training_client_from_state", self._session_metadata(user_metadata)
        info = call_with_retries(
            lambda: t.create_session_from_state(path, base_model, optimizer=optimizer, user_metadata=meta),
            label,
            self._clock,
        )
        return self._training_client(info, call_with_retries(lambda: t.next_seq(info.session_id), label, self._clock))

    async def _from_state_async(
        self, path: str | os.PathLike, base_model: str | None, user_metadata: object, *, optimizer: bool
    ) -> TrainingClient:
        t, label, meta = self._transport, "create_training_client_from_state", self._session_metadata(user_metadata)
        info = await call_with_retries_async(
            lambda: t.create_session_from_state_async(path, base_model, optimizer=optimizer, user_metadata=meta),
            label,
            self._clock,
        )
        seq = await call_with_retries_async(lambda: t.next_seq_async(info.session_id), label, self._clock)
        return self._training_client(info, seq)

    def create_sampling_client(self, model_path: str | None = None, base_model: str | None = None) -> SamplingClient:
        """Sample from saved weights (`model_path`, a bios:// path) or a bare `base_model`."""
        handle = call_with_retries(
            lambda: self._transport.create_sampler(model_path=model_path, base_model=base_model),
            "create_sampling_client",
            self._clock,
        )
        return SamplingClient(self._transport, handle)

    async def create_sampling_client_async(
        self, model_path: str | None = None, base_model: str | None = None
    ) -> SamplingClient:
        handle = await call_with_retries_async(
            lambda: self._transport.create_sampler_async(model_path=model_path, base_model=base_model),
            "create_sampling_client",
            self._clock,
        )
        return SamplingClient(self._transport, handle)

    def create_rest_client(self) -> RestClient:
        """A client of the service's training runs and checkpoints (listing, deleting)."""
        return RestClient(self._transport)

    def _training_client(self, info: TrainingInfo, next_seq: int) -> TrainingClient:
        return TrainingClient(self._transport, info, next_seq, self._custom_losses)


def _engine_pool(config: ClientConfig, engines: EnginePool | None) -> EnginePool | None:
    """The pool that serves an in-process client: `engines`, else the process's; None remote."""
    if config.base_url is not None:
        return None
    from bios.transport.inprocess import default_pool  # engine code loads for in-process clients only

    return engines if engines is not None else default_pool()


def _lora_config(lora_config: LoraConfig | None, **fields: object) -> LoraConfig:
    """`lora_config`, or one built from the keywords given (not None); InvalidRequestError naming
    `lora_config` when both are given."""
    given = {k: v for k, v in fields.items() if v is not None}
    if lora_config is not None and given:
        raise InvalidRequestError(f"give either lora_config or {', '.join(given)}, not both", field="lora_config")
    return lora_config if lora_config is not None else LoraConfig(**given)
