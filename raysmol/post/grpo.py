"""GRPO's pieces that need no cluster: prompts, rewards, group-normalised advantages and training rows.

The Ray side (engine actors, reward tasks, weight sync) is raysmol/post/rollout.py; the objective (clipped
surrogate, optional KL) is `grpo` below.
"""

from __future__ import annotations

import importlib
import re
from typing import Callable

import numpy as np
import torch

from raysmol.data.batches import Batch
from raysmol.post.chat import ChatError, Packed, builtin_conversations, fill
from raysmol.post.importance import logp_gap, masked_mean, ratio_stats, tis_weight
from raysmol.serve.prompts import chat_prompt
from raysmol.train.objectives import token_logps

REWARDS = ("exact", "math", "code")
EPS = 1e-4  # keeps the advantages finite when a group's rewards are all equal (they are then all 0)


def read_prompts(uri: str, prompt_key: str = "prompt", answer_key: str = "answer") -> list[dict]:
    """Rows with `prompt` (text, or a list of messages ending with the user's) and what the reward checks
    (`answer`; code: `test` and `entry_point`), read from the columns `prompt_key` and `answer_key`; a GSM8K
    answer ("reasoning #### N") becomes N. Built-in: the arithmetic problems with their answers."""
    from raysmol import storage

    if uri.startswith("builtin:"):
        # Another seed than the SFT and DPO data: the policy is rewarded on problems it was not shown solved.
        return [{"prompt": convo[:-1], "answer": re.search(r"The answer is (-?\d+)", convo[-1]["content"]).group(1),
                 "where": where} for where, convo in builtin_conversations(uri, 5000, seed=3)]
    rows = []
    for where, row in storage.records(uri, ChatError):
        if prompt_key not in row:
            raise ChatError(f"{where}: a GRPO prompt row needs {prompt_key!r} (keys: {', '.join(row) or 'none'}; "
                            "grpo.prompt_key names the column)")
        row = {**row, "prompt": row[prompt_key], "where": where}
        if answer_key in row:
            answer = row[answer_key]
            row["answer"] = answer.rsplit("####", 1)[1].strip() if isinstance(answer, str) and "####" in answer else answer
        rows.append(row)
    if not rows:
        raise ChatError(f"{uri}: no prompts")
    return rows


def prompt_messages(row: dict) -> list[dict]:
    p = row["prompt"]
    messages = [{"role": "user", "content": p}] if isinstance(p, str) else p
    if not isinstance(messages, list) or not messages or messages[-1].get("role") != "user":
        raise ChatError(f"{row.get('where', 'prompt')}: 'prompt' must be text or messages ending with the user's")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or \
                not isinstance(m.get("content"), str):
            raise ChatError(f"{row.get('where', 'prompt')}: prompt message {i} must be {{'role', 'content'}}")
    return messages


def render_prompt(tokenizer, row: dict) -> str:
    """The prompt as the policy sees it: its chat template up to the assistant header."""
    return chat_prompt(tokenizer, prompt_messages(row))


# ---------------------------------------------------------------- rewards

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def exact_reward(completion: str, row: dict) -> float:
    """1 when the completion's last number equals the answer exactly (as a number: 7 == 7.0, 1,000 == 1000)."""
    found = _NUMBER.findall(completion)
    if not found:
        return 0.0
    try:
        return float(float(found[-1].replace(",", "")) == float(str(row["answer"]).replace(",", "")))
    except ValueError:
        return 0.0


def math_reward(completion: str, row: dict) -> float:
    """GSM8K-style: the final answer (#### / \\boxed{} / last number) checked by math-verify."""
    from raysmol.eval.freeform import gsm8k_correct

    return float(gsm8k_correct(completion, str(row["answer"])))


def code_reward(completions: list[str], row: dict) -> list[float]:
    """1 per completion whose program (prompt + completion + test + check(entry_point)) exits 0 in the sandbox."""
    from raysmol.eval.freeform import humaneval_program
    from raysmol.eval.sandbox import Sandbox

    prompt = row["prompt"] if isinstance(row["prompt"], str) else row["prompt"][-1]["content"]
    problem = {"prompt": prompt, "test": row["test"], "entry_point": row["entry_point"]}
    results = Sandbox().run_many([humaneval_program(problem, c) for c in completions], workers=2)
    return [float(r.status == "ok") for r in results]


def reward_function(spec: str) -> Callable[[list[str], dict], list[float]]:
    """Scores a group: (completions, row) -> one reward per completion. `spec`: exact, math, code, or
    "module:function" (a plain callable (completion, row) -> float, imported where the reward task runs)."""
    if spec == "code":
        return code_reward
    if spec in ("exact", "math"):
        one = exact_reward if spec == "exact" else math_reward
    else:
        module, _, name = spec.partition(":")
        if not module or not name:
            raise ChatError(f"grpo.reward={spec!r}: expected one of {', '.join(REWARDS)} or 'module:function'")
        try:
            one = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise ChatError(f"grpo.reward={spec!r}: cannot import it ({e})") from e
    return lambda completions, row: [float(one(c, row)) for c in completions]


