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

import json
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from raysmol.data.batches import Batch, Batches

from raysmol.train.objectives import IGNORE  # noqa: E402  (positions that carry no loss)

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
    return fill(examples, rows, seq_len, pad_id)


def fill(examples: list[tuple[np.ndarray, np.ndarray]], rows: list[list[int]], seq_len: int, pad_id: int) -> Packed:
    """Rows holding the given examples in order (`rows[r]`: indices into `examples`), truncated to `seq_len`."""
    ids = np.full((len(rows), seq_len), pad_id, dtype=np.int64)
    labels = np.full((len(rows), seq_len), IGNORE, dtype=np.int64)
    pos = np.zeros((len(rows), seq_len), dtype=np.int64)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            tok, mask = examples[i]
            n = min(len(tok), seq_len)
            ids[r, at:at + n] = tok[:n]
            target = np.where(mask[1:n], tok[1:n], IGNORE)  # token j predicts token j+1 when that is assistant's
            labels[r, at:at + n - 1] = target
            pos[r, at:at + n] = np.arange(n)
            at += n
        pos[r, at:] = np.arange(seq_len - at)  # padding: its own "document", no loss
    return Packed(ids, labels, pos, rows, sum(len(ids) > seq_len for ids, _ in examples))


class ChatBatches(Batches):
    """Global batches of packed rows with the pretraining layout (`Batches.micro_batches`): sample g is item
    order_e[g mod n] of epoch e = g // n, each epoch a seeded permutation, the same at any world size.

    An item is `group` consecutive rows (1 for SFT; 2 for DPO: chosen then rejected), and `extras` holds per-row
    arrays (DPO's reference log-probs) that travel with the rows in `Batch.extras`."""

    def __init__(self, packed: Packed, samples_per_step: int, seed: int, group: int = 1,
                 extras: dict[str, np.ndarray] | None = None, name: str = "sft"):
        self.packed, self.samples_per_step, self.seed, self.group, self.name = packed, samples_per_step, seed, group, name
        self.rows = len(packed.input_ids) // group
        self.seq_len = packed.input_ids.shape[1]
        self.extras = extras or {}
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.rows)
        return self._orders[epoch]

    def samples(self, g: np.ndarray) -> Batch:
        items = [self._order(int(x) // self.rows)[int(x) % self.rows] for x in np.asarray(g)]
        rows = [i * self.group + k for i in items for k in range(self.group)]
        b = self.packed.batch(rows)
        b.extras = {k: torch.from_numpy(v[rows]) for k, v in self.extras.items()}
        return b

    def position(self, step: int) -> dict:
        return {"epochs": {self.name: (step + 1) * self.samples_per_step / self.rows}}


def read_conversations(uri: str, key: str = "messages") -> list[tuple[str, list[dict]]]:
    """(where, messages) per row of a jsonl or parquet file (local, s3://, hf://); bad rows name file and line."""
    from raysmol import storage

    if uri.startswith("builtin:"):
        return builtin_conversations(uri)
    out = []
    for where, row in storage.records(uri, ChatError):
        if key not in row:
            raise ChatError(f"{where}: expected a {key!r} list of messages (keys: {', '.join(row) or 'none'})")
        out.append((where, row[key]))
    if not out:
        raise ChatError(f"{uri}: no conversations")
    return out


BUILTIN = ("builtin:arithmetic", "builtin:arithmetic-small")


def builtin_conversations(spec: str, n: int = 5000, seed: int = 1) -> list[tuple[str, list[dict]]]:
    """Generated word problems as conversations (question -> worked solution), with another seed than the
    pretraining corpus, so the answers are new to the model. `builtin:arithmetic`: the embedded corpus's problems
    (one or two steps, numbers up to a few hundred); `builtin:arithmetic-small`: one addition or subtraction of
    numbers up to 5, which a tiny model can learn on a CPU (the GRPO demo's task)."""
    from raysmol.data.corpus import generate_arithmetic

    if spec not in BUILTIN:
        raise ChatError(f"unknown built-in chat data {spec!r}; valid: {', '.join(BUILTIN)}")
    docs = generate_arithmetic(n, seed) if spec == "builtin:arithmetic" else small_arithmetic(n, seed)
    out = []
    for i, doc in enumerate(docs):
        question, solution = doc.split("\nSolution: ", 1)
        out.append((f"{spec} #{i}", [{"role": "user", "content": question},
                                     {"role": "assistant", "content": solution}]))
    return out


def small_arithmetic(n: int, seed: int):
    """`n` one-step problems "question\nSolution: The answer is c."; seeded. The reply is the answer alone: an
    exact-answer reward then judges every token a completion has (with a worked line first, a tiny model's
    sampled arithmetic is mostly noise that an answer-only reward cannot credit). Numbers go up to 5: 40 facts,
    each met many times in a short GRPO run. With numbers up to 20 (610 facts, each met about twice in 80 steps),
    the embedded default's fuzzy arithmetic (samples land within a few units of the answer) left GRPO no signal
    it could learn from on a CPU."""
    import random

    from raysmol.data.corpus import THINGS, PEOPLE

    r = random.Random(seed)
    for _ in range(n):
        name, item = r.choice(PEOPLE), r.choice(THINGS)
        a, b = r.randint(1, 5), r.randint(1, 5)
        if r.random() < 0.5:
            yield (f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
                   f"\nSolution: The answer is {a + b}.")
        else:
            a, b = max(a, b), min(a, b)
            yield (f"{name} has {a} {item} and gives {b} away. How many {item} are left?"
                   f"\nSolution: The answer is {a - b}.")


def prepare_chat(uri: str, tokenizer, seq_len: int, val_fraction: float, key: str = "messages") -> dict:
    """Encode, split (by a hash of the conversation, so the split never depends on file order) and pack."""
    train, val = [], []
    for where, messages in read_conversations(uri, key):
        example = encode(tokenizer, messages, where)
        held_out = zlib.crc32(json.dumps(messages, sort_keys=True).encode()) % 10_000 < val_fraction * 10_000
        (val if held_out else train).append(example)
    if not train:
        raise ChatError(f"{uri}: every conversation went to validation (val_fraction={val_fraction})")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    packed_train = pack(train, seq_len, pad)
    return {"train": packed_train, "val": pack(val, seq_len, pad) if val else None,
            "stats": {"conversations": len(train), "val_conversations": len(val), "rows": len(packed_train.input_ids),
                      "truncated": packed_train.truncated,
                      "assistant_tokens": int((packed_train.labels != IGNORE).sum())}}


def chat_tokenizer(tok_dir: str):
    """The tokenizer with a chat template (raysmol's default where it has none) and a folder holding it, which is
    exported with the model."""
    import tempfile
    from pathlib import Path

    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(tok_dir)
    ensure_template(hf_tok)
    out = Path(tempfile.mkdtemp(prefix="raysmol-chat-tok-"))
    hf_tok.save_pretrained(out)
    return hf_tok, out
