"""The one training loop (runs in every Ray Train worker): objective-agnostic, state = the step."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from raysmol import storage
from raysmol.config import Config, from_dict
from raysmol.model import flops_per_token, precision, prepare_for_training
from raysmol.train import checkpoint as ckpt
from raysmol.train import export, start
from raysmol.train.faults import Drills
from raysmol.train.guard import DataPlan, GuardedAdamW, GuardError, Sentry, SpikeGuard
from raysmol.train.hooks import Context, Hooks
from raysmol.train.objectives import Objective, to_device
from raysmol.train.schedule import lr_multiplier
from raysmol.train.watchdog import Watchdog

# Dense bf16 peak FLOP/s per GPU, for MFU when train.peak_flops is not set.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "B200": 2250e12, "A100": 312e12, "A800": 312e12,
              "L40S": 362e12, "L4": 121e12, "A10G": 125e12}


def deepspeed_config(cfg: Config, world: int, load_universal: bool = False) -> dict[str, Any]:
    t = cfg.train
    stage3 = {"stage3_gather_16bit_weights_on_model_save": True} if t.zero_stage == 3 else {}
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum(world),
        "train_batch_size": t.micro_batch_size * t.grad_accum(world) * world,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": t.zero_stage, **stage3},
        "bf16": {"enabled": precision(cfg) == "bf16"},
        # torch.optim.AdamW is passed in: DeepSpeed's own AdamW compiles a CPU FusedAdam (~80 s) and changes the numbers.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        # A checkpoint saved at another world size is loaded through DeepSpeed's universal format.
        **({"checkpoint": {"load_universal": True}} if load_universal else {}),
    }


def make_optimizer(cfg: Config, model: torch.nn.Module) -> GuardedAdamW:
    """torch AdamW (guarded); on GPUs the fused multi-tensor kernel (the same update up to rounding)."""
    o = cfg.optim
    return GuardedAdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                        fused=True if cfg.train.use_gpu else None)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on norms, biases and embeddings (the usual LLM recipe, as in OLMo and nanotron)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "embed" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _init_distributed(cfg: Config):
    import sys

    import deepspeed
    import deepspeed.comm.torch  # noqa: F401  (`deepspeed.comm.torch` as an attribute is the torch package)

    if not cfg.train.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # DeepSpeed compiles a shared-memory op (~55 s) that only tensor-parallel inference uses.
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
        torch.set_num_threads(cfg.train.cpu_threads_per_worker)
    deepspeed.init_distributed(dist_backend="nccl" if cfg.train.use_gpu else "gloo")
    return deepspeed


def train_func(loop_config: dict[str, Any]) -> None:
    """Ray Train worker entry point. `loop_config`: config (dict), task, hooks, run_dir, progress."""
    cfg, task, progress = from_dict(loop_config["config"], origin="run config"), loop_config["task"], loop_config["progress"]
    deepspeed = _init_distributed(cfg)
    t, g, rank = cfg.train, cfg.guard, dist.get_rank()
    ctx = Context(cfg, rank, dist.get_world_size(), _device(cfg), loop_config["run_dir"],
                  partial(_log, progress, rank, None, None))
    sentry = Sentry(None, SpikeGuard(g.window, g.min_steps, g.loss_zscore, g.grad_norm_factor), g.action)
    hooks = Hooks([Watchdog(cfg.watchdog, progress), sentry, *task.hooks(), *loop_config["hooks"],
                   Drills(cfg.faults, ctx.run_dir, rank, progress)])
    ctx.log = partial(_log, progress, rank, hooks, ctx)
    hooks.call("setup", ctx)
    batches, val = task.batches(ctx)
    model = prepare_for_training(task.model(ctx), cfg)
    optimizer = make_optimizer(cfg, model)
    plan = DataPlan()  # data skips and lr windows from rollbacks; restored with the checkpoint
    base_lr = lr_multiplier(cfg.optim, t.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: base_lr(s) * plan.lr_factor(s))
    with tempfile.TemporaryDirectory(prefix="raysmol-resume-") as tmp:
        found = _choose_checkpoint(ctx.run_dir, Path(tmp))
        # ZeRO 1-3 shard optimizer state by data-parallel rank: a checkpoint from another world size (an elastic
        # resize, a re-submission with more or fewer workers) is resharded through DeepSpeed's universal format.
        begin = None if found[1] else getattr(task, "start", None)  # continued pretraining: carry from init_from
        universal = (bool(found[1] and found[1]["world_size"] != ctx.world and t.zero_stage > 0)
                     or start.universal_needed(begin, ctx.world, t.zero_stage))
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=deepspeed_config(cfg, ctx.world, universal))
        step, resumed_from = _resume(engine, ctx.run_dir, plan, hooks, rank, found, universal)
        if begin:
            conv = _to_universal(ckpt.fetch(begin.checkpoint, Path(tmp)), begin.state["step"]) if universal else None
            step = start.carry(engine, cfg, begin, plan, scheduler, base_lr, conv)
    optimizer.veto = sentry.veto
    objective = task.objective(cfg)
    ctx.engine, ctx.model, ctx.step = engine, model, step
    nodes: list = [None] * ctx.world
    dist.all_gather_object(nodes, _node_id())  # the recovery report tells a lost node from a lost worker by them
    ctx.log({"event": "start", "step": step, "world_size": ctx.world, "resumed_from": resumed_from["checkpoint"],
             "rejected": resumed_from["rejected"], "nodes": nodes})
    hooks.call("after_restore", ctx)
    if step == 0:
        ctx.log({"step": 0, "tokens": 0, **validate(engine, val, objective, cfg, rank, ctx.world, ctx.device),
                 **hooks.collect("evaluate", ctx)})
    window = Window(cfg, ctx.world)
    while step < t.steps:
        step = ctx.step = step + 1
        ctx.loss_scale = None
        hooks.call("before_step", ctx)
        mbs = batches.micro_batches(plan.data_step(step - 1), rank, ctx.world, t.micro_batch_size)
        window.add(train_step(engine, objective, mbs, ctx.device, sentry, step, ctx.loss_scale, window.extras))
        verdict = sentry.verdict()
        hooks.call("after_update", ctx)
        if verdict:
            ctx.log({"step": step, "event": "spike", "action": g.action, **verdict})
            if g.action == "rollback":
                step = ctx.step = _rollback(engine, ctx, plan, hooks, step)
                hooks.call("after_restore", ctx)
                window.reset()
                continue
        eval_due = t.eval_due(step)
        if window.due(step, eval_due):
            row = {**window.row(step, engine, batches.position(plan.data_step(step - 1))), **hooks.collect("metrics", ctx)}
            if eval_due:  # every rank evaluates (ZeRO-3 forwards are collective); rank 0 logs
                row.update({**validate(engine, val, objective, cfg, rank, ctx.world, ctx.device),
                            **hooks.collect("evaluate", ctx)})
            ctx.log(row)
            window.reset()
        hooks.call("before_checkpoint", ctx)
        if t.checkpoint_due(step):
            _save_and_report(engine, ctx, plan, hooks)
            window.reset()  # checkpoint time is not step time
        if t.export_due(step):
            _export_step(engine, model, ctx, hooks)
            window.reset()
    sd = ckpt.full_state_dict(engine)
    if rank == 0:
        _export(model, sd, storage.join(ctx.run_dir, "hf"))
    hooks.call("teardown", ctx)
    dist.barrier()


class Window:
    """The logging interval: losses and objective metrics stay on the device until a row is due (no host sync
    inside it); a row's throughput counts only the steps since the last row, rollback or checkpoint."""

    def __init__(self, cfg: Config, world: int):
        self.t, self.world, self.first = cfg.train, world, True
        self.tpf = flops_per_token(cfg)
        self.peak = cfg.train.peak_flops or (_gpu_peak() if cfg.train.use_gpu else None)
        self.reset()

    def reset(self) -> None:
        self.since, self.steps = time.perf_counter(), 0
        self.losses: list[torch.Tensor] = []
        self.extras: list[dict[str, torch.Tensor]] = []  # the objective's own metrics, appended by train_step

    def add(self, losses: list[torch.Tensor]) -> None:
        self.losses += losses
        self.steps += 1

    def due(self, step: int, eval_due: bool) -> bool:
        return step % self.t.log_every == 0 or bool(eval_due) or self.first

    def row(self, step: int, engine, data: dict[str, Any]) -> dict[str, Any]:
        """The row for `step`, averaged over ranks (these all-reduces are the point of logging)."""
        self.first = False
        elapsed = time.perf_counter() - self.since
        tps = self.steps * self.t.global_batch_tokens / elapsed
        return {"step": step, "tokens": step * self.t.global_batch_tokens,
                "loss": _mean_across_ranks(torch.stack(self.losses).mean()), "grad_norm": _grad_norm(engine),
                "lr": engine.get_lr()[0], "step_time": elapsed / self.steps, "tokens_per_s": tps,
                "tokens_per_s_per_worker": tps / self.world,
                "mfu": tps * self.tpf / (self.peak * self.world) if self.peak else None, **data,
                **{k: _across_ranks(torch.stack([e[k] for e in self.extras]), k)
                   for k in (self.extras[0] if self.extras else ())}}


