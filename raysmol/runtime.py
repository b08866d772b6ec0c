"""The Ray runtime: join the cluster a job runs in, or start a local one."""

from __future__ import annotations

import logging
import os

VERBOSE_ENV = "RAYSMOL_VERBOSE"  # `raysmol --verbose` sets it; jobs and subprocesses inherit it


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def say(message: str) -> None:
    """One line on the console for a stage of the work (preparing, training, exporting, evaluating)."""
    import sys

    print(f"raysmol: {message}", file=sys.stderr, flush=True)


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in RAY_ADDRESS (as under `ray job submit`), else start a local one.

    Quiet unless verbose: workers' output stays out of the console (the run collects it into <run_dir>/logs,
    raysmol/train/worker_logs.py), Ray's own driver messages below errors and Ray Data's progress bars are off."""
    import ray

    if ray.is_initialized():
        return
    loud = verbose()
    kw = {"log_to_driver": loud, "logging_level": logging.INFO if loud else logging.ERROR}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**kw)
    else:
        # Logical CPUs may exceed physical cores: each worker pins torch to cpu_threads_per_worker threads.
        cpus = num_cpus or max(4, os.cpu_count() or 1)
        ray.init(address="local", num_cpus=cpus, **kw, **_local_system_config(cpus))
    if not loud:
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False


WARM_TASK_WORKERS = 16


def _local_system_config(cpus: int) -> dict:
    """Ray keeps at most `num_workers_soft_limit` idle worker processes (default: its logical CPUs) and kills the
    rest within a second. GRPO on a small machine scores with more tasks (grpo.reward_tasks) than it has logical
    CPUs: their extra workers were killed after every step and started again, importing torch, for the next (up
    to 12 s of a 15 s step on 2 loaded cores). The local cluster keeps WARM_TASK_WORKERS more;
    RAY_num_workers_soft_limit, where set, wins. A cluster's raylets are started by `ray start`, which sets its
    own (see the README's GRPO section)."""
    if "RAY_num_workers_soft_limit" in os.environ:
        return {}
    return {"_system_config": {"num_workers_soft_limit": cpus + WARM_TASK_WORKERS}}
