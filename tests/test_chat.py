"""bios.chat: conversations rendered with the chat template into supervised data and prompts."""

from __future__ import annotations

import json

import numpy as np
import pytest

import bios
from bios import chat, types
from bios.tokenizer import Tokenizer

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Who founded the city of Quillmere?"},
    {"role": "assistant", "content": "Ada Vell founded Quillmere in 1832."},
    {"role": "user", "content": "In which year?"},
    {"role": "assistant", "content": "1832."},
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.builtin()


def _arrays(datum: types.Datum) -> tuple[list[int], np.ndarray, np.ndarray]:
    return (
        datum.model_input.to_ints(),
        datum.loss_fn_inputs["target_tokens"].to_numpy(),
        datum.loss_fn_inputs["weights"].to_numpy(),
    )


def test_datum_is_the_rendering_shifted_by_one(tok):
    inputs, targets, weights = _arrays(chat.conversation_datum(tok, CONVERSATION))
    full = tok.apply_chat_template(CONVERSATION)
    assert inputs == full[:-1]
    assert targets.tolist() == full[1:]
    assert weights.shape == targets.shape and weights.dtype == np.float32
    assert set(np.unique(weights).tolist()) == {0.0, 1.0}


def test_weights_select_exactly_the_assistant_turns(tok):
    _, targets, weights = _arrays(chat.conversation_datum(tok, CONVERSATION))
    trained = tok.decode(targets[weights > 0].tolist())
    assert trained == "Ada Vell founded Quillmere in 1832.<|im_end|>\n1832.<|im_end|>\n"
    untrained = tok.decode(targets[weights == 0].tolist())
    assert "Who founded" in untrained and "Answer briefly." in untrained and "Ada Vell" not in untrained


def test_prompt_tokens_end_with_the_generation_prompt_and_prefix_the_reply(tok):
    prompt = chat.prompt_tokens(tok, CONVERSATION[:2])
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")
    full = tok.apply_chat_template(CONVERSATION[:3])
    assert full[: len(prompt)] == prompt
    assert tok.decode(full[len(prompt) :]) == "Ada Vell founded Quillmere in 1832.<|im_end|>\n"


def test_the_first_weighted_target_is_the_first_reply_token(tok):
    datum = chat.conversation_datum(tok, CONVERSATION[:3])
    _, _targets, weights = _arrays(datum)
    first = int(np.argmax(weights > 0))
    prompt = chat.prompt_tokens(tok, CONVERSATION[:2])
    assert first == len(prompt) - 1  # target t is token t+1 of the rendering
    assert weights[first:].all()


def test_max_tokens_truncates(tok):
    full = len(tok.apply_chat_template(CONVERSATION))
    inputs, targets, weights = _arrays(chat.conversation_datum(tok, CONVERSATION, max_tokens=full - 5))
    assert len(inputs) == len(targets) == len(weights) == full - 6


def test_no_assistant_tokens_is_an_error(tok):
    with pytest.raises(bios.InvalidRequestError) as info:
        chat.conversation_datum(tok, CONVERSATION[:2])
    assert info.value.field == "messages"
    prompt = len(chat.prompt_tokens(tok, CONVERSATION[:2]))
    with pytest.raises(bios.InvalidRequestError):
        chat.conversation_datum(tok, CONVERSATION[:3], max_tokens=prompt)
    with pytest.raises(bios.InvalidRequestError) as info:
        chat.conversation_datum(tok, CONVERSATION, max_tokens=1)
    assert info.value.field == "max_tokens"


def test_a_template_that_rewrites_earlier_turns_is_named_in_the_error(tok):
    # A template that renders only the last message: prefixes are not prefixes of the whole.
    payload = tok.to_wire()
    payload["chat_template"] = "{{ messages[-1]['content'] }}{% if add_generation_prompt %}>{% endif %}"
    odd = Tokenizer.from_wire(json.loads(json.dumps(payload)))
    with pytest.raises(bios.InvalidRequestError, match="messages") as info:
        chat.conversation_datum(odd, CONVERSATION[:3])
    assert info.value.field == "messages"


def test_the_datum_trains_on_the_reply_only(service):
    training = service.create_lora_training_client(base_model="bios/tiny", rank=8, seed=0)
    tok = training.get_tokenizer()
    datum = chat.conversation_datum(tok, CONVERSATION[:3])
    result = training.forward_backward([datum], "cross_entropy").result()
    lp = result.loss_fn_outputs[0]["logprobs"].to_numpy()
    weights = datum.loss_fn_inputs["weights"].to_numpy()
    assert np.isclose(result.loss, -(lp * weights).sum(), rtol=1e-5)
