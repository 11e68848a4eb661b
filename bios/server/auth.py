"""API keys: who a request comes from.

A key is a secret string; the server stores only its SHA-256, and the first 16 hex digits of
that hash are the key's owner id, which every session, request and checkpoint is filed under.
Keys come from a keys file (one `sha256-hex  name` line per key, written by `bios keys create`)
and from `BIOS_API_KEYS` (comma-separated raw keys). Keys start with `tml-` so that the
official Tinker SDK, which checks that prefix, accepts them.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

from bios.errors import AuthenticationError

KEY_PREFIX = "tml-"
NO_AUTH_OWNER = "local"
"""The owner of everything on a server started with --no-auth."""


def owner_of(key: str) -> str:
    """The owner id of a raw key: 16 hex digits of its SHA-256."""
    return _digest(key)[:16]


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random key (`tml-` + 48 hex digits)."""
    return KEY_PREFIX + secrets.token_hex(24)


def add_key(keys_file: Path, name: str) -> str:
    """Create a key named `name`, append its hash to `keys_file`, and return the raw key (shown once)."""
    key = new_key()
    keys_file.parent.mkdir(parents=True, exist_ok=True)
    with open(keys_file, "a", encoding="utf-8") as out:
        out.write(f"{_digest(key)}  {name}\n")
    os.chmod(keys_file, 0o600)
    return key


class KeyRing:
    """The accepted keys (by hash). `authenticate(header)` returns the caller's owner id."""

    def __init__(self, keys_file: Path | None = None, raw_keys: str | None = None, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self._hashes: set[str] = set()
        if keys_file is not None and keys_file.exists():
            for line in keys_file.read_text(encoding="utf-8").splitlines():
                if line.strip() and not line.startswith("#"):
                    self._hashes.add(line.split()[0])
        for key in filter(None, (k.strip() for k in (raw_keys or "").split(","))):
            self._hashes.add(_digest(key))

    def __len__(self) -> int:
        return len(self._hashes)

    def authenticate(self, key: str | None) -> str:
        """The owner id of `key`; AuthenticationError when it is missing or unknown."""
        if not self.enabled:
            return NO_AUTH_OWNER
        if not key:
            raise AuthenticationError("api_key: no API key sent; pass api_key= or set BIOS_API_KEY", field="api_key")
        if _digest(key) not in self._hashes:
            raise AuthenticationError("api_key: this API key is not valid on this server", field="api_key")
        return owner_of(key)


def bearer(header: str | None) -> str | None:
    """The key of an `Authorization: Bearer KEY` header (or a bare key)."""
    if not header:
        return None
    scheme, _, rest = header.partition(" ")
    return rest.strip() if scheme.lower() == "bearer" else header.strip()
