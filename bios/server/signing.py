"""Signed tokens for URLs that need no API key, for clients that fetch files with a plain GET.

A token names what it grants (a checkpoint path, or what another download names) and its
expiry, with an HMAC under a key that lives as long as the server process.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time

from bios.errors import NotFoundError

URL_LIFETIME_S = 900.0


class DownloadSigner:
    """Signs and checks download tokens: each grants one string (a checkpoint path, or what
    another download names) until it expires."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key or secrets.token_bytes(32)

    def token(self, path: str, now: float | None = None) -> tuple[str, float]:
        """A token granting the download of `path`, and the unix time it expires."""
        expires = (time.time() if now is None else now) + URL_LIFETIME_S
        payload = base64.urlsafe_b64encode(json.dumps([path, expires]).encode()).decode().rstrip("=")
        return f"{payload}.{self._sign(payload)}", expires

    def path(self, token: str, now: float | None = None) -> str:
        """The string `token` grants; NotFoundError if it is forged, malformed or expired."""
        payload, _, signature = token.partition(".")
        try:
            if not hmac.compare_digest(signature, self._sign(payload)):
                raise ValueError("bad signature")
            path, expires = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        except ValueError:
            raise NotFoundError("url: no download at this URL", field="url") from None
        if (time.time() if now is None else now) > expires:
            raise NotFoundError("url: this download URL has expired; ask for a new one", field="url")
        return path

    def _sign(self, payload: str) -> str:
        return hmac.new(self._key, payload.encode(), hashlib.sha256).hexdigest()
