"""Prompts for engines: a conversation rendered through the model's own chat template, and prompt files (the
vibe checks of `raysmol sample` and of `train.sample_prompts`).

Engines take text and tokenize it themselves, adding the tokenizer's BOS where it has one; a template that writes
BOS into the text too would give the model two. So the rendered text loses a leading BOS (what vLLM's and
lm-evaluation-harness's chat paths do).
"""

from __future__ import annotations

import json
from typing import Any

from raysmol import storage
from raysmol.serve.engines import EngineError, Sampling


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


def read_prompts(path: str) -> list[dict[str, Any]]:
    """[{"id", "prompt"}] from a .jsonl or plain-text file; bad lines are named by file and line."""
    try:
        text = storage.read_text(path)
    except (FileNotFoundError, OSError) as e:
        raise EngineError(f"--prompts {path}: cannot read it ({e})") from None
    rows: list[dict[str, Any]] = []
    jsonl = path.endswith(".jsonl")
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if not jsonl:
            rows.append({"id": len(rows), "prompt": line})
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EngineError(f"{path}:{n}: not JSON ({e.msg}); one object per line, e.g. "
                              '{"prompt": "Tell me a story"}') from None
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if not (isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in prompt))):
            raise EngineError(f"{path}:{n}: 'prompt' must be text or a list of {{\"role\", \"content\"}} messages")
        rows.append({"id": row.get("id", len(rows)), "prompt": prompt})
    if not rows:
        raise EngineError(f"--prompts {path}: no prompts in it")
    return rows


def render(tokenizer, prompt: str | list[dict], chat: bool) -> str:
    if chat:
        return chat_prompt(tokenizer, [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt)
    if not isinstance(prompt, str):
        raise EngineError("a prompt given as messages needs the chat template (the model has none, or --no-chat)")
    return prompt


def sample(engine, rows: list[dict[str, Any]], sampling: Sampling, chat: bool) -> list[dict[str, Any]]:
    """Each row with its rendered prompt and its completions (one per sample)."""
    rendered = [render(engine.tokenizer, r["prompt"], chat) for r in rows]
    groups = engine.generate(rendered, sampling)
    return [{**r, "rendered": text, "completions": [s.text for s in group],
             "finish": [s.finish_reason for s in group], "version": group[0].version if group else None}
            for r, text, group in zip(rows, rendered, groups)]
