"""Loop hooks: the events a run's hooks see, in order, and hook state checkpointed with the run."""

from __future__ import annotations

import json
import sys

import pytest
from support import small_config

from raysmol.config import ConfigError
from raysmol.recipes import task_for
from raysmol.train.guard import Sentry, SpikeGuard
from raysmol.train.hooks import Context, Hook, Hooks


class Counter(Hook):
    """Counts updates (checkpointed state) and records the events it sees as metrics rows (rank 0)."""

    name = "counter"

    def __init__(self):
        self.updates = 0

    def _note(self, ctx: Context, event: str) -> None:
        ctx.log({"hook": event, "at": ctx.step, "updates": self.updates})

    def after_restore(self, ctx):
        self._note(ctx, "after_restore")

    def after_update(self, ctx):
        self.updates += 1

    def metrics(self, ctx):
        return {"counter/updates": self.updates}

    def evaluate(self, ctx):
        return {"counter/evaluated_at": ctx.step}

    def after_checkpoint(self, ctx):
        self._note(ctx, "after_checkpoint")

    def state_dict(self):
        return {"updates": self.updates}

    def load_state_dict(self, state):
        self.updates = state["updates"]


def test_hooks_dispatch_in_order_and_keep_state_by_name():
    seen = []

    class A(Hook):
        name = "a"

        def after_update(self, ctx):
            seen.append("a")

        def metrics(self, ctx):
            return {"x": 1, "y": 1}

        def state_dict(self):
            return {"v": 1}

        def load_state_dict(self, state):
            seen.append(("a", state))

    class B(Hook):  # no state
        def after_update(self, ctx):
            seen.append("b")

        def metrics(self, ctx):
            return {"y": 2}

    hooks = Hooks([A(), B()])
    hooks.call("after_update", None)
    assert seen == ["a", "b"]
    assert hooks.collect("metrics", None) == {"x": 1, "y": 2}  # later hooks win a shared key
    assert hooks.state_dict() == {"a": {"v": 1}}
    hooks.load_state_dict({"a": {"v": 7}, "gone": {}})  # state of a hook no longer there is ignored
    assert seen[-1] == ("a", {"v": 7})


def test_spike_guard_statistics_round_trip_through_hook_state():
    s = Sentry(None, SpikeGuard(window=4, min_steps=2, loss_zscore=6.0, grad_norm_factor=10.0), "log")
    for i in range(6):
        s.guard.accept(5.0 - 0.1 * i, 1.0 + i)
    t = Sentry(None, SpikeGuard(window=4, min_steps=2, loss_zscore=6.0, grad_norm_factor=10.0), "log")
    t.load_state_dict(json.loads(json.dumps(s.state_dict())))  # as state.json stores it
    assert list(t.guard.losses) == list(s.guard.losses) and list(t.guard.norms) == list(s.guard.norms)
    assert t.guard.check(50.0, 1.0) == s.guard.check(50.0, 1.0) is not None  # judged against the same history


@pytest.mark.parametrize("verb,section", [("pretrain", "sft"), ("pretrain", "grpo"), ("dpo", "sft")])
def test_the_verb_is_the_only_source_of_the_mode(small_data, tmp_path, base, verb, section):
    grpo = {"grpo.prompts_per_step": 2, "grpo.group_size": 4, "grpo.max_new_tokens": 16} if section == "grpo" else {}
    cfg = small_config(tmp_path, small_data, {f"{section}.data": "builtin:arithmetic-small",
                                              f"{section}.init_from": str(base), **grpo})
    with pytest.raises(ConfigError, match=rf"{section}.data is set, so this is a {section} job: run it with "
                                          rf"`raysmol {section} test`"):
        task_for(verb, cfg)
    assert task_for(section, cfg).verb == section


def test_a_run_calls_its_hooks_and_checkpoints_their_state(ray_local, small_data, tmp_path):
    """A crash after step 4 resumes from the step-3 checkpoint: the hook's count comes back with it (3, not 0),
    so the run ends having counted each of its 6 steps once."""
    import ray.cloudpickle

    from raysmol.train import launch

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    cfg = small_config(tmp_path, small_data, {"faults.crash_at_step": 4, "train.eval_every": 3})
    task = task_for("pretrain", cfg)
    task.prepare(cfg, show_progress=False)
    summary = launch.train(cfg, task, [Counter()], show_progress=False)
    run = tmp_path / "runs" / "t"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    notes = [(r["hook"], r["at"], r["updates"]) for r in rows if "hook" in r]
    assert notes == [("after_restore", 0, 0), ("after_checkpoint", 3, 3),
                     ("after_restore", 3, 3), ("after_checkpoint", 6, 6)]
    assert [r["counter/updates"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["counter/evaluated_at"] for r in rows if "val_loss" in r] == [0, 3, 6]
    state = json.loads((run / "checkpoints" / "checkpoint_00000006" / "state.json").read_text())
    assert state["hooks"]["counter"] == {"updates": 6} and len(state["hooks"]["guard"]["losses"]) == 6
    assert summary["steps"] == 6 and summary["recovery"][0]["resume_step"] == 3
