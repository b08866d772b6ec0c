"""Experiment trackers (raysmol/train/trackers.py) driven through the loop's hook events with a fake Context: what
TensorBoard, MLflow and an offline W&B run hold, read back by their own readers; a resume; config errors."""

from __future__ import annotations

import json
import math

import pytest
from support import (assert_same_scalars, expected_scalars, mlflow_scalars, tensorboard_scalars, wandb_records,
                     wandb_scalars)

from raysmol.config import ConfigError, from_dict
from raysmol.train import trackers
from raysmol.train.hooks import Context, Hooks
from raysmol.train.trackers import Trackers

ALL = ["tensorboard", "mlflow", "wandb"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)


def config(tmp_path, names=ALL, **run):
    return from_dict({"run": {"name": "r", "output_dir": str(tmp_path / "runs"), "trackers": names, **run},
                      "data": {"sources": [{"name": "p", "path": "builtin:prose", "weight": 1.0}]}}, origin="test")


def rows(steps, seed=0.0):
    """Rows like the loop's: metrics, a nested data position, validation and eval scores, events, a NaN."""
    out = [{"step": 0, "tokens": 0, "val_loss": 9.0 + seed}]
    for s in steps:
        out.append({"step": s, "tokens": s * 256, "loss": 8.0 - s / 10 + seed, "grad_norm": 1.5 + s, "lr": 1e-3 * s,
                    "tokens_per_s": 1000.0 + s, "mfu": None, "epochs": 0.1 * s, "stage": "stage0",
                    "source_tokens": {"prose": 100 * s, "code": 20 * s}, "grpo/reward": 0.25 * s,
                    "accepted": True})
        if s % 3 == 0:
            out.append({"step": s, "event": "export", "path": "x"})
            out[-2].update({"val_loss": 7.0 - s / 10 + seed, "eval/arc": 0.5 + s / 100})
    [r for r in out if "event" not in r][-1]["grad_norm"] = float("nan")
    return [r for r in out if r["step"] in (0, *steps)]


def attempt(cfg, run_dir, start, logged, teardown=True):
    """One worker attempt as the loop drives it: setup, after_restore at `start`, rows, checkpoints, teardown
    (none: the worker was killed)."""
    ctx = Context(cfg, 0, 1, None, str(run_dir), log=lambda r: None, step=start)
    hooks = Hooks([Trackers(cfg)])
    hooks.call("setup", ctx)
    hooks.call("after_restore", ctx)
    for r in logged:
        hooks.logged(ctx, r)
        if r["step"] % 2 == 0:
            hooks.call("after_checkpoint", ctx)
    if teardown:
        hooks.call("teardown", ctx)


def read_all(run_dir):
    state = json.loads((run_dir / trackers.STATE_FILE).read_text())
    return (tensorboard_scalars(run_dir), mlflow_scalars(state["mlflow"]["uri"], state["mlflow"]["run_id"]),
            wandb_scalars(run_dir / "wandb", state["wandb"]["id"]), state)


