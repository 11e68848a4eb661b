"""API keys: who a request comes from.

A key is a secret string; the server stores only its SHA-256, and the first 16 hex digits of
that hash are the key's owner id, which every session, request and checkpoint is filed under.
Keys come from a keys file (one `sha256-hex  name` line per key, written by `bios keys create`)
and from `BIOS_API_KEYS` (comma-separated raw keys). Keys start with `tml-` so that the
official Tinker SDK, which checks that prefix, accepts them.

An operator key sees server-wide figures (`GET /v1/stats`) besides its own; it is marked
`sha256-hex  name  operator` in the keys file (`bios keys create NAME --operator`) or given raw
in `BIOS_OPERATOR_KEYS`. On a server started with --no-auth, its one user is the operator.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

from bios.errors import AuthenticationError, InvalidRequestError

KEY_PREFIX = "tml-"
NO_AUTH_OWNER = "local"
"""The owner of everything on a server started with --no-auth."""
OPERATOR = "operator"
"""The mark of an operator key in the keys file."""


def owner_of(key: str) -> str:
    """The owner id of a raw key: 16 hex digits of its SHA-256."""
    return _digest(key)[:16]


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random key (`tml-` + 48 hex digits)."""
    return KEY_PREFIX + secrets.token_hex(24)


def add_key(keys_file: Path, name: str, *, operator: bool = False) -> str:
    """Create a key named `name` (an operator key if `operator`), append its hash to
    `keys_file`, and return the raw key (shown once). InvalidRequestError for a name that is
    empty or holds white space."""
    if not name or name.split() != [name]:
        raise InvalidRequestError(f"name: a key name is one word without spaces, got {name!r}", field="name")
    key = new_key()
    keys_file.parent.mkdir(parents=True, exist_ok=True)
    with open(keys_file, "a", encoding="utf-8") as out:
        out.write(f"{_digest(key)}  {name}{'  ' + OPERATOR if operator else ''}\n")
    os.chmod(keys_file, 0o600)
    return key


class KeyRing:
    """The accepted keys (by hash), their names, and which are operators'.
    `authenticate(header)` returns the caller's owner id."""

    def __init__(
        self,
        keys_file: Path | None = None,
        raw_keys: str | None = None,
        *,
        enabled: bool = True,
        operator_keys: str | None = None,
    ) -> None:
        """`raw_keys` and `operator_keys`: comma-separated raw keys (the latter operators')."""
        self.enabled = enabled
        self._names: dict[str, str] = {}  # hash → name
        self._operators: set[str] = {NO_AUTH_OWNER} if not enabled else set()  # owner ids
        if keys_file is not None and keys_file.exists():
            for line in keys_file.read_text(encoding="utf-8").splitlines():
                if line.strip() and not line.startswith("#"):
                    digest, *rest = line.split()
                    self._names[digest] = rest[0] if rest else digest[:16]
                    if OPERATOR in rest[1:]:
                        self._operators.add(digest[:16])
        for env, operator in ((raw_keys, False), (operator_keys, True)):
            for key in filter(None, (k.strip() for k in (env or "").split(","))):
                self._names.setdefault(_digest(key), "BIOS_OPERATOR_KEYS" if operator else "BIOS_API_KEYS")
                if operator:
                    self._operators.add(owner_of(key))

    def __len__(self) -> int:
        return len(self._names)

    def is_operator(self, owner: str) -> bool:
        """Whether owner id `owner` holds an operator key."""
        return owner in self._operators

    def name_of(self, owner: str) -> str:
        """The name of the key whose owner id is `owner` (`local` without keys)."""
        if not self.enabled:
            return NO_AUTH_OWNER
        return next((name for digest, name in self._names.items() if digest[:16] == owner), owner)

    def authenticate(self, key: str | None) -> str:
        """The owner id of `key`; AuthenticationError when it is missing or unknown."""
        if not self.enabled:
            return NO_AUTH_OWNER
        if not key:
            raise AuthenticationError("api_key: no API key sent; pass api_key= or set BIOS_API_KEY", field="api_key")
        if _digest(key) not in self._names:
            raise AuthenticationError("api_key: this API key is not valid on this server", field="api_key")
        return owner_of(key)


def bearer(header: str | None) -> str | None:
    """The key of an `Authorization: Bearer KEY` header (or a bare key)."""
    if not header:
        return None
    scheme, _, rest = header.partition(" ")
    return rest.strip() if scheme.lower() == "bearer" else header.strip()
