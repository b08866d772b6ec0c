"""Ray glue for every training run: a task's preparation, TorchTrainer, progress, the run directory's summary."""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any, Callable

import ray

from raysmol import ledger, storage
from raysmol.config import Config
from raysmol.model import flops_per_token, param_count
from raysmol.rundir import MetricsFile, plot_loss, recovery_report, run_dir
from raysmol.runtime import init_ray, say
from raysmol.train import checkpoint as ckpt
from raysmol.train import export
from raysmol.train import resume_check, worker_logs
from raysmol.train.hooks import Hook
from raysmol.train.loop import train_func
from raysmol.train.samples import ExportSamples
from raysmol.train.task import Task
from raysmol.train.trackers import Trackers


@ray.remote(num_cpus=0)
class Progress:
    """Rank 0 pushes metrics here (fire and forget); the driver polls them for the bar and metrics.jsonl."""

    def __init__(self):
        self.rows: list[dict[str, Any]] = []
        self.nodes: list[str] = []  # the nodes of the last attempt's ranks

    def log(self, metrics: dict[str, Any]) -> None:
        if metrics.get("event") == "start":
            # A restart whose previous attempt had a rank on a node that is gone: the recovery report's cause.
            alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
            metrics["lost_nodes"] = sorted({n for n in self.nodes if n and n not in alive})
            self.nodes = metrics.get("nodes") or []
        self.rows.append(metrics)

    def since(self, i: int) -> list[dict[str, Any]]:
        return self.rows[i:]