def train_step(engine, objective: Objective, mbs: list, device, sentry: Sentry, step: int,
               mult: float | None = None, extras: list | None = None) -> list[torch.Tensor]:
    """One optimizer step over this rank's micro-batches; returns their losses (on the device) and appends the
    objective's own metrics (DPO's reward margin, GRPO's reward; device tensors) to `extras`.

    Nothing here waits on the GPU except the guard's one loss all-reduce per step (by design: every step is
    judged) and what DeepSpeed's step needs for clipping; the logging syncs happen in the caller, every log_every.
    """
    losses = []
    for i, mb in enumerate(mbs):
        loss, metrics = objective(engine, to_device(mb, device, engine))
        if extras is not None and metrics:
            extras.append(metrics)
        loss = loss * mult if mult is not None else loss
        engine.backward(loss)
        losses.append(loss.detach())
        if i == len(mbs) - 1:
            sentry.before_update(step, losses)
        engine.step()
    return losses


def _device(cfg: Config) -> torch.device:
    if not cfg.train.use_gpu:
        return torch.device("cpu")
    import ray.train.torch

    return ray.train.torch.get_device()


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # not in a Ray worker (a unit test)
        return None


def _choose_checkpoint(run_dir: str, tmp: Path) -> tuple[Path | None, dict | None, list[dict]]:
    """The newest committed checkpoint on storage (Ray's registered one, or a newer complete one whose
    registration was lost); damaged or torn folders are skipped and reported. Every rank must agree."""
    folder, state, rejected = ckpt.newest_valid(storage.join(run_dir, "checkpoints"), tmp)
    steps = [None] * dist.get_world_size()
    dist.all_gather_object(steps, state["step"] if state else None)
    if len(set(steps)) != 1:
        raise ckpt.CheckpointError(f"ranks disagree on the checkpoint to resume from: steps {steps}")
    return folder, state, rejected


