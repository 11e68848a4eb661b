"""Compute backends that implement `bios.backend.Backend`. Importing this package imports no
backend (and no jax): each lives in its own subpackage, found through the `bios.backends`
entry-point group."""
