"""Hangs are failures: a rank that stops making progress is dumped and exits, so Ray Train restarts the worker
group from the newest checkpoint instead of waiting out the process group's timeout (30 minutes).

A daemon thread in every worker watches the loop's events. The bound on each window:

    start-up, restore   setup or a rollback's reload to the next step    watchdog.other_timeout_s
    a step              before_step(s) to before_step(s+1)              max(step_timeout_s, step_multiple x median)
                        (the median of the last 20 such windows; the first step after a (re)start, and a step
                        followed by validation, a checkpoint or an export, get other_timeout_s; before any step
                        was timed, step_timeout_s)
    the end             the last step's save, the final export          other_timeout_s

A rank that stops stalls the others in their next collective. A rank waiting inside a collective (torch.distributed,
DeepSpeed's comm) is given half its bound again before it acts, so the rank stuck elsewhere (the cause) is the one
that reports first; when every rank waits in a collective they all report. The recovery report names a rank stuck
outside a collective over one inside (raysmol.rundir.recovery_report).

On timeout it writes <run>/hangs/rank<r>-step<s>-<time>.txt (the Python stack of every thread, and `py-spy dump`,
the tool Ray's own `ray stack` and dashboard use, where it is installed and allowed to attach), logs a `hang` event
with the rank, step, window and the innermost frames it was stuck in, then exits with status 75. The report has
REPORT_TIMEOUT_S: a dump that blocks (storage that does not answer, the progress actor gone) never keeps a hung rank
alive, and py-spy reads the stacks without pausing the process (its pause would freeze the thread that times it).

Limits: a thread that holds the GIL inside C code starves this thread too (Ray Train's worker health check is then
the backstop); a rank blocked in the kernel with the GIL released (gloo, NCCL, I/O, a Ray call) is caught.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import threading
import time
import traceback
from collections import deque
from typing import Any, Callable

from raysmol import storage
from raysmol.config import WatchdogConfig
from raysmol.train.hooks import Context, Hook

EXIT_STATUS = 75  # EX_TEMPFAIL: try again (Ray Train restarts the group)
VICTIM_GRACE = 1.5  # x the bound, for a rank waiting in a collective on another
REPORT_TIMEOUT_S = 45.0  # the dump's own bound: past it the rank exits with what was written
_COLLECTIVES = (f"{os.sep}torch{os.sep}distributed{os.sep}", f"{os.sep}deepspeed{os.sep}comm{os.sep}")
_STDLIB = sysconfig.get_paths()["stdlib"]
_HOME = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the folder holding raysmol/
_OURS = os.path.join(_HOME, "raysmol") + os.sep


class Watchdog(Hook):
    """The loop hook (raysmol/train/hooks.py); first in the list, so its beats come before any other hook runs."""

    def __init__(self, cfg: WatchdogConfig, progress=None, exit_fn: Callable[[int], Any] = os._exit,
                 poll_s: float = 1.0, report_timeout_s: float = REPORT_TIMEOUT_S):
        self.cfg, self.progress, self.exit_fn, self.poll_s = cfg, progress, exit_fn, poll_s
        self.report_timeout_s = report_timeout_s
        self.window: tuple[str, int, float, float] | None = None  # (what, step, since, bound): one atomic swap
        self.hang: dict[str, Any] | None = None  # the event, once it fired

    # --- the loop's events ---------------------------------------------------------------------------------------

    def setup(self, ctx: Context) -> None:
        if not self.cfg.enabled:
            return
        self._ctx, self._target = ctx, threading.current_thread()
        self._durations: deque[float] = deque(maxlen=20)
        self._step_started: float | None = None
        self._first = True
        self._beat("start-up", ctx.step, self.cfg.other_timeout_s)
        self._thread = threading.Thread(target=self._watch, name="raysmol-watchdog", daemon=True)
        self._thread.start()

    def after_restore(self, ctx: Context) -> None:
        self._first = True  # the next step pays warm-up (a fresh start, a resume or a rollback)
        self._beat("restore", ctx.step, self.cfg.other_timeout_s)

    def before_step(self, ctx: Context) -> None:
        if not self.cfg.enabled:
            return
        now, t, step = time.monotonic(), ctx.cfg.train, ctx.step
        if self._step_started is not None:
            self._durations.append(now - self._step_started)
        slow = (self._first or t.eval_due(step) or t.checkpoint_due(step) or t.export_due(step)
                or ctx.cfg.faults.at("kill_engine_at_step", step)  # a drill's engine restart is not a hang
                or ctx.cfg.faults.at("hang_sync_at_step", step))  # nor a sync that times out and is redone
        self._first = False
        # Only plain steps are timed, so the median is a step's time, not a save's.
        self._step_started = None if slow else now
        self._beat("step", step, self.cfg.other_timeout_s if slow else self.step_bound(), now)

    def before_checkpoint(self, ctx: Context) -> None:
        f = ctx.cfg.faults
        if f.at("pause_at_step", ctx.step):  # the drill's deliberate sleep (a window to kill a worker in) is not a hang
            self._step_started = None
            self._beat("pause", ctx.step, self.cfg.other_timeout_s + f.pause_seconds)

    # --- the watcher ---------------------------------------------------------------------------------------------

    def step_bound(self) -> float:
        median = statistics.median(self._durations) if self._durations else 0.0
        return max(self.cfg.step_timeout_s, self.cfg.step_multiple * median)

    def _beat(self, what: str, step: int, bound: float, now: float | None = None) -> None:
        if self.cfg.enabled:
            self.window = (what, step, time.monotonic() if now is None else now, bound)

    def _watch(self) -> None:
        while self._target.is_alive():
            what, step, since, bound = self.window
            stuck = time.monotonic() - since
            if stuck > bound and (stuck > VICTIM_GRACE * bound or not in_collective(self._stack())):
                self._report(what, step, stuck, bound)
                self.exit_fn(EXIT_STATUS)
                return
            time.sleep(self.poll_s if stuck > bound else min(self.poll_s, max(0.05, bound - stuck)))

    def _stack(self) -> list[traceback.FrameSummary]:
        frame = sys._current_frames().get(self._target.ident)
        return traceback.extract_stack(frame) if frame is not None else []

    def _report(self, what: str, step: int, stuck: float, bound: float) -> None:
        """The dump (stacks to the run's storage) in a thread of its own, waited for at most report_timeout_s; then
        the hang event, which the recovery report needs even when the dump could not be written."""
        ctx, stack, since = self._ctx, self._stack(), time.time() - stuck
        path = storage.join(ctx.run_dir, "hangs", f"rank{ctx.rank}-step{step:08d}-{int(time.time())}.txt")
        box = {"path": f"(not written within {self.report_timeout_s:g} s)"}

        def dump() -> None:
            text = (f"rank {ctx.rank} (pid {os.getpid()}) made no progress for {stuck:.1f} s (bound {bound:.1f} s) "
                    f"in window {what!r} of step {step}\n\n{_all_threads()}\n{_py_spy()}")
            print(text, file=sys.stderr, flush=True)  # the worker's log too
            try:
                storage.write_text(path, text)
                box["path"] = path
            except Exception as e:  # the dump must not stop the restart
                box["path"] = f"(not written: {e})"

        thread = threading.Thread(target=dump, name="raysmol-watchdog-dump", daemon=True)
        thread.start()
        thread.join(self.report_timeout_s)
        event = {"event": "hang", "rank": ctx.rank, "step": step, "window": what, "stuck_s": round(stuck, 1),
                 "bound_s": round(bound, 1), "since": since, "where": where(stack),
                 "collective": in_collective(stack), "stack": box["path"], "time": time.time()}
        self.hang = event
        if self.progress is not None:
            import ray

            try:
                ray.get(self.progress.log.remote(event), timeout=10)
            except Exception:
                pass


def in_collective(stack: list[traceback.FrameSummary]) -> bool:
    return any(c in f.filename for f in stack for c in _COLLECTIVES)


def where(stack: list[traceback.FrameSummary]) -> str:
    """The innermost frame outside the standard library, and the innermost raysmol frame that led to it."""
    own = [f for f in stack if not _stdlib(f.filename)] or stack
    if not own:
        return "(no Python frames)"
    inner = own[-1]
    out = f"{inner.name} ({_short(inner.filename)}:{inner.lineno})"
    caller = next((f for f in reversed(own[:-1]) if f.filename.startswith(_OURS)), None)
    if caller is not None and not inner.filename.startswith(_OURS):
        out += f", called from {caller.name} ({_short(caller.filename)}:{caller.lineno})"
    return out


def _stdlib(path: str) -> bool:
    return path.startswith(_STDLIB) and "-packages" not in path


def _short(path: str) -> str:
    if path.startswith(_HOME + os.sep):
        return os.path.relpath(path, _HOME)
    return path.rsplit("-packages/", 1)[-1]


def _all_threads() -> str:
    names = {t.ident: t.name for t in threading.enumerate()}
    return "\n".join(f"--- thread {names.get(ident, ident)}\n{''.join(traceback.format_stack(f))}"
                     for ident, f in sys._current_frames().items())


def _py_spy() -> str:
    exe = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(exe):
        return "(py-spy not installed: Python stacks only)"
    try:
        out = subprocess.run([exe, "dump", "--nonblocking", "--pid", str(os.getpid())], capture_output=True,
                             text=True, timeout=20)
        return f"--- py-spy dump\n{out.stdout}{out.stderr}"
    except (OSError, subprocess.SubprocessError) as e:
        return f"(py-spy dump failed: {e})"
