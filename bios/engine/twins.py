"""Async twins of the engine's methods, which the `Transport` protocol asks for.

A method that only checks and queues runs on the caller's loop as it is (`queued_twin`); one
that waits for the worker thread runs on a thread of its own (`waiting_twin`).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


def queued_twin(method: Callable[P, R]) -> Callable[P, Coroutine[Any, Any, R]]:
    """`async` `method`, run on the caller's loop: it returns at once (a future, or a fact)."""

    @functools.wraps(method)
    async def twin(*args: P.args, **kwargs: P.kwargs) -> R:
        return method(*args, **kwargs)

    return twin


def waiting_twin(method: Callable[P, R]) -> Callable[P, Coroutine[Any, Any, R]]:
    """`async` `method`, run on a thread of its own: it waits for the engine's worker."""

    @functools.wraps(method)
    async def twin(*args: P.args, **kwargs: P.kwargs) -> R:
        return await asyncio.to_thread(method, *args, **kwargs)

    return twin