def test_every_tracker_holds_the_rows_values(tmp_path):
    cfg = config(tmp_path)
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    logged = rows([1, 2, 3, 4, 5, 6])
    attempt(cfg, run_dir, 0, logged)
    tb, ml, wb, state = read_all(run_dir)
    want = expected_scalars(logged)
    assert {"loss", "val_loss", "eval/arc", "grpo/reward", "source_tokens/prose", "tokens_per_s", "lr"} <= set(want)
    assert "mfu" not in want and "accepted" not in want and "path" not in want
    assert math.isnan(want["grad_norm"][6])
    for got, what in ((tb, "tensorboard"), (ml, "mlflow"), (wb, "wandb")):
        assert_same_scalars(got, want, what)
    assert state["wandb"]["mode"] == "offline" and state["mlflow"]["uri"] == f"file://{tmp_path}/runs/mlruns"
    from mlflow import MlflowClient

    run = MlflowClient(state["mlflow"]["uri"]).get_run(state["mlflow"]["run_id"])
    assert run.info.run_name == "r" and run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "300" and run.data.tags["raysmol.run_dir"] == str(run_dir)
    runs = [r.run.config for f in (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
            for r in wandb_records(f) if r.WhichOneof("record_type") == "run"]
    assert runs and any(i.key == "train" for i in runs[0].update)  # the config went with it


def test_a_resumed_run_continues_the_same_tracked_runs_without_a_step_twice(tmp_path):
    cfg = config(tmp_path)
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    first = rows([1, 2, 3, 4, 5, 6])  # checkpoint at 4, then lost after logging 5 and 6
    attempt(cfg, run_dir, 0, first)
    ids = json.loads((run_dir / trackers.STATE_FILE).read_text())
    second = rows([5, 6, 7, 8], seed=0.5)[1:]  # resumed from step 4: 5 and 6 again (other values), then 7, 8
    attempt(cfg, run_dir, 4, second)
    tb, ml, wb, state = read_all(run_dir)
    assert state["mlflow"]["run_id"] == ids["mlflow"]["run_id"] and state["wandb"]["id"] == ids["wandb"]["id"]
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2  # one file per attempt, one run id
    # TensorBoard purges the rerun steps: the rerun's values, as in metrics.jsonl's last row of a step.
    assert_same_scalars(tb, expected_scalars(first + second), "tensorboard")
    # MLflow and W&B cannot take a point back: they keep the first attempt's 5 and 6.
    kept = expected_scalars(first + [r for r in second if r["step"] > 6])
    assert_same_scalars(ml, kept, "mlflow")
    assert_same_scalars(wb, kept, "wandb")
    from mlflow import MlflowClient

    client = MlflowClient(state["mlflow"]["uri"])
    assert len(client.search_runs([client.get_experiment_by_name("raysmol").experiment_id])) == 1


def test_a_run_ended_from_outside_gets_its_final_mlflow_status_and_a_closed_one_keeps_its_own(tmp_path):
    """A sweep trial ASHA stopped never reaches teardown (its workers are killed): end_mlflow_run marks its run
    KILLED; a run its loop closed stays FINISHED; a run directory that tracked nothing is left as it is."""
    from mlflow import MlflowClient

    cfg = config(tmp_path, ["mlflow"])
    killed, closed = tmp_path / "runs" / "killed", tmp_path / "runs" / "closed"
    for d in (killed, closed):
        d.mkdir(parents=True)
    attempt(cfg, killed, 0, rows([1]), teardown=False)
    attempt(cfg, closed, 0, rows([1, 2]))
    status = {}
    for d in (killed, closed):
        state = json.loads((d / trackers.STATE_FILE).read_text())["mlflow"]
        status[d.name] = lambda s=state: MlflowClient(s["uri"]).get_run(s["run_id"]).info.status
    assert status["killed"]() == "RUNNING" and status["closed"]() == "FINISHED"
    for d in (killed, closed, tmp_path / "runs" / "untracked"):
        trackers.end_mlflow_run(str(d), "KILLED")
    assert status["killed"]() == "KILLED" and status["closed"]() == "FINISHED"


def test_a_rollback_replaces_the_rerun_steps_in_tensorboard(tmp_path):
    cfg = config(tmp_path, ["tensorboard"])
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    first = rows([1, 2, 3, 4])
    logged = first + rows([3, 4, 5], seed=1.0)[1:]  # rolled back to 2 after logging 4
    ctx = Context(cfg, 0, 1, None, str(run_dir), log=lambda r: None)
    hook = Trackers(cfg)
    hook.setup(ctx)
    hook.after_restore(ctx)
    for i, r in enumerate(logged):
        hook.logged(ctx, r)
        if i == len(first) - 1:
            ctx.step = 2
            hook.after_restore(ctx)
    hook.teardown(ctx)
    assert_same_scalars(tensorboard_scalars(run_dir), expected_scalars(logged), "tensorboard")
    assert not (run_dir / trackers.STATE_FILE).exists()  # TensorBoard alone keeps no ids


def test_other_ranks_track_nothing(tmp_path):
    cfg = config(tmp_path, ["tensorboard"])
    ctx = Context(cfg, 1, 2, None, str(tmp_path), log=lambda r: None)
    hooks = Hooks([Trackers(cfg)])
    hooks.call("setup", ctx)
    hooks.call("after_restore", ctx)
    hooks.logged(ctx, {"step": 1, "loss": 1.0})
    hooks.call("teardown", ctx)
    assert list(tmp_path.iterdir()) == []


def test_trackers_config_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"run\.trackers\.1: 'neptune' is not one of 'tensorboard', 'mlflow', 'wandb'"):
        config(tmp_path, ["tensorboard", "neptune"])
    with pytest.raises(ConfigError, match=r"run\.trackers: tensorboard listed twice"):
        config(tmp_path, ["tensorboard", "tensorboard"])
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda n: None if n == "wandb" else real(n))
    with pytest.raises(ConfigError, match=r"run\.trackers\.1: wandb needs the wandb package.*pip install 'raysmol\[tracking\]'"):
        Trackers(config(tmp_path, ["tensorboard", "wandb"]))
    with pytest.raises(ConfigError, match=r"run\.mlflow_uri: needed .* object storage"):
        Trackers(config(tmp_path, ["mlflow"], output_dir="s3://bucket/runs"))
    assert config(tmp_path, []).run.trackers == [] and config(tmp_path, ["tensorboard"]).run.mlflow_uri == ""
    from raysmol.config import Config

    assert Config().run.trackers == ["tensorboard"]


def test_wandb_mode_follows_the_environment(monkeypatch):
    assert trackers.WandB.mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert trackers.WandB.mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert trackers.WandB.mode() == "disabled"
