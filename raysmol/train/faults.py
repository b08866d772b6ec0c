"""Fault drills (`faults.` config section): crashes, torn saves, loss spikes and NaNs on demand.

Each drill fires at most once per run: before firing, a marker is written under `<run dir>/faults/`, so the
run that Ray Train restarts gets past the same step. Off unless set.
"""

from __future__ import annotations

import json
import os
import threading
import time

from raysmol import storage
from raysmol.config import FaultsConfig
from raysmol.train.hooks import Context, Hook


class InjectedFault(RuntimeError):
    """Raised by a drill; never by anything else."""


class Drills(Hook):
    """The drills as loop hooks (raysmol/train/hooks.py)."""

    def __init__(self, cfg: FaultsConfig, run_dir: str, rank: int, progress=None):
        self.cfg, self.rank, self.run_dir, self.progress = cfg, rank, run_dir, progress
        self.markers = storage.join(run_dir, "faults")

    def _once(self, name: str) -> bool:
        """True the first time `name` is asked for in this run (across restarts)."""
        marker = storage.join(self.markers, name)
        if storage.exists(marker):
            return False
        storage.write_text(marker, json.dumps({"drill": name, "rank": self.rank, "pid": os.getpid(), "time": time.time()}))
        return True

    def _crash(self, name: str, hard: bool, step: int) -> None:
        if self.progress is not None:  # the recovery report measures from this moment
            import ray

            ray.get(self.progress.log.remote({"event": "fault", "fault": name, "rank": self.rank, "step": step,
                                                 "time": time.time()}))
        if hard:
            os._exit(17)  # no cleanup, no exception: like a segfault or an OOM kill
        raise InjectedFault(f"fault drill: {name}")

    def before_checkpoint(self, ctx: Context) -> None:
        """After the step is logged, before its checkpoint: the window a rehearsal kills a worker in."""
        c = self.cfg
        if c.at("pause_at_step", ctx.step) and self._once(f"pause_at_step-{ctx.step}-rank{self.rank}"):
            time.sleep(c.pause_seconds)

    def after_update(self, ctx: Context) -> None:
        c, step = self.cfg, ctx.step
        if c.at("crash_at_step", step) and self.rank == c.crash_rank and self._once(f"crash_at_step-{step}"):
            self._crash(f"crash rank {self.rank} after step {step}", c.crash_mode == "exit", step)
        if c.at("hang_at_step", step) and self.rank == c.crash_rank and self._once(f"hang_at_step-{step}"):
            threading.Event().wait()  # forever, like a lost collective peer: only the watchdog gets this rank out

    def during_save(self, ctx: Context) -> None:
        """Midway through this rank's upload of a checkpoint: some of its files are on storage, the rest never land."""
        c, step = self.cfg, ctx.step
        if c.at("kill_during_save_at_step", step) and self.rank == c.crash_rank and self._once(f"kill_during_save-{step}"):
            self._crash(f"rank {self.rank} killed while saving step {step}", True, step)

    def after_checkpoint(self, ctx: Context) -> None:
        c, step = self.cfg, ctx.step
        if c.at("crash_after_report_at_step", step) and self.rank == c.crash_rank and self._once(f"after_report-{step}"):
            self._crash(f"rank {self.rank} died right after reporting step {step}", True, step)

    def before_step(self, ctx: Context) -> None:
        """A factor for this step's loss (a spike or NaN drill); the same on every rank."""
        c, step = self.cfg, ctx.step
        if c.at("nan_at_step", step) and self._seen_once_all_ranks(f"nan-{step}"):
            ctx.loss_scale = float("nan")
        elif c.at("spike_at_step", step) and self._seen_once_all_ranks(f"spike-{step}"):
            ctx.loss_scale = c.spike_factor

    def _seen_once_all_ranks(self, name: str) -> bool:
        # Every rank must inject together; each rank keeps its own marker so none races another's.
        return self._once(f"{name}-rank{self.rank}")