def group_advantages(rewards: np.ndarray) -> np.ndarray:
    """GRPO's advantages: each completion's reward minus its group's mean, over the group's standard deviation
    (Bessel-corrected, as TRL computes it) plus EPS. `rewards`: [groups, group_size]."""
    r = np.asarray(rewards, dtype=np.float64)
    return (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + EPS)


def completion_rows(prompt_ids: list[list[int]], completions: list[list[list[int]]], logprobs: list[list[list[float]]],
                    seq_len: int, pad_id: int) -> tuple[Packed, np.ndarray]:
    """One row per completion (group by group): prompt + completion tokens, labels on the completion only,
    and the sampling log-probs aligned with the labels ([rows, seq_len], 0 where no label)."""
    examples, lps = [], []
    for p, group, group_lps in zip(prompt_ids, completions, logprobs):
        if len(p) >= seq_len:
            raise ChatError(f"a prompt of {len(p)} tokens leaves no room for a completion in train.seq_len={seq_len}")
        for c, lp in zip(group, group_lps):
            examples.append((np.asarray(p + c, dtype=np.int64), np.r_[np.zeros(len(p), bool), np.ones(len(c), bool)]))
            lps.append((len(p), lp))
    packed = fill(examples, [[i] for i in range(len(examples))], seq_len, pad_id)
    old = np.zeros(packed.labels.shape, dtype=np.float32)
    for r, (n_prompt, lp) in enumerate(lps):
        kept = min(len(lp), seq_len - n_prompt)  # completion tokens that fit the row
        old[r, n_prompt - 1:n_prompt - 1 + kept] = lp[:kept]  # position j predicts token j + 1
    if not np.isfinite(old).all():
        raise ChatError("an engine returned a non-finite log-probability for a sampled token")
    return packed, old


__all__ = ["REWARDS", "read_prompts", "prompt_messages", "render_prompt", "exact_reward", "math_reward",
           "code_reward", "reward_function", "group_advantages", "completion_rows"]


def grpo(model: torch.nn.Module, batch: Batch, clip: float, kl_beta: float, logprobs: str = "trainer",
         tis_cap: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's clipped surrogate (Shao et al. 2024): one row per completion, labels on its tokens only.

    extras: `advantages` [m] (group-normalised rewards), `old_logps` [m, L] (the trainer's log-probs of the same
    tokens under the weights that sampled them; absent: this forward's, detached), `engine_logps` [m, L] (the engine's, as it reported them while
    sampling), `rewards` [m] (logged), and with kl_beta > 0 `ref_logps` [m, L]. The ratio divides by `old_logps`
    (logprobs="trainer") or `engine_logps` ("engine"); with `tis_cap` each token's surrogate is weighted by
    min(exp(old - engine), tis_cap) (raysmol/post/importance.py). Per token: -min(ratio * A, clip(ratio,
    1 - clip, 1 + clip) * A) (+ kl_beta * k3 KL estimate), averaged over each completion's tokens, then over
    completions."""
    logp, mask = token_logps(model, batch)
    engine = batch.extras["engine_logps"].to(logp.dtype)
    # Without a recomputed `old_logps` (grpo.recompute_logps: false) the weights that sampled are these, before
    # the step's one update: this forward's own log-probs, detached.
    old = batch.extras["old_logps"].to(logp.dtype) if "old_logps" in batch.extras else logp.detach()
    ratio = torch.exp(logp - (old if logprobs == "trainer" else engine))
    adv = batch.extras["advantages"].to(logp.dtype)[:, None]
    per_token = -torch.min(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    metrics = {**ratio_stats(ratio, mask), **logp_gap(engine, old, mask)}
    if "staleness" in batch.extras:  # updates between the sampling weights and these, per completion
        st = batch.extras["staleness"].float()
        metrics.update(staleness_mean=st.mean(), staleness_max=st.max(), version_min=batch.extras["versions"].min())
    if tis_cap is not None:
        w = tis_weight(engine, old, tis_cap)
        per_token = per_token * w
        metrics["tis_weight_mean"] = masked_mean(w, mask)
    if kl_beta > 0:
        d = batch.extras["ref_logps"].to(logp.dtype) - logp
        kl = torch.exp(d) - d - 1  # Schulman's k3: unbiased, always >= 0
        per_token = per_token + kl_beta * kl
        metrics["kl"] = masked_mean(kl, mask).detach()
    n = mask.sum(1).clamp(min=1)
    loss = ((per_token * mask).sum(1) / n).mean()
    clipped = ((ratio - 1).abs() > clip) & mask
    return loss, {**metrics, "reward": batch.extras["rewards"].float().mean(),
                  "clip_fraction": clipped.sum() / mask.sum().clamp(min=1), "completion_tokens": n.float().mean()}
