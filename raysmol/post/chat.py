"""Chat data for SFT: a conversation -> token ids with an assistant-token mask -> packed rows. No Ray here.

The loss mask comes from the tokenizer's own chat template, whatever it is: the template renders the conversation,
and for each assistant turn i the characters between `render(turns[:i], add_generation_prompt=True)` (everything
up to and including the assistant header) and `render(turns[:i+1])` are the assistant's; tokens whose characters
fall there carry loss. That needs a prefix-stable template (rendering more turns only appends text), which
ChatML-style templates are; one that is not is refused with the turn where it rewrote earlier text.

Tokenizers without a template get `DEFAULT_TEMPLATE`: plain-text role headers and the tokenizer's EOS after each
turn, so a base model's vocabulary needs no new tokens and the model learns to stop.

Packing never splits a conversation: rows are filled best-fit-decreasing with whole conversations, positions
restart at each conversation (so transformers' packed-sequence attention keeps them apart, as in pretraining),
and a conversation longer than a row is truncated and counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from raysmol.data.batches import Batch

IGNORE = -100  # F.cross_entropy's ignore_index: positions that carry no loss

DEFAULT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
ROLES = ("system", "user", "assistant")


class ChatError(ValueError):
    """A conversation or template raysmol cannot train on; the message says which and why."""


def ensure_template(tokenizer) -> None:
    """Give a tokenizer without a chat template raysmol's default (saved with it on export)."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_TEMPLATE


def check_messages(messages, where: str = "conversation") -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ChatError(f"{where}: expected a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ChatError(f"{where}: message {i} must be {{'role': one of {', '.join(ROLES)}, "
                            f"'content': text}}, got {m!r:.120}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ChatError(f"{where}: no assistant message, nothing to learn from")
    return messages


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, messages: list[dict], where: str = "conversation") -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of assistant turns (content and end-of-turn)."""
    messages = check_messages(messages, where)
    text = _render(tokenizer, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = _render(tokenizer, messages[:i], True) if i else ""
        end = _render(tokenizer, messages[:i + 1], False)
        if not text.startswith(end) or not end.startswith(start):
            raise ChatError(f"{where}: the chat template is not prefix-stable at message {i} (rendering more turns "
                            "rewrote earlier text), so assistant tokens cannot be located; use a ChatML-style template")
        spans.append((len(start), len(end)))
    return text, spans


def encode(tokenizer, messages: list[dict], where: str = "conversation") -> tuple[np.ndarray, np.ndarray]:
    """(token ids, loss mask): mask[j] is True when token j belongs to an assistant turn."""
    text, spans = assistant_spans(tokenizer, messages, where)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    mask = np.zeros(len(ids), dtype=bool)
    for j, (a, b) in enumerate(enc["offset_mapping"]):
        mask[j] = any(s <= a and b <= e for s, e in spans) and b > a
    return ids, mask


@dataclass
class Packed:
    input_ids: np.ndarray  # [rows, L]
    labels: np.ndarray  # [rows, L]: next token where that token is an assistant token, else IGNORE
    position_ids: np.ndarray  # [rows, L]: restart at 0 at every conversation
    conversations: list[list[int]]  # which conversations each row holds
    truncated: int  # conversations cut to fit a row

    def batch(self, rows) -> Batch:
        rows = np.asarray(rows)
        return Batch(torch.from_numpy(self.input_ids[rows]), torch.from_numpy(self.labels[rows]),
                     torch.from_numpy(self.position_ids[rows]), np.zeros(len(rows), dtype=np.int64),
                     np.zeros(len(rows), dtype=np.int64))


def pack(examples: list[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int) -> Packed:
    """Whole conversations into rows of `seq_len` input tokens, best fit decreasing.

    A conversation of n tokens takes n positions; its labels are its own next tokens (its last token predicts
    nothing), so no position ever learns across a conversation boundary. Padding carries no loss."""
    lengths = [min(len(ids), seq_len) for ids, _ in examples]
    free: list[int] = []
    rows: list[list[int]] = []
    for i in sorted(range(len(examples)), key=lambda i: -lengths[i]):
        fits = [r for r, f in enumerate(free) if f >= lengths[i]]
        r = min(fits, key=lambda r: free[r]) if fits else None
        if r is None:
            rows.append([])
            free.append(seq_len)
            r = len(rows) - 1
        rows[r].append(i)
        free[r] -= lengths[i]
    ids = np.full((len(rows), seq_len), pad_id, dtype=np.int64)
    labels = np.full((len(rows), seq_len), IGNORE, dtype=np.int64)
    pos = np.zeros((len(rows), seq_len), dtype=np.int64)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            tok, mask = examples[i]
            n = lengths[i]
            ids[r, at:at + n] = tok[:n]
            target = np.where(mask[1:n], tok[1:n], IGNORE)  # token j predicts token j+1 when that is assistant's
            labels[r, at:at + n - 1] = target
            pos[r, at:at + n] = np.arange(n)
            at += n
        pos[r, at:] = np.arange(seq_len - at)  # padding: its own "document", no loss
    return Packed(ids, labels, pos, rows, sum(len(ids) > seq_len for ids, _ in examples))
