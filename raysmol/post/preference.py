"""Preference pairs for DPO: (prompt, chosen, rejected) -> two rows each, plus the reference model's log-probs.
No Ray here.

A pair becomes rows 2i (chosen) and 2i+1 (rejected), each one conversation rendered with the tokenizer's chat
template, loss only on the assistant's tokens (`chat.encode`), one conversation per row (a pair's two sequences
are summed separately, so they are never packed together). The reference log-probs are the frozen init_from
model's summed log-probabilities of each row's assistant tokens, computed once before training.
"""

from __future__ import annotations

import json
import re
import zlib

import numpy as np
import torch

from raysmol.post.chat import IGNORE, ChatError, Packed, builtin_conversations, check_messages, encode, fill


def _messages(value, where: str, what: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user" if what == "prompt" else "assistant", "content": value}]
    if isinstance(value, list):
        return value
    raise ChatError(f"{where}: {what!r} must be text or a list of messages, got {type(value).__name__}")


def pair_conversations(row: dict, where: str) -> tuple[list[dict], list[dict]]:
    """The chosen and rejected conversations of one row. `chosen`/`rejected` as text are the assistant's reply to
    `prompt`; as lists of messages they are whole conversations (the hub's usual layout), `prompt` then unused."""
    missing = [k for k in ("chosen", "rejected") if k not in row] + ([] if "prompt" in row or
                                                                     isinstance(row.get("chosen"), list) else ["prompt"])
    if missing:
        raise ChatError(f"{where}: a preference pair needs {', '.join(missing)} (keys: {', '.join(row) or 'none'})")
    out = []
    for what in ("chosen", "rejected"):
        reply = _messages(row[what], where, what)
        convo = reply if isinstance(row[what], list) else _messages(row["prompt"], where, "prompt") + reply
        if convo[-1].get("role") != "assistant":
            raise ChatError(f"{where}: {what!r} must end with the assistant's reply")
        out.append(check_messages(convo, f"{where} ({what})"))
    return out[0], out[1]


def read_pairs(uri: str) -> list[tuple[str, list[dict], list[dict]]]:
    """(where, chosen conversation, rejected conversation) per row of a jsonl/parquet file or built-in set."""
    from raysmol import storage

    if uri.startswith("builtin:"):
        return builtin_pairs(uri)
    out = [(where, *pair_conversations(row, where)) for where, row in storage.records(uri, ChatError)]
    if not out:
        raise ChatError(f"{uri}: no preference pairs")
    return out


def builtin_pairs(spec: str, n: int = 3000, seed: int = 2) -> list[tuple[str, list[dict], list[dict]]]:
    """The built-in word problems with a worked solution (chosen) and the same solution with a wrong result
    (rejected): the preference a model should learn is arithmetic, not style."""
    import random

    r = random.Random(seed)
    out = []
    for where, convo in builtin_conversations(spec, n, seed):
        solution = convo[-1]["content"]
        answer = int(re.search(r"The answer is (-?\d+)", solution).group(1))
        wrong = answer + r.choice([-3, -2, -1, 1, 2, 3, 10])
        # The final result and its restatement change; operands stay, so only the arithmetic is wrong.
        bad = re.sub(rf"(= |is ){answer}\b", lambda m: f"{m.group(1)}{wrong}", solution)
        out.append((where, convo, [*convo[:-1], {"role": "assistant", "content": bad}]))
    return out


def prepare_pairs(uri: str, tokenizer, seq_len: int, val_fraction: float) -> dict:
    """Encode, split by a hash of the pair, and lay out as rows (chosen, rejected, chosen, ...)."""
    train, val, dropped = [], [], 0
    for where, chosen, rejected in read_pairs(uri):
        pair = (encode(tokenizer, chosen, where), encode(tokenizer, rejected, where))
        # A pair whose reply is cut away entirely by seq_len carries no preference: counted, not trained on.
        if any(not mask[1:seq_len].any() for _, mask in pair):
            dropped += 1
            continue
        held_out = zlib.crc32(json.dumps([chosen, rejected], sort_keys=True).encode()) % 10_000 < val_fraction * 10_000
        (val if held_out else train).append(pair)
    if not train:
        raise ChatError(f"{uri}: no pair left to train on ({dropped} had no reply within train.seq_len={seq_len}, "
                        f"{len(val)} went to validation)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows_train = pair_rows(train, seq_len, pad)
    return {"train": rows_train, "val": pair_rows(val, seq_len, pad) if val else None,
            "stats": {"pairs": len(train), "val_pairs": len(val), "dropped": dropped, "truncated": rows_train.truncated}}


def pair_rows(pairs: list[tuple[tuple[np.ndarray, np.ndarray], ...]], seq_len: int, pad_id: int) -> Packed:
    examples = [e for pair in pairs for e in pair]
    return fill(examples, [[i] for i in range(len(examples))], seq_len, pad_id)


@torch.no_grad()
def reference_logps(model: torch.nn.Module, packed: Packed, micro_batch: int, device: str = "cpu") -> np.ndarray:
    """Each row's summed log-probability of its assistant tokens under `model` (the frozen reference)."""
    from raysmol.train.objectives import sequence_logps, to_device

    model.eval()
    out = []
    for start in range(0, len(packed.input_ids), micro_batch):
        b = packed.batch(np.arange(start, min(start + micro_batch, len(packed.input_ids))))
        out.append(sequence_logps(model, to_device(b, device, model)).double().cpu())
    return torch.cat(out).numpy()


__all__ = ["IGNORE", "pair_conversations", "read_pairs", "builtin_pairs", "prepare_pairs", "pair_rows",
           "reference_logps"]