def _resume(engine, run_dir: str, plan: DataPlan, hooks: Hooks, rank: int, found,
            universal: bool = False) -> tuple[int, dict]:
    """Load the chosen checkpoint (model, optimizer, scheduler, RNG, data plan, hook state); returns the step to
    run next."""
    folder, state, rejected = found
    info = {"checkpoint": None, "rejected": rejected}
    if state is None:
        return 0, info
    if universal:
        state = ckpt.verify(folder)
        ckpt.load_universal(engine, _to_universal(folder, state["step"]))
    else:
        state = ckpt.load(engine, folder)
    ckpt.set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
    _restore_plan(plan, state, run_dir)
    hooks.load_state_dict(state.get("hooks", {}))
    info["checkpoint"] = storage.join(run_dir, "checkpoints", f"checkpoint_{state['step']:08d}")
    return state["step"], info


def _to_universal(folder: Path, step: int) -> Path:
    """Convert once per node (local rank 0) into a node-local folder every local rank then reads."""
    import hashlib
    import subprocess
    import sys

    out = Path(tempfile.gettempdir()) / "raysmol-universal" / hashlib.sha256(f"{folder}:{step}".encode()).hexdigest()[:16]
    if int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0 and not (out / "done").exists():
        subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                        str(folder / ckpt.DS_TAG), "--output_folder", str(out / ckpt.DS_TAG), "--inject_missing_state",
                        "--num_extract_workers", "1", "--num_merge_workers", "1"],
                       check=True, capture_output=True, env={**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")})
        (out / "done").write_text("ok")
    dist.barrier()
    return out


def _restore_plan(plan: DataPlan, state: dict[str, Any], run_dir: str) -> None:
    # guard.json (written at each rollback) supersedes the checkpoint's plan: a crash between a rollback and
    # the next checkpoint must not forget the data window it skipped.
    guard_file = storage.join(run_dir, "guard.json")
    saved = json.loads(storage.read_text(guard_file))["plan"] if storage.exists(guard_file) else state["data"].get("plan")
    restored = DataPlan.from_dict(saved)
    plan.skips[:], plan.lr_windows[:] = restored.skips, restored.lr_windows


def _rollback(engine, ctx: Context, plan: DataPlan, hooks: Hooks, step: int) -> int:
    """After a spike at `step`: reload the last good checkpoint and skip `guard.skip_batches` batches of data from
    the spike on; returns the step to run next."""
    g, spike = ctx.cfg.guard, step - 1  # the spike's data step
    guard_file = storage.join(ctx.run_dir, "guard.json")
    done = json.loads(storage.read_text(guard_file))["rollbacks"] if storage.exists(guard_file) else 0
    if done >= g.max_rollbacks:
        raise GuardError(f"loss spike at step {step} after {done} rollbacks (guard.max_rollbacks={g.max_rollbacks}); "
                         "stopping instead of burning compute on a diverging run: inspect metrics.jsonl, then lower "
                         "optim.lr, raise guard.skip_batches or guard.max_rollbacks")
    plan.skips.append((spike, g.skip_batches))
    if g.lr_steps:
        plan.lr_windows.append((spike, spike + g.lr_steps, g.lr_factor))
    dist.barrier()
    if ctx.rank == 0:
        storage.write_text(guard_file, json.dumps({"rollbacks": done + 1, "plan": plan.to_dict()}))
    dist.barrier()
    with tempfile.TemporaryDirectory(prefix="raysmol-rollback-") as tmp:
        found = _choose_checkpoint(ctx.run_dir, Path(tmp))
        if found[1] and found[1]["world_size"] != ctx.world:
            raise GuardError(f"loss spike at step {step}: the last checkpoint was saved at world size "
                             f"{found[1]['world_size']}; an in-run rollback needs one from this world size")
        to_step, info = _resume(engine, ctx.run_dir, plan, hooks, ctx.rank, found)
    if info["checkpoint"] is None:
        raise GuardError(f"loss spike at step {step} but no checkpoint to roll back to; "
                         "lower train.checkpoint_every or use guard.action: skip")
    ctx.log({"step": step, "event": "rollback", "to_step": to_step, "checkpoint": info["checkpoint"],
             "skip_batches": g.skip_batches, "lr_factor": g.lr_factor, "lr_steps": g.lr_steps, "rollbacks": done + 1})
    return to_step


@torch.no_grad()
def validate(engine, val, objective: Objective, cfg: Config, rank: int, world: int,
             device) -> dict[str, float]:
    """The objective's mean loss (`val_loss`) and metrics (`val_<name>`) over the same eval_batches x
    samples_per_step held-out samples at any world size; {} without held-out data."""
    if val is None:
        return {}
    n = cfg.train.eval_batches * cfg.train.samples_per_step()
    mine = np.arange(rank, n, world)
    sums: dict[str, torch.Tensor] = {}
    engine.eval()
    for chunk in np.array_split(mine, max(1, math.ceil(len(mine) / cfg.train.micro_batch_size))):
        if len(chunk) == 0:
            continue
        loss, metrics = objective(engine, to_device(val.samples(chunk), device, engine))
        for k, v in {"val_loss": loss, **{f"val_{k}": v for k, v in metrics.items()}}.items():
            sums[k] = sums.get(k, 0) + v.double() * len(chunk)
    engine.train()
    # Every rank has samples (n >= world), so every rank holds the same keys in the same order.
    total = torch.stack([*sums.values(), torch.tensor(float(len(mine)), dtype=torch.float64, device=device)])
    dist.all_reduce(total)
    return {k: float(v / total[-1]) for k, v in zip(sums, total)}


# An objective's metric named *_max or *_min is an extreme (GRPO's largest ratio): a mean of maxima would hide it.
_EXTREMES = {"_max": (torch.amax, dist.ReduceOp.MAX), "_min": (torch.amin, dist.ReduceOp.MIN)}


def _across_ranks(values: torch.Tensor, key: str) -> float:
    """An objective's metric over the window's micro-batches and every rank: the extreme for *_max/*_min keys,
    the mean for the rest."""
    if key[-4:] not in _EXTREMES:
        return _mean_across_ranks(values.mean())
    local, op = _EXTREMES[key[-4:]]
    x = local(values).detach().double().clone()
    dist.all_reduce(x, op=op)
    return float(x)


def _mean_across_ranks(x: torch.Tensor) -> float:
    x = x.detach().double().clone()
    dist.all_reduce(x)
    return float(x) / dist.get_world_size()


def _grad_norm(engine) -> float | None:
    g = engine.get_global_grad_norm()
    if g is None:
        return None
    g = float(g)
    return g if math.isfinite(g) else float("nan")


def _gpu_peak() -> float | None:
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def _log(progress, rank: int, hooks: Hooks | None, ctx: Context | None, metrics: dict[str, Any]) -> None:
    if rank != 0:
        return
    if progress is not None:
        # Fire and forget: the driver writes metrics.jsonl and the progress bar.
        progress.log.remote({**metrics, "time": time.time()})
    if hooks is not None:
        hooks.logged(ctx, metrics)  # experiment trackers (raysmol/train/trackers.py)


def _save_and_report(engine, ctx: Context, plan: DataPlan, hooks: Hooks) -> None:
    import ray.train

    cfg, step = ctx.cfg, ctx.step
    rngs: list = [None] * ctx.world
    dist.all_gather_object(rngs, ckpt.rng_state())
    state = {"step": step, "tokens": step * cfg.train.global_batch_tokens, "world_size": ctx.world,
             "zero_stage": cfg.train.zero_stage, "config_hash": cfg.hash(),
             "config": cfg.to_dict(),  # what a re-submission is compared against (raysmol/train/resume_check.py)
             "data": {"next_sample": plan.data_step(step) * cfg.train.samples_per_step(), "plan": plan.to_dict()},
             "rng": rngs, "hooks": hooks.state_dict()}
    dir_name = f"checkpoint_{step:08d}"
    with tempfile.TemporaryDirectory(prefix="raysmol-ckpt-") as d:
        ckpt.save(engine, Path(d), state)
        # The retention score makes Ray Train keep the train.keep_every checkpoints (checkpoint.ray_retention).
        metrics = {"step": step, ckpt.RETENTION_METRIC: ckpt.retention_score(step, cfg.train.keep_every)}
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=dir_name,
                         checkpoint_upload_fn=lambda c, name: _upload(c, name, ctx, hooks))
    hooks.call("after_checkpoint", ctx)
    if ctx.rank == 0:
        # Only what lies beyond Ray's own retention window: a complete folder inside it may be registered with Ray
        # while the snapshot read here is stale, and deleting it under Ray fails the run (seen with keep_every).
        ckpt.prune(storage.join(ctx.run_dir, "checkpoints"), ckpt.ray_retention(cfg.train)["num_to_keep"],
                   cfg.train.keep_every)


