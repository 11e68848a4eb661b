"""The two pydantic bases of the public types.

`RequestModel`: frozen, `extra="forbid"` — an unsupported field is an error, never dropped — and
every validation failure surfaces as `bios.InvalidRequestError` naming the field.
`ResultModel`: frozen, tolerant of unknown fields so an older client can read a newer server.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from bios.errors import InvalidRequestError


def invalid_request(exc: ValidationError, owner: str) -> InvalidRequestError:
    """Turn pydantic's first error into an `InvalidRequestError` naming `owner.field`."""
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "__root__")
    field = f"{owner}.{where}" if where else owner
    got = first.get("input")
    shown = repr(got) if not isinstance(got, dict) and len(repr(got)) < 80 else type(got).__name__
    message = f"{field}: {first.get('msg', 'invalid value')}, got {shown}"
    return InvalidRequestError(message, field=field)


class RequestModel(BaseModel):
    """Base of everything a user sends: frozen, unknown fields rejected, errors typed."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise invalid_request(exc, type(self).__name__) from None

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any):  # type: ignore[override]
        try:
            return super().model_validate(obj, **kwargs)
        except ValidationError as exc:
            raise invalid_request(exc, cls.__name__) from None


class ResultModel(BaseModel):
    """Base of everything Bios returns: frozen; unknown fields are ignored."""

    model_config = ConfigDict(frozen=True, extra="ignore")
