"""The service simulator: a layer around the engine with a virtual clock, a calibrated latency
and capacity model, and seeded faults (docs/simulator.md). `Simulation(inner, config, catalog)`
is what Bios finds under the `bios.simulator` entry point: its `backend` is what the engine
calls, its `hook` what the engine admits requests through."""

from emulator.simulator.backend import SimulatedBackend
from emulator.simulator.hook import Simulation

__all__ = ["SimulatedBackend", "Simulation"]