def _upload(checkpoint, dir_name: str, ctx: Context, hooks: Hooks):
    """Every rank uploads its files, then rank 0 uploads state.json: it lands only once the checkpoint is whole,
    so a save killed midway leaves a folder without state.json, which resume never loads."""
    import ray.train

    local = Path(checkpoint.path)
    dest = storage.join(ctx.run_dir, "checkpoints", dir_name)
    files = sorted(p for p in local.rglob("*") if p.is_file() and p.name != ckpt.STATE_FILE)
    for i, f in enumerate(files):
        storage.upload_file(f, storage.join(dest, f.relative_to(local).as_posix()))
        if i == 0:
            hooks.call("during_save", ctx)
    dist.barrier()
    if ctx.rank == 0:
        storage.upload_file(local / ckpt.STATE_FILE, storage.join(dest, ckpt.STATE_FILE))
    dist.barrier()
    path, fs = storage.ray_storage(dest)
    return ray.train.Checkpoint(path, filesystem=fs)


def _export(model, state_dict, hf_uri: str, tokenizer_uri: str | None = None) -> None:
    export.write(model, state_dict, hf_uri, tokenizer_uri)


def _export_step(engine, model, ctx: Context, hooks: Hooks) -> None:
    """exports/step_<step>/ (train.export_every): every rank calls this (the ZeRO-3 gather is collective). The
    tokenizer comes from <run_dir>/tokenizer/, which the driver wrote: workers may not see the driver's disk."""
    sd = ckpt.full_state_dict(engine)
    ctx.export_dir = export.export_dir(ctx.run_dir, ctx.step)
    if ctx.rank == 0:
        _export(model, sd, ctx.export_dir, storage.join(ctx.run_dir, export.TOKENIZER_DIR))
        ctx.log({"step": ctx.step, "event": "export", "path": ctx.export_dir})
    del sd
    hooks.call("after_export", ctx)
    # The other ranks wait here, inside this step's (export-sized) watchdog bound, not in the next step's
    # collective while rank 0's hooks work.
    dist.barrier()
