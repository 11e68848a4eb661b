"""The two pydantic bases of the public types.

`RequestModel`: frozen, `extra="forbid"` — an unsupported field is an error, never dropped — and
every validation failure surfaces as `bios.InvalidRequestError` naming the field.
`ResultModel`: frozen, tolerant of unknown fields so an older client can read a newer server.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from bios.errors import InvalidRequestError


def invalid_request(exc: ValidationError, owner: str, fields: Iterable[str] = ()) -> InvalidRequestError:
    """Turn pydantic's first error into an `InvalidRequestError` naming `owner.field`.

    `fields`: the owner's field names, listed when the error is an unknown top-level field.
    """
    first = exc.errors()[0]
    loc = first.get("loc", ())
    where = ".".join(str(part) for part in loc if part != "__root__")
    field = f"{owner}.{where}" if where else owner
    got = first.get("input")
    shown = repr(got) if not isinstance(got, dict) and len(repr(got)) < 80 else type(got).__name__
    message = f"{field}: {first.get('msg', 'invalid value')}, got {shown}"
    if first.get("type") == "extra_forbidden" and len(loc) == 1 and fields:
        message += f"; valid fields of {owner} are {', '.join(fields)}"
    return InvalidRequestError(message, field=field)


def field_error(loc: tuple[str | int, ...], message: str, value: object) -> ValidationError:
    """A validation error at `loc` for a model-level check (a plain ValueError there has no field)."""
    error = PydanticCustomError("value_error", "{message}", {"message": message})
    return ValidationError.from_exception_data("RequestModel", [InitErrorDetails(type=error, loc=loc, input=value)])


class RequestModel(BaseModel):
    """Base of everything a user sends: frozen, unknown fields rejected, errors typed."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise invalid_request(exc, type(self).__name__, type(self).model_fields) from None

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:  # frozen: say how to get a changed copy instead
            field = f"{type(self).__name__}.{name}"
            raise InvalidRequestError(
                f"{field}: {type(self).__name__} is immutable; use "
                f".model_copy(update={{{name!r}: ...}}) for a changed copy",
                field=field,
            ) from exc

    # Tell pydantic this __init__ only wraps the base one: otherwise pydantic-core calls it for
    # nested models and `model_validate`, and the InvalidRequestError it raises there is
    # re-wrapped as a field-less "Value error" of the outer model, losing the field path.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> Self:
        try:
            return super().model_validate(obj, **kwargs)
        except ValidationError as exc:
            raise invalid_request(exc, cls.__name__, cls.model_fields) from None

    @classmethod
    def model_validate_json(cls, json_data: str | bytes | bytearray, **kwargs: Any) -> Self:
        try:
            return super().model_validate_json(json_data, **kwargs)
        except ValidationError as exc:
            raise invalid_request(exc, cls.__name__, cls.model_fields) from None

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy; fields in `update` are validated like the constructor's (pydantic's own
        `model_copy` skips validation, which would let out-of-range values through)."""
        if not update:
            return super().model_copy(deep=deep)
        return type(self).model_validate({**self.model_dump(exclude_unset=True), **update})


class ResultModel(BaseModel):
    """Base of everything Bios returns: frozen; unknown fields are ignored."""

    model_config = ConfigDict(frozen=True, extra="ignore")
