"""Hang detection (raysmol/train/watchdog.py) without Ray: a loop thread that stops making progress is caught
within its bound, dumped and exited; the real drill through Ray Train is in test_resilience.py."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from raysmol.config import ConfigError, load_config
from raysmol.rundir import recovery_report
from raysmol.train.hooks import Context
from raysmol.train import watchdog
from raysmol.train.watchdog import EXIT_STATUS, Watchdog


def _stuck_in_a_collective(release: threading.Event) -> None:
    release.wait()


def config(watchdog: dict, train: dict | None = None):
    return load_config(None, [f"watchdog.{k}={v}" for k, v in watchdog.items()]
                       + [f"train.{k}={v}" for k, v in (train or {}).items()])


def drive(tmp_path: Path, watchdog: dict, steps: int, step_s: float, report_timeout_s: float = 45.0,
          **train) -> tuple[Watchdog, float, list]:
    """A loop thread: `steps` plain steps of `step_s` seconds through the watchdog's events, then it blocks.
    Returns the watchdog, the seconds from the blocked step's start to the exit call, and the exit statuses."""
    cfg = config(watchdog, {"steps": 100, "checkpoint_every": 50, **train})
    exits, release, box = [], threading.Event(), {}
    wd = Watchdog(cfg.watchdog, exit_fn=lambda status: (exits.append(status), box.update(t=time.monotonic()),
                                                       release.set()), poll_s=0.05,
                  report_timeout_s=report_timeout_s)
    ctx = Context(cfg, rank=1, world=2, device=None, run_dir=str(tmp_path / "run"), log=lambda row: None)

    def loop():
        wd.setup(ctx)
        wd.after_restore(ctx)
        for step in range(1, steps + 2):
            ctx.step = step
            wd.before_step(ctx)
            box["blocked_at"] = time.monotonic()
            if step == steps + 1:
                _stuck_in_a_collective(release)
            time.sleep(step_s)
            wd.before_checkpoint(ctx)

    thread = threading.Thread(target=loop, name="train")
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive()
    return wd, box["t"] - box["blocked_at"], exits


@pytest.mark.fast
def test_a_rank_that_stops_is_dumped_named_and_exited_within_the_floor(tmp_path):
    wd, detected, exits = drive(tmp_path, {"step_timeout_s": 0.5}, steps=3, step_s=0.01)
    assert exits == [EXIT_STATUS]
    assert 0.5 <= detected < 0.5 + 0.5  # the bound plus a poll and the dump
    hang = wd.hang
    assert (hang["rank"], hang["step"], hang["window"], hang["bound_s"], hang["collective"]) == (1, 4, "step", 0.5, False)
    assert hang["where"].startswith("_stuck_in_a_collective (tests/test_watchdog.py:")
    dump = Path(hang["stack"]).read_text()
    assert Path(hang["stack"]).parent == tmp_path / "run" / "hangs"
    assert "no progress for" in dump and "release.wait()" in dump and "in _stuck_in_a_collective" in dump


@pytest.mark.fast
def test_a_rank_waiting_in_a_collective_gives_the_rank_it_waits_on_time_to_report_first(tmp_path, monkeypatch):
    # This test's own file stands in for torch.distributed: the blocked frame is "inside a collective".
    monkeypatch.setattr(watchdog, "_COLLECTIVES", ("test_watchdog.py",))
    wd, detected, exits = drive(tmp_path, {"step_timeout_s": 0.4}, steps=3, step_s=0.01)
    assert exits == [EXIT_STATUS] and wd.hang["collective"] is True
    assert 0.4 * watchdog.VICTIM_GRACE <= detected < 0.4 * watchdog.VICTIM_GRACE + 0.5


@pytest.mark.fast
def test_a_dump_that_never_returns_does_not_keep_the_rank_alive(tmp_path, monkeypatch):
    # py-spy (or the storage the stacks go to) that never answers: the rank still exits, and the hang event that
    # the recovery report needs is still made, saying the dump was not written
    never = threading.Event()
    monkeypatch.setattr(watchdog, "_py_spy", lambda: never.wait() and "")
    wd, detected, exits = drive(tmp_path, {"step_timeout_s": 0.3}, steps=3, step_s=0.01, report_timeout_s=0.5)
    never.set()
    assert exits == [EXIT_STATUS] and 0.3 + 0.5 <= detected < 0.3 + 0.5 + 0.5
    assert wd.hang["step"] == 4 and wd.hang["stack"] == "(not written within 0.5 s)"
    assert wd.hang["where"].startswith("_stuck_in_a_collective (tests/test_watchdog.py:")
    assert not (tmp_path / "run" / "hangs").exists()


