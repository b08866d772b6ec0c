"""Freeform evaluation of a checkpoint: prompts -> engine pool -> predictions jsonl -> the same scorers that
`raysmol eval --task T --predictions FILE` uses, so a model's outputs and external outputs are scored alike.

GSM8K: k-shot prompts ("Question: ...\\nAnswer: <worked solution> #### n") from the train split, greedy, cut at
the next "Question:". HumanEval: the problem's prompt, cut at the next top-level statement; n samples per task
(temperature 0.8 when n > 1) for pass@k.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from raysmol import storage
from raysmol.eval.freeform import (GSM8K_HF, FreeformError, humaneval_problems, load_gsm8k, score_predictions)
from raysmol.serve.engines import Sampling

GSM8K_STOP = ("\n\nQuestion:", "\nQuestion:")
# Where a function body ends in HumanEval completions (the stop list of the Codex paper and its harnesses).
HUMANEVAL_STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")


def gsm8k_prompts(reference: str, limit: int | None, shots: int) -> tuple[list[dict], list[str]]:
    test = load_gsm8k(reference, "test")[:limit]
    examples = load_gsm8k(reference, "train")[:shots] if shots else []
    head = "".join(f"Question: {e['question']}\nAnswer: {e['answer']}\n\n" for e in examples)
    return ([{"idx": i} for i in range(len(test))],
            [f"{head}Question: {r['question']}\nAnswer:" for r in test])


def humaneval_prompts(limit: int | None) -> tuple[list[dict], list[str]]:
    problems = list(humaneval_problems().values())[:limit]
    return [{"task_id": p["task_id"]} for p in problems], [p["prompt"] for p in problems]


def evaluate_freeform(pool, task: str, out_dir: str, *, limit: int | None = None, samples: int = 1,
                      max_tokens: int | None = None, shots: int = 5, reference: str = GSM8K_HF, seed: int = 0,
                      workers: int = 2, allow_unsandboxed: bool = False) -> dict[str, Any]:
    """Generate with `pool` (an EnginePool), write `<out_dir>/<task>.predictions.jsonl`, score, write
    `<out_dir>/<task>.json` and return the result (with the engine's weight version and model path)."""
    if task == "gsm8k":
        keys, prompts = gsm8k_prompts(reference, limit, shots)
        stop, max_tokens = GSM8K_STOP, max_tokens or 256
    elif task == "humaneval":
        keys, prompts = humaneval_prompts(limit)
        stop, max_tokens = HUMANEVAL_STOP, max_tokens or 384
    else:
        raise FreeformError(f"unknown freeform task {task!r}; valid: gsm8k, humaneval")
    sampling = Sampling(n=samples, temperature=0.8 if samples > 1 else 0.0, top_p=0.95 if samples > 1 else 1.0,
                        max_tokens=max_tokens, seed=seed, stop=stop)
    groups = pool.generate(prompts, sampling)
    lines = [json.dumps({**key, "completion": s.text, "version": s.version})
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
               sampling={"n": samples, "temperature": sampling.temperature, "max_tokens": max_tokens, "shots":
                         shots if task == "gsm8k" else None})
    storage.write_text(storage.join(out_dir, f"{task}.json"), json.dumps(res, indent=1) + "\n")
    return res
