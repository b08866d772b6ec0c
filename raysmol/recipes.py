"""Verbs -> tasks: what `raysmol pretrain|sft|dpo|grpo` runs, and the hooks every run of them gets.

The verb is the only source of the mode: a config whose sections belong to another verb is an error naming the
verb that runs it (`raysmol pretrain jobs/sft_tiny.yaml` used to run SFT silently).
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Callable

from raysmol.config import POST_TRAINING, Config, ConfigError
from raysmol.train.hooks import Hook
from raysmol.train.task import Task

NEEDS = {
    "sft": "chat data (jsonl or parquet rows with messages)",
    "dpo": "preference pairs (jsonl or parquet rows with prompt, chosen, rejected)",
    "grpo": "prompts with answers (jsonl or parquet rows with prompt, answer)",
}
# Imported on use: a verb loads only its own recipe (GRPO's pulls in the engines).
TASKS = {"pretrain": "raysmol.train.pretrain:Pretrain", "sft": "raysmol.post.sft:SFT", "dpo": "raysmol.post.dpo:DPO",
         "grpo": "raysmol.post.rollout:GRPO"}
VERBS = tuple(TASKS)


def task_for(verb: str, cfg: Config) -> Task:
    """The task `raysmol VERB` runs on `cfg`, after checking that the config's sections are that verb's."""
    if verb not in VERBS:
        raise ConfigError(f"unknown verb {verb!r}; valid: {', '.join(VERBS)}")
    given = [m for m in POST_TRAINING if getattr(cfg, m).data is not None]
    other = [m for m in given if m != verb]
    if other:
        raise ConfigError(f"{cfg.origin}: {other[0]}.data is set, so this is a {other[0]} job: run it with "
                          f"`raysmol {other[0]} {cfg.origin}`" + ("" if verb == "pretrain" else
                                                                  f" (raysmol {verb} reads {verb}.data)"))
    if verb != "pretrain" and not given:
        raise ConfigError(f"{cfg.origin}: {verb}.data: raysmol {verb} needs {NEEDS[verb]} and {verb}.init_from "
                          "(the starting model)")
    module, name = TASKS[verb].split(":")
    return getattr(importlib.import_module(module), name)()


def run(verb: str, cfg: Config, *, show_progress: bool = True,
        on_rows: Callable[[list[dict[str, Any]]], None] | None = None) -> dict[str, Any]:
    """Prepare and train `raysmol VERB`'s task on `cfg`; returns the summary (also in the run's summary.json)."""
    from raysmol import nodes, storage
    from raysmol.runtime import init_ray, say
    from raysmol.train import launch

    task = task_for(verb, cfg)
    init_ray()
    # Before any work: on a cluster whose nodes have their own disks, a local path fails only on the far node.
    shared = {"run.output_dir": cfg.run.output_dir, **task.shared_paths(cfg)}
    for key in ("run.output_dir", "data.cache_dir"):  # written by the run: created here, so there is one to see
        if key in shared and not storage.is_remote(shared[key]):
            os.makedirs(os.path.expanduser(shared[key]), exist_ok=True)
    nodes.require_shared(shared, "the training workers read and write them")
    say(f"preparing: {verb} data and model for run {cfg.run.name!r}")
    task.prepare(cfg, show_progress=show_progress)
    return launch.train(cfg, task, training_hooks(cfg, task), show_progress=show_progress, on_rows=on_rows)


def pretrain(cfg: Config, **kw) -> dict[str, Any]:
    return run("pretrain", cfg, **kw)


def training_hooks(cfg: Config, task: Task) -> list[Hook]:
    """Hooks from above `train/` that any run may ask for in its config: the in-training eval suite."""
    if not cfg.train.eval_suite:
        return []
    from raysmol.eval.cf import TrainingSuite

    return [TrainingSuite(cfg.train.eval_suite, cfg.train.eval_suite_samples, task.tokenizer_dir)]