def train(cfg: Config, task: Task, hooks: list[Hook] | tuple[Hook, ...] = (), *, show_progress: bool = True,
          on_rows: Callable[[list[dict[str, Any]]], None] | None = None) -> dict[str, Any]:
    """Train a prepared task (`task.prepare` has run) on Ray Train + DeepSpeed, export, and write the run directory.
    `hooks` join the task's own in every worker; `on_rows` sees every batch of new metrics rows as they arrive (an
    ablation trial reports them to Tune)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    init_ray()
    rd = run_dir(cfg)
    # Before config.yaml is overwritten and any worker starts: a re-submission must not change the trajectory
    # of the run it continues unless the config says so (raysmol/train/resume_check.py).
    try:
        resumed = resume_check.check(cfg, rd)
        # ExportSamples reads train.sample_prompts here, on the driver; Trackers checks the trackers' packages
        # before any worker starts.
        hooks = [*hooks, *ExportSamples.for_config(cfg), Trackers(cfg)]
    except BaseException:
        task.close()  # what prepare started (GRPO's engine actors)
        raise
    storage.makedirs(rd)
    storage.write_text(storage.join(rd, "config.yaml"), cfg.to_yaml())
    # On run storage, which every node reaches: exports made by the workers (train.export_every) and `raysmol
    # export` take the tokenizer from here; task.tokenizer_dir is on the driver's disk only.
    export.copy_tokenizer(str(task.tokenizer_dir), storage.join(rd, export.TOKENIZER_DIR))

    # Pinned to the driver's node: placed anywhere, losing a worker node (spot loss) would take it along.
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    progress = Progress.options(scheduling_strategy=here).remote()
    loop_config = {"config": cfg.to_dict(), "task": task, "hooks": list(hooks), "progress": progress, "run_dir": rd}
    storage_path, storage_fs = storage.ray_storage(rd)
    t = cfg.train
    trainer = TorchTrainer(
        train_func,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=_workers(t), use_gpu=t.use_gpu,
                                     resources_per_worker=None if t.use_gpu else {"CPU": 1},
                                     elastic_resize_monitor_interval_s=t.elastic_resize_interval_s),
        run_config=RunConfig(name="checkpoints", storage_path=storage_path, storage_filesystem=storage_fs,
                             checkpoint_config=CheckpointConfig(**ckpt.ray_retention(t)),
                             failure_config=FailureConfig(max_failures=t.max_failures)),
    )
    metrics = MetricsFile(storage.join(rd, "metrics.jsonl"))
    started = time.time()
    # A driver starting on a run directory with rows already in it is a re-submission: the recovery report tells
    # it apart from a worker lost mid-run.
    metrics.add([{"event": "submit", "time": started, "resumed": resumed is not None}])
    say(f"training: {t.steps} steps on {_workers(t)} worker(s), run directory {rd}")
    try:
        result = _fit_with_progress(trainer, progress, metrics, t.steps, show_progress, on_rows, task.verb)
    except BaseException:
        task.close()
        logs = worker_logs.collect(rd)
        if logs:
            say(f"the run failed; its processes' logs are in {logs}")
        raise
    task.close()
    worker_logs.collect(rd)
    wall = time.time() - started

    # The tokenizer files beside the weights rank 0 exported, and only those: a tokenizer taken from a model
    # folder (continued pretraining) sits beside that folder's own weights, which must not replace the trained ones.
    export.copy_tokenizer(str(task.tokenizer_dir), storage.join(rd, "hf"))
    summary = {**_summary(cfg, metrics.rows, wall, result, rd), "resume": resumed, **task.summarise(cfg, metrics.rows)}
    storage.write_text(storage.join(rd, "summary.json"), json.dumps(summary, indent=1))
    ledger.record_run(rd, cfg, wall, metrics.rows, started, summary["recovery"])
    plot_loss(metrics.rows, rd)
    return summary


def _workers(t) -> int | tuple[int, int]:
    """A fixed size, or (min, max) for elastic training (Ray Train V2)."""
    return (t.min_workers, t.num_workers) if t.min_workers is not None and t.min_workers < t.num_workers else t.num_workers


def _fit_with_progress(trainer, progress, metrics: MetricsFile, total: int, show: bool, on_rows=None,
                       desc: str = "pretrain"):
    from tqdm import tqdm

    box: dict[str, Any] = {}

    def fit():
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # re-raised on the main thread
            box["error"] = e

    th = threading.Thread(target=fit, daemon=True)
    th.start()
    bar = tqdm(total=total, desc=desc, unit="step", disable=not show, dynamic_ncols=True)
    seen = 0  # index into this run's Progress actor (metrics.rows may hold an earlier attempt's rows)
    last_flush = 0.0
    pending: list[dict[str, Any]] = []
    while True:
        alive = th.is_alive()
        rows = ray.get(progress.since.remote(seen))
        seen += len(rows)
        pending += rows
        for r in rows:
            if "loss" in r:
                bar.n = r["step"]
                bar.set_postfix(loss=f"{r['loss']:.3f}", tok_s=f"{r['tokens_per_s']:.0f}", refresh=False)
                bar.refresh()
        # Rows someone else acts on are on storage first: Tune may stop (kill) an ablation trial on them.
        if pending and (not alive or time.time() - last_flush > 5 or (rows and on_rows is not None)):
            metrics.add(pending)
            pending, last_flush = [], time.time()
        if rows and on_rows is not None:
            on_rows(rows)
        if not alive:
            break
        time.sleep(0.5)
    bar.close()
    if "error" in box:
        raise box["error"]
    return box["result"]


def _summary(cfg: Config, rows: list[dict], wall: float, result, rd: str) -> dict[str, Any]:
    train_rows = [r for r in rows if "loss" in r]
    val = [r for r in rows if r.get("val_loss") is not None]
    ckpt = result.checkpoint.path if result.checkpoint else None
    return {
        "run": cfg.run.name,
        "steps": train_rows[-1]["step"] if train_rows else 0,
        "tokens": train_rows[-1]["tokens"] if train_rows else 0,
        "first_loss": train_rows[0]["loss"] if train_rows else None,
        "last_loss": train_rows[-1]["loss"] if train_rows else None,
        "initial_val_loss": val[0]["val_loss"] if val else None,
        "final_val_loss": val[-1]["val_loss"] if val else None,
        "wall_time_s": wall,
        "parameters": param_count(cfg),
        "flops_per_token": flops_per_token(cfg),
        "checkpoint": (storage.join(rd, "checkpoints", os.path.basename(ckpt)) if ckpt else None),
        "events": [r for r in rows if r.get("event") in ("spike", "rollback")],
        "recovery": recovery_report(rows),
        "export": storage.join(rd, "hf"),
        "exports": [uri for _, uri in export.exports(rd)],  # train.export_every
        "data": {},  # the task's: per-source tokens and epochs for pretraining
    }


