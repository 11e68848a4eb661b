"""The service simulator: a backend decorator with a virtual clock, a calibrated latency and
capacity model, and seeded faults (docs/simulator.md). `SimulatedBackend(inner, config,
catalog)` is the factory the engine finds under the `bios.simulator` entry point."""

from emulator.simulator.backend import SimulatedBackend

__all__ = ["SimulatedBackend"]
