"""Continued pretraining (`train.init_from`, `train.init_carry`): where a run's first step starts from when it is
not from scratch and not a resume of its own checkpoints.

Driver (`resolve`): init_from is a Hugging Face folder, a run directory or a checkpoint. The weights always come
as a Hugging Face folder every node can read: the folder itself, the run's hf/, or the checkpoint exported into
the new run's directory (`<run>/init/`, once; `raysmol export`'s code path). Its config.json gives the model's
shape and its tokenizer files the tokenizer (the driver adopts both into the config before anything else runs).
Carrying state needs a checkpoint: the one named, or a run directory's newest complete one.

Worker (`carry`): after DeepSpeed is initialised on the loaded weights, and only when the run has no checkpoint
of its own (a resume of the continued run restores its own state instead):
- optimizer: the checkpoint's DeepSpeed state (AdamW moments; through the universal format at another world
  size or ZeRO stage);
- schedule: the step counter continues from the checkpoint's step, so the lr schedule and train.steps do too;
- data: the data position continues where the checkpoint's run stopped (a DataPlan skip from step 0, saved
  with every checkpoint, so resumes of the continued run stay exact).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raysmol import storage
from raysmol.config import Config, ConfigError
from raysmol.train import checkpoint as ckpt
from raysmol.train.guard import DataPlan

INIT_DIR = "init"  # <run>/init/: a checkpoint init_from, exported once as the run's starting weights


@dataclass
class Start:
    init_from: str
    weights: str  # a Hugging Face folder (URI) every worker resolves on its own node
    checkpoint: str | None = None  # the checkpoint state is carried from, when init_carry asks for any
    state: dict[str, Any] = field(default_factory=dict)  # its state.json (less the file checksums)
    carry: tuple[str, ...] = ()


def resolve(cfg: Config, run_dir: str) -> Start | None:
    """Where `cfg`'s run starts from (None: from scratch). Adopts the model's shape and tokenizer into `cfg`."""
    t = cfg.train
    if t.init_from is None:
        return None
    from raysmol.model.folder import resolve_model
    from raysmol.train import export

    uri = t.init_from if storage.is_remote(t.init_from) else str(Path(t.init_from).expanduser().resolve())
    where = f"{cfg.origin}: train.init_from={t.init_from!r}"
    if not storage.exists(uri):
        raise ConfigError(f"{where} does not exist (a Hugging Face folder, a run directory or a checkpoint)")
    checkpoint = None
    if storage.exists(storage.join(uri, ckpt.STATE_FILE)):
        checkpoint = uri
    elif t.init_carry:
        found = [c for _, c in ckpt.candidates(storage.join(uri, "checkpoints"))
                 if storage.exists(storage.join(c, ckpt.STATE_FILE))]
        if not found:
            raise ConfigError(f"{where}: train.init_carry={t.init_carry} carries a checkpoint's state, and this is "
                              "not a checkpoint nor a run directory with a complete one; carry nothing (weights "
                              "only: init_carry: []) or name a checkpoint")
        checkpoint = found[0]
    state = {}
    if checkpoint is not None:
        state = {k: v for k, v in json.loads(storage.read_text(storage.join(checkpoint, ckpt.STATE_FILE))).items()
                 if k != "files"}
    if checkpoint is not None and checkpoint == uri:
        weights = storage.join(run_dir, INIT_DIR)
        if not storage.exists(storage.join(weights, "config.json")):  # a re-submission reuses the first export
            try:
                export.export_checkpoint(checkpoint, weights)
            except export.ExportError as e:
                raise ConfigError(f"{where}: {e}") from e
    else:
        weights = uri if storage.is_remote(uri) else str(resolve_model(uri))
    local = resolve_model(weights)
    cfg.tokenizer.name = str(local)
    cfg.adopt_model(json.loads((local / "config.json").read_text()), "train.init_from")
    if "optimizer" in t.init_carry and state["zero_stage"] != t.zero_stage:
        raise ConfigError(f"{where}: train.init_carry carries the optimizer state, saved under ZeRO stage "
                          f"{state['zero_stage']}: set train.zero_stage={state['zero_stage']} or carry no optimizer")
    if "schedule" in t.init_carry and state.get("step", 0) >= t.steps:
        raise ConfigError(f"{where}: train.init_carry carries the schedule from step {state['step']}, so "
                          f"train.steps={t.steps} must be larger (it counts from the start of the first run)")
    return Start(t.init_from, weights, checkpoint, state, tuple(t.init_carry))


def universal_needed(start: Start | None, world: int, zero_stage: int) -> bool:
    """Loading carried optimizer state saved at another world size goes through DeepSpeed's universal format
    (decided before deepspeed.initialize, whose config names the format); ZeRO 0 keeps whole states anyway."""
    return bool(start and "optimizer" in start.carry and zero_stage > 0 and start.state["world_size"] != world)


def carry(engine, cfg: Config, start: Start, plan: DataPlan, scheduler, base_lr, universal: Path | None) -> int:
    """Apply what `start` carries to a freshly initialised engine; returns the step the run continues from.
    `universal`: the checkpoint converted to the universal format, when `universal_needed`."""
    step = start.state["step"] if "schedule" in start.carry else 0
    if "optimizer" in start.carry:
        if universal is not None:
            ckpt.load_universal(engine, universal)
        else:
            with tempfile.TemporaryDirectory(prefix="raysmol-init-") as tmp:
                ckpt.load(engine, ckpt.fetch(start.checkpoint, Path(tmp)))
    # The scheduler's position is the step counter (whatever the checkpoint's scheduler held): set it and the lr.
    scheduler.last_epoch = step
    for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * base_lr(step) * plan.lr_factor(step)
    if "data" in start.carry:
        s = cfg.train.samples_per_step()
        next_sample = start.state["data"]["next_sample"]
        if next_sample % s:
            raise ConfigError(f"train.init_carry: data: the checkpoint's data position (sample {next_sample}) is not "
                              f"a whole number of this run's steps ({s} samples); keep train.global_batch_tokens and "
                              "train.seq_len or carry no data position")
        if next_sample // s != step:
            plan.skips.append((0, next_sample // s - step))
    return step

