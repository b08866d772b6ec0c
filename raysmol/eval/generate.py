"""Freeform evaluation of a checkpoint: prompts -> engine pool -> predictions jsonl -> the same scorers that
`raysmol eval --task T --predictions FILE` uses, so a model's outputs and external outputs are scored alike.

Two prompt formats, recorded in the result as `prompt_format`:
- completion (base models): GSM8K k-shot text ("Question: ...\\nAnswer: <worked solution> #### n") from the train
  split, greedy, cut at the next "Question:"; HumanEval the problem's prompt, cut at the next top-level statement.
- chat (models with a chat template, the default for them; `chat=` overrides): rendered through the model's own
  template, as LightEval and lm-evaluation-harness do for instruct models. GSM8K: an instruction to end with
  "#### n", then the k worked examples as earlier user/assistant turns (few-shot as multi-turn; k = 0 is
  zero-shot). HumanEval: an instruction to complete the function in a code block; the scored completion is that
  block appended to the prompt (a function redefined whole replaces the prompt's stub).
The answer ends at the model's end-of-turn token. n samples per task (temperature 0.8 when n > 1) for pass@k.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Any

from raysmol import storage
from raysmol.eval.freeform import (GSM8K_HF, FreeformError, humaneval_problems, load_gsm8k, score_predictions)
from raysmol.serve.engines import Sampling
from raysmol.serve.prompts import chat_prompt, has_chat_template

GSM8K_STOP = ("\n\nQuestion:", "\nQuestion:")
# Where a function body ends in HumanEval completions (the stop list of the Codex paper and its harnesses).
HUMANEVAL_STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")


GSM8K_INSTRUCTION = ("Solve the math problem step by step. Write the final answer on the last line as "
                     "\"#### <number>\".")
HUMANEVAL_INSTRUCTION = "Complete the following Python function. Reply with the whole function in a Python code block."
_CODE_BLOCK = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)(?:```|$)", re.S | re.I)


def gsm8k_prompts(reference: str, limit: int | None, shots: int, tokenizer=None) -> tuple[list[dict], list[str]]:
    """k-shot prompts from the train split; with `tokenizer`, as a conversation in its chat template."""
    test = load_gsm8k(reference, "test")[:limit]
    examples = load_gsm8k(reference, "train")[:shots] if shots else []
    keys = [{"idx": i} for i in range(len(test))]
    if tokenizer is None:
        head = "".join(f"Question: {e['question']}\nAnswer: {e['answer']}\n\n" for e in examples)
        return keys, [f"{head}Question: {r['question']}\nAnswer:" for r in test]
    turns = [m for e in examples for m in ({"role": "user", "content": e["question"]},
                                            {"role": "assistant", "content": e["answer"]})]

    def conversation(question: str) -> list[dict]:
        msgs = [*turns, {"role": "user", "content": question}]
        msgs[0] = {"role": "user", "content": f"{GSM8K_INSTRUCTION}\n\n{msgs[0]['content']}"}
        return msgs

    return keys, [chat_prompt(tokenizer, conversation(r["question"])) for r in test]


def humaneval_prompts(limit: int | None, tokenizer=None) -> tuple[list[dict], list[str]]:
    problems = list(humaneval_problems().values())[:limit]
    keys = [{"task_id": p["task_id"]} for p in problems]
    if tokenizer is None:
        return keys, [p["prompt"] for p in problems]
    return keys, [chat_prompt(tokenizer, [{"role": "user", "content": f"{HUMANEVAL_INSTRUCTION}\n\n```python\n"
                                                                      f"{p['prompt'].strip()}\n```"}])
                  for p in problems]


def code_completion(reply: str) -> str:
    """What a chat reply adds to a HumanEval prompt: its first code block (else the whole reply), on a new line."""
    block = _CODE_BLOCK.search(reply)
    return "\n" + (block.group(1) if block else reply)


def use_chat(tokenizer, chat: bool | None, where: str) -> bool:
    """Whether prompts go through the chat template: `chat` if given (True needs a template), else whether the
    model has one."""
    if chat and not has_chat_template(tokenizer):
        raise FreeformError(f"{where}: --chat needs a chat template and this model's tokenizer has none "
                            "(tokenizer_config.json: chat_template); use --no-chat")
    return has_chat_template(tokenizer) if chat is None else chat


def evaluate_freeform(pool, task: str, out_dir: str, *, limit: int | None = None, samples: int = 1,
                      max_tokens: int | None = None, shots: int = 5, reference: str = GSM8K_HF, seed: int = 0,
                      workers: int = 2, allow_unsandboxed: bool = False, tokenizer=None) -> dict[str, Any]:
    """Generate with `pool` (an EnginePool), write `<out_dir>/<task>.predictions.jsonl`, score, write
    `<out_dir>/<task>.json` and return the result (with the engine's weight version and model path).
    With `tokenizer` (the model's), prompts are chat conversations in its template (see `use_chat`)."""
    chat = tokenizer is not None
    if task == "gsm8k":
        keys, prompts = gsm8k_prompts(reference, limit, shots, tokenizer)
        stop, max_tokens = () if chat else GSM8K_STOP, max_tokens or 256
    elif task == "humaneval":
        keys, prompts = humaneval_prompts(limit, tokenizer)
        stop, max_tokens = () if chat else HUMANEVAL_STOP, max_tokens or (512 if chat else 384)
    else:
        raise FreeformError(f"unknown freeform task {task!r}; valid: gsm8k, humaneval")
    sampling = Sampling(n=samples, temperature=0.8 if samples > 1 else 0.0, top_p=0.95 if samples > 1 else 1.0,
                        max_tokens=max_tokens, seed=seed, stop=stop)
    groups = pool.generate(prompts, sampling)
    # Chat HumanEval: the reply's code is the completion; the reply itself is kept beside it.
    lines = [json.dumps({**key, "completion": code_completion(s.text), "reply": s.text, "version": s.version}
                        if chat and task == "humaneval" else {**key, "completion": s.text, "version": s.version})
             for key, group in zip(keys, groups) for s in group]
    text = "\n".join(lines) + "\n"
    preds = storage.join(out_dir, f"{task}.predictions.jsonl")
    storage.write_text(preds, text)
    with tempfile.TemporaryDirectory(prefix="raysmol-preds-") as tmp:  # the scorers read a local file
        local = os.path.join(tmp, f"{task}.predictions.jsonl")
        with open(local, "w", encoding="utf-8") as f:
            f.write(text)
        res = score_predictions(task, local, reference=reference, workers=workers,
                                allow_unsandboxed=allow_unsandboxed)
    res.update(model=pool.model_path, version=pool.version, engine=pool.kind, predictions=preds,
               prompt_format="chat" if chat else "completion", prompt_example=prompts[0] if prompts else None,
               sampling={"n": samples, "temperature": sampling.temperature, "max_tokens": max_tokens, "shots":
                         shots if task == "gsm8k" else None})
    storage.write_text(storage.join(out_dir, f"{task}.json"), json.dumps(res, indent=1) + "\n")
    return res
