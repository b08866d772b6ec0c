"""Prompts for engines that serve chat models: a conversation rendered through the model's own chat template.

Engines take text and tokenize it themselves, adding the tokenizer's BOS where it has one; a template that writes
BOS into the text too would give the model two. So the rendered text loses a leading BOS (what vLLM's and
lm-evaluation-harness's chat paths do).
"""

from __future__ import annotations


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """`messages` up to the assistant's header, ready for an engine's `generate`."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos) and tokenizer("x", add_special_tokens=True)["input_ids"][:1] == \
            [tokenizer.bos_token_id]:
        text = text[len(bos):]
    return text
