"""A re-submitted run (the same run.name, so the same run directory with checkpoints) may not change its training
trajectory silently: the driver compares the new resolved config with the one the newest committed checkpoint
recorded (state.json's `config`; for checkpoints written before it was recorded, the run directory's config.yaml)
before anything in the run directory is touched. No Ray here.

Keys are the dotted keys of `Config.to_dict()`; lists go by index and mappings by key, down to the values
(`data.sources.0.weight: 0.7 -> 0.5`), except that a list entry or mapping key present on one side only is shown
whole. A key or prefix in `train.allow_changes` covers every key under it (`data.sources`).

Never compared:
  run.name, run.output_dir      they select the run directory (a run copied elsewhere is the same run)
  train.allow_changes           the allowance itself

Harmless (allowed, logged and recorded in summary.json's `resume`):
  train.steps                   extending, or shortening to no less than the checkpoint's step (a run cannot go
                                back: below it is an error). Warned about when the learning rate the run resumes
                                at differs from the one the checkpoint's schedule gave: cosine past its warmup
                                (its decay is spread over train.steps), wsd once its decay has begun (or when the
                                new end pulls the decay before the checkpoint). wsd in its stable phase, constant,
                                and any schedule still warming up continue exactly as a fresh run of the new
                                length would.
  train.eval_every, eval_batches, eval_suite, eval_suite_samples, log_every, checkpoint_every, keep_checkpoints,
  keep_every, export_every, sample_prompts, sample_max_tokens
                                what is measured, kept and exported, not what is trained
  train.num_workers, min_workers, micro_batch_size
                                the global batch (global_batch_tokens) and the sample order do not depend on them:
                                gradient accumulation makes up the rest, and a checkpoint from another world size
                                is resharded (config validation keeps every size a whole number of passes). Only the
                                summation order of the gradients changes
  train.max_failures, cpu_threads_per_worker, peak_flops, elastic_resize_interval_s
                                fault tolerance, CPU threading, MFU reporting, how often an elastic run looks
                                for room to grow
  train.activation_checkpointing, compile, liger; model.attn_implementation
                                kernels and memory: the same function, up to rounding
  data.cache_dir                where prepared shards are cached (their folder is a hash of the inputs)
  run.category                  the ledger's booking
  run.trackers, mlflow_uri, project
                                where the metrics are mirrored (raysmol/train/trackers.py), not what is trained
  faults.*                      drills for tests and rehearsals
  watchdog.*                    hang detection bounds
  guard.*                       the spike guard's reaction: a run stopped by it (too many rollbacks) is
                                re-submitted with a changed guard, as its error message says
  grpo.cpus_per_engine, gpus_per_engine, reward_tasks, reward_cpus, rollout_timeout_s, sync_timeout_s,
  verify_sync, weight_sync, sync_bucket_mb
                                resources, timeouts, a debugging check and how the weights reach the engines

Everything else alters the trajectory and stops the run with a ConfigError listing every such change, unless
train.allow_changes names it: model.* (the shape; a checkpoint of another shape cannot even be loaded),
tokenizer.*, data.* (sources, stages, weights, seed, shuffle, val_fraction, intra_doc_masking), optim.*, train.seq_len,
global_batch_tokens, seed, use_gpu and precision (the numerics), zero_stage (DeepSpeed's files are laid out per
stage), the post-training sections (sft.*, dpo.*, grpo.*: data, init_from, losses, sampling, num_engines, ...), and
any key not listed above: a key added to the config later is refused until someone decides it is harmless.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import yaml

from raysmol import storage
from raysmol.config import Config, ConfigError
from raysmol.train import checkpoint as ckpt
from raysmol.train.schedule import lr_multiplier

log = logging.getLogger(__name__)

NEVER_COMPARED = ("run.name", "run.output_dir", "train.allow_changes")
HARMLESS = (
    "train.eval_every", "train.eval_batches", "train.eval_suite", "train.eval_suite_samples", "train.log_every",
    "train.checkpoint_every", "train.keep_checkpoints", "train.keep_every", "train.export_every",
    "train.sample_prompts", "train.sample_max_tokens",
    "train.num_workers", "train.min_workers", "train.micro_batch_size", "train.elastic_resize_interval_s",
    "train.max_failures", "train.cpu_threads_per_worker", "train.peak_flops",
    "train.activation_checkpointing", "train.compile", "train.liger", "model.attn_implementation",
    "data.cache_dir", "run.category", "run.trackers", "run.mlflow_uri", "run.project", "faults", "guard", "watchdog",
    "grpo.cpus_per_engine", "grpo.gpus_per_engine", "grpo.reward_tasks", "grpo.reward_cpus",
    "grpo.rollout_timeout_s", "grpo.sync_timeout_s", "grpo.verify_sync",
    "grpo.weight_sync", "grpo.sync_bucket_mb",
)
STEPS = "train.steps"
HARMLESS_WHY = "harmless"
ALLOWED_WHY = "train.allow_changes"


class _NotSet:
    """A key present in one config only (a list entry added or removed, a key of another raysmol version)."""

    def __repr__(self) -> str:
        return "(not set)"


NOT_SET = _NotSet()


def covers(prefix: str, key: str) -> bool:
    """`data.sources` covers data.sources and data.sources.0.weight, not data.sources_extra."""
    return key == prefix or key.startswith(prefix + ".")


def diff(old: Any, new: Any, key: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old, new) for every value that differs; an entry present on one side only is one item."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in [*old, *(k for k in new if k not in old)]:
            sub = f"{key}.{k}" if key else str(k)
            out += diff(old.get(k, NOT_SET), new.get(k, NOT_SET), sub) if k in old and k in new else \
                [(sub, old.get(k, NOT_SET), new.get(k, NOT_SET))]
        return out
    if isinstance(old, list) and isinstance(new, list):
        out = []
        for i in range(max(len(old), len(new))):
            sub = f"{key}.{i}"
            out += diff(old[i], new[i], sub) if i < len(old) and i < len(new) else \
                [(sub, old[i] if i < len(old) else NOT_SET, new[i] if i < len(new) else NOT_SET)]
        return out
    return [] if old == new else [(key, old, new)]


def node_keys(tree: Any, key: str = "") -> set[str]:
    """Every dotted key of a config dict, sections and list entries included (what an allowance may name)."""
    out = {key} if key else set()
    if isinstance(tree, dict):
        for k, v in tree.items():
            out |= node_keys(v, f"{key}.{k}" if key else str(k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out |= node_keys(v, f"{key}.{i}")
    return out


def check_allowances(cfg: Config, *others: dict) -> None:
    """Every train.allow_changes entry names a key of the config (or of `others`): a typo would allow nothing."""
    known = node_keys(_plain(cfg.to_dict()))
    for other in others:
        known |= node_keys(other)
    for i, entry in enumerate(cfg.train.allow_changes):
        if entry not in known:
            near = sorted(k for k in known if k.count(".") <= 1 and entry.split(".")[0] == k.split(".")[0])
            raise ConfigError(f"{cfg.origin}: train.allow_changes.{i}: {entry!r} names no config key; it takes dotted "
                              f"keys or prefixes such as {', '.join(near[:8]) or 'data.sources, optim.lr'}")


def compare(old: dict, cfg: Config, step: int, where: str = "the checkpoint") -> dict[str, Any]:
    """Compare the config `old` that a checkpoint at `step` was trained with against `cfg`. Returns the resume
    record ({step, changes: [{key, old, new, allowed_by}], warnings}); raises ConfigError naming every change
    that alters the trajectory and is not allowed by train.allow_changes, or a train.steps below `step`.
    `where` names the checkpoint and the file the old config came from, for messages."""
    new = _plain(cfg.to_dict())
    old = _plain(old)
    check_allowances(cfg, old)
    allowed, refused, warnings = [], [], []
    for key, a, b in diff(old, new):
        if any(covers(p, key) for p in NEVER_COMPARED):
            continue
        if key == STEPS and isinstance(a, int) and isinstance(b, int):
            if b < step:
                raise ConfigError(f"{cfg.origin}: train.steps: {b} is below step {step} of {where}; a run cannot go "
                                  f"back: set train.steps >= {step} (was {a}), or use a new run.name to start over")
            warning = _schedule_warning(cfg, a, b, step)
            if warning:
                warnings.append(warning)
        why = (HARMLESS_WHY if key == STEPS or any(covers(p, key) for p in HARMLESS)
               else ALLOWED_WHY if any(covers(p, key) for p in cfg.train.allow_changes) else None)
        change = {"key": key, "old": _shown(a), "new": _shown(b), "allowed_by": why}
        (allowed if why else refused).append(change)
    if refused:
        lines = "\n".join(f"  {c['key']}: {_text(c['old'])} -> {_text(c['new'])}" for c in refused)
        prefixes = list(dict.fromkeys(_prefix(c["key"]) for c in refused))
        raise ConfigError(
            f"{cfg.origin}: resuming from {where} (step {step}): these config changes alter the training "
            f"trajectory:\n{lines}\nTo continue with them anyway, allow them: "
            f"train.allow_changes='[{', '.join(prefixes)}]' (dotted keys or prefixes, in the config or on the command "
            "line); to start over, use a new run.name.")
    for c in allowed:
        log.warning("resume from %s: %s: %s -> %s (%s)", where, c["key"], _text(c["old"]), _text(c["new"]),
                    "allowed by train.allow_changes" if c["allowed_by"] == ALLOWED_WHY else "harmless")
    for w in warnings:
        log.warning("resume from %s: %s", where, w)
    return {"step": step, "changes": allowed, "warnings": warnings}


def recorded_config(run_dir: str) -> tuple[int, str, dict | None, str | None] | None:
    """The newest committed checkpoint of a run directory (one with state.json: resume never loads one without)
    as (step, its URI, the config it was trained with, the file that config came from); None when there is none.
    Its config is state.json's, else (a checkpoint from before configs were recorded there) config.yaml's, else
    None."""
    for step, uri in ckpt.candidates(storage.join(run_dir, "checkpoints")):
        state_uri = storage.join(uri, ckpt.STATE_FILE)
        if not storage.exists(state_uri):
            continue
        try:
            state = json.loads(storage.read_text(state_uri))
        except (ValueError, OSError):
            continue  # unreadable: resume rejects it too and falls back to an older one
        if isinstance(state.get("config"), dict):
            return step, uri, state["config"], state_uri
        yaml_uri = storage.join(run_dir, "config.yaml")
        if storage.exists(yaml_uri):
            return step, uri, yaml.safe_load(storage.read_text(yaml_uri)) or {}, yaml_uri
        return step, uri, None, None
    return None


def check(cfg: Config, run_dir: str) -> dict[str, Any] | None:
    """The driver's check before training: None for a fresh run, else the resume record for summary.json
    ({checkpoint, step, config_from, changes, warnings}). Raises ConfigError (see `compare`)."""
    check_allowances(cfg)
    found = recorded_config(run_dir)
    if found is None:
        return None
    step, uri, old, source = found
    if old is None:
        msg = f"{uri} records no config and {run_dir} has no config.yaml: config changes cannot be checked"
        log.warning("resume: %s", msg)
        return {"checkpoint": uri, "step": step, "config_from": None, "changes": [], "warnings": [msg]}
    record = compare(old, cfg, step, where=uri if source.endswith(ckpt.STATE_FILE) else f"{uri} (config from {source})")
    return {"checkpoint": uri, "config_from": source, **record}


def _schedule_warning(cfg: Config, old_steps: int, new_steps: int, step: int) -> str | None:
    """A warning when changing train.steps changes the lr the run resumes at (the schedule's shape depends on
    it); the new optim section stands for both, so only the effect of train.steps is judged."""
    o = cfg.optim
    before, after = lr_multiplier(o, old_steps)(step), lr_multiplier(o, new_steps)(step)
    if abs(before - after) <= 1e-9 * max(1.0, abs(before)):
        return None
    why = ("cosine spreads its decay over train.steps" if o.schedule == "cosine" else
           "wsd's decay phase moves with train.steps")
    return (f"train.steps {old_steps} -> {new_steps} changes the {o.schedule} schedule at the resumed step {step}: "
            f"lr {o.lr * before:.4g} -> {o.lr * after:.4g} ({why}); the loss curve may jump there")


def _plain(tree: Any) -> Any:
    """JSON's types (tuples as lists), as state.json and config.yaml hold them."""
    return json.loads(json.dumps(tree))


def _prefix(key: str) -> str:
    """The allowance to suggest: a list's key rather than one entry's (data.sources, not data.sources.0.weight)."""
    parts = key.split(".")
    cut = next((i for i, p in enumerate(parts) if p.isdigit()), len(parts))
    return ".".join(parts[:cut])


def _shown(v: Any) -> Any:
    return repr(NOT_SET) if v is NOT_SET else v


def _text(v: Any) -> str:
    return v if v == repr(NOT_SET) else json.dumps(v)