@pytest.mark.fast
def test_the_bound_grows_with_the_median_step_time(tmp_path):
    # 6 plain steps of 0.1 s: the bound is 8 x 0.1 = 0.8 s, not the 0.2 s floor
    wd, detected, exits = drive(tmp_path, {"step_timeout_s": 0.2, "step_multiple": 8}, steps=6, step_s=0.1)
    assert exits == [EXIT_STATUS] and 0.75 <= wd.hang["bound_s"] <= 0.95
    assert wd.hang["bound_s"] <= detected < wd.hang["bound_s"] + 0.5


@pytest.mark.fast
def test_a_step_that_saves_gets_the_longer_bound_and_a_finished_loop_is_left_alone(tmp_path):
    # step 4 saves a checkpoint: it may take other_timeout_s
    wd, detected, exits = drive(tmp_path, {"step_timeout_s": 0.2, "other_timeout_s": 1.0}, steps=3, step_s=0.01,
                                checkpoint_every=4)
    assert wd.hang["bound_s"] == 1.0 and 1.0 <= detected < 1.5
    # a loop that ends normally: the watcher thread ends with it, nothing fires
    cfg = config({"step_timeout_s": 0.1})
    fired = []
    wd = Watchdog(cfg.watchdog, exit_fn=fired.append, poll_s=0.02)
    ctx = Context(cfg, 0, 1, None, str(tmp_path / "b"), lambda row: None)
    thread = threading.Thread(target=wd.setup, args=(ctx,))
    thread.start()
    thread.join()
    time.sleep(0.3)
    assert not wd._thread.is_alive() and fired == [] and wd.hang is None


def test_a_hang_drill_needs_the_watchdog():
    with pytest.raises(ConfigError, match="faults.hang_at_step"):
        load_config(None, ["faults.hang_at_step=2", "watchdog.enabled=false"])
    with pytest.raises(ConfigError, match="watchdog.step_timeout_s"):
        config({"step_timeout_s": 0})
    assert load_config().watchdog.step_timeout_s == 60


def test_the_recovery_report_names_the_rank_that_stopped_first():
    hang = {"event": "hang", "window": "step", "stack": "r/hangs/x.txt", "bound_s": 10.0}
    rows = [{"event": "start", "step": 0, "time": 0.0}, {"step": 1, "loss": 5, "time": 1.0},
            {"step": 2, "loss": 5, "time": 2.0},
            # rank 0 is stuck in the next step's all-reduce, waiting for rank 1, which stopped first
            {**hang, "rank": 0, "step": 3, "since": 2.9, "stuck_s": 15.4, "where": "all_reduce", "collective": True,
             "time": 18.3},
            {**hang, "rank": 1, "step": 3, "since": 3.0, "stuck_s": 10.2, "where": "after_update (faults.py)",
             "collective": False, "time": 13.2},
            {"event": "start", "step": 2, "resumed_from": "r/checkpoint_00000002", "rejected": [], "time": 40.0},
            {"step": 3, "loss": 5, "time": 42.0}]
    (r,) = recovery_report(rows)
    assert r["failure"] == ("rank 1 hung at step 3 (step window): no progress for 10.2 s (bound 10.0 s), stuck in "
                            "after_update (faults.py)")
    assert r["hang"]["rank"] == 1 and r["hang"]["stack"] == "r/hangs/x.txt" and r["hang"]["others"] == ["rank 0: all_reduce"]
    assert r["seconds_to_first_resumed_step"] == 39.0 and r["steps_redone"] == 0


def test_a_drill_takes_one_step_or_a_list_and_each_is_checked():
    f = load_config(None, ["faults.crash_at_step=3", "faults.hang_at_step=[2, 5]"]).faults
    assert f.steps("crash_at_step") == [3] and f.at("hang_at_step", 5) and not f.at("hang_at_step", 3)
    assert f.steps("nan_at_step") == []
    with pytest.raises(ConfigError, match=r"faults.hang_at_step: must be a step in \[1, train.steps=600\].*got 700"):
        load_config(None, ["faults.hang_at_step=[2, 700]"])
    with pytest.raises(ConfigError, match="faults.kill_during_save_at_step: step 3 saves no checkpoint"):
        load_config(None, ["faults.kill_during_save_at_step=[200, 3]"])
    with pytest.raises(ConfigError, match="faults.crash_at_step"):
        load_config(None, ["faults.crash_at_step=soon"])
