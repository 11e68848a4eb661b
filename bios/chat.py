"""Chat conversations as training data and prompts (`from bios import chat`).

Renders messages (``[{"role": ..., "content": ...}, ...]``) with a tokenizer's chat template
and turns them into what the API takes: a supervised `Datum` whose weights select the
assistant's tokens, or the token ids of a prompt that asks the model for the next reply.
Works with any chat template whose rendering of the first i messages plus the generation
prompt is a prefix of the rendering of the whole conversation (ChatML and the templates of
the common open chat models are). Imports only the public `bios.tokenizer`, `bios.types` and
`bios.errors`; no client, engine or backend.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bios.errors import InvalidRequestError
from bios.tokenizer import Tokenizer
from bios.types import Datum, ModelInput

__all__ = ["assistant_weights", "conversation_datum", "prompt_tokens"]


def _render(tokenizer: Tokenizer, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    return list(
        tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt, tokenize=True)
    )


def prompt_tokens(tokenizer: Tokenizer, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of ``messages`` rendered with the chat template and the generation prompt.

    Returns [T] ints: the prompt after which the model writes the assistant's next reply
    (wrap it in `types.ModelInput.from_ints` to sample). Raises `InvalidRequestError` if the
    tokenizer has no chat template. Pure.
    """
    return _render(tokenizer, messages, add_generation_prompt=True)


def assistant_weights(tokenizer: Tokenizer, messages: Sequence[dict[str, str]]) -> tuple[list[int], list[float]]:
    """(tokens, weights): the whole conversation's [T] token ids and a [T] float mask, 1.0 on the
    tokens of every assistant message (its content and the template's end-of-turn tokens after
    it), 0.0 elsewhere (system and user turns, the generation prompts ``<|im_start|>assistant``).

    Assistant spans are found by rendering prefixes: message i's span starts where the
    rendering of ``messages[:i]`` with the generation prompt ends and stops where the rendering
    of ``messages[:i + 1]`` ends. Raises `InvalidRequestError` (field ``messages``) if those
    renderings are not token prefixes of the full one — the template then rewrites earlier
    turns, and the spans cannot be found this way. Pure.
    """
    messages = list(messages)
    tokens = _render(tokenizer, messages, add_generation_prompt=False)
    weights = [0.0] * len(tokens)
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        start = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else []
        end = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        for name, part in ((f"messages[:{i}] with the generation prompt", start), (f"messages[:{i + 1}]", end)):
            if tokens[: len(part)] != part:
                raise InvalidRequestError(
                    f"the chat template's rendering of {name} is not a prefix of the rendering of all of messages; "
                    "cannot find the assistant's tokens by prefix (is the template rewriting earlier turns?)",
                    field="messages",
                )
        for t in range(len(start), len(end)):
            weights[t] = 1.0
    return tokens, weights


def conversation_datum(
    tokenizer: Tokenizer, messages: Sequence[dict[str, str]], *, max_tokens: int | None = None
) -> Datum:
    """A supervised next-token `Datum` for a conversation, trained on the assistant's tokens only.

    With the conversation's [T] tokens ``x`` (the chat template's rendering, truncated to its
    first ``max_tokens`` if given) and their weights ``w`` (see `assistant_weights`):
    ``model_input = x[:-1]`` ([T-1]), ``loss_fn_inputs = {"target_tokens": x[1:] ([T-1] int64),
    "weights": w[1:] ([T-1] float32)}`` — ready for ``forward_backward(..., "cross_entropy")``,
    where the loss is then minus the summed logprob of the assistant's tokens.
    Raises `InvalidRequestError` when there is no chat template, when the spans cannot be
    found (see `assistant_weights`), when ``max_tokens`` < 2, or when no assistant token is
    left after truncation (field ``messages``). Pure.
    """
    if max_tokens is not None and max_tokens < 2:
        raise InvalidRequestError(
            f"max_tokens must be >= 2 (an input and a target), got {max_tokens}", field="max_tokens"
        )
    tokens, weights = assistant_weights(tokenizer, messages)
    if max_tokens is not None:
        tokens, weights = tokens[:max_tokens], weights[:max_tokens]
    if not any(weights[1:]):
        raise InvalidRequestError(
            "messages has no assistant message to train on"
            + (f" within the first {max_tokens} tokens" if max_tokens else ""),
            field="messages",
        )
    return Datum(
        model_input=ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": np.asarray(tokens[1:], dtype=np.int64),
            "weights": np.asarray(weights[1:], dtype=np.float32),
        },
    )
