"""The JAX backend: `ServiceClient(backend="jax")`.

Multi-LoRA training and sampling in pure JAX functions + Optax, sharded over a device mesh. Importing
`backends` alone imports no jax; this subpackage does.
"""

from bios.backend import BackendConfig


def create_backend(config: BackendConfig):
    """The `bios.backends` entry point: a `JaxBackend` for `config`."""
    from backends.jax.backend import JaxBackend

    return JaxBackend(config)
