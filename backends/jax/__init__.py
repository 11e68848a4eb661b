"""The JAX backend: `ServiceClient(backend="jax")`.

Multi-LoRA training and sampling in pure JAX functions + Optax, sharded over a device mesh. Importing
`backends` alone imports no jax; this subpackage does.
"""

from bios.backend import BackendConfig


def create_backend(config: BackendConfig):
    """The `bios.backends` entry point: a `JaxBackend` for `config`, or, when its options ask
    for several processes (`coordinator`, `num_processes`, `process_id`, `distributed`), this
    process's part of a `MultihostBackend` (backends/jax/multihost.py)."""
    from backends.jax import multihost
    from backends.jax.backend import JaxBackend

    if not multihost.wanted(config.options):
        return JaxBackend(config)
    multihost.initialize(config.options)
    return multihost.MultihostBackend(JaxBackend(config))
