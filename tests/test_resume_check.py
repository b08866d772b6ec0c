"""Resume checks the config: a re-submission may change harmless keys (recorded), must name trajectory changes in
train.allow_changes, and cannot go back in steps. Unit tests of raysmol/train/resume_check.py (no Ray), then one
real run re-submitted through the CLI."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from raysmol.config import ConfigError, apply_override, from_dict
from raysmol.train import resume_check


def config(**overrides):
    raw = {
        "run": {"name": "r", "output_dir": "/runs"},
        "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 128,
                  "max_position_embeddings": 256, "vocab_size": 512},
        "data": {"sources": [{"name": "prose", "path": "/d/prose", "weight": 0.7},
                             {"name": "code", "path": "/d/code", "weight": 0.3}]},
        "optim": {"lr": 1e-3, "warmup_steps": 2, "schedule": "cosine"},
        "train": {"steps": 10, "global_batch_tokens": 256, "micro_batch_size": 2, "seq_len": 32, "num_workers": 2,
                  "checkpoint_every": 5},
    }
    cfg = from_dict(raw, origin="job.yaml")
    for k, v in overrides.items():
        apply_override(cfg, f"{k}={json.dumps(v)}")
    return cfg


def old(**overrides) -> dict:
    return config(**overrides).to_dict()


def test_the_same_config_resumes_with_nothing_to_record():
    assert resume_check.compare(old(), config(), 5) == {"step": 5, "changes": [], "warnings": []}


def test_harmless_changes_are_allowed_and_recorded(caplog):
    new = config(**{"train.eval_every": 2, "train.num_workers": 1, "train.micro_batch_size": 4,
                    "faults.crash_at_step": 7, "guard.action": "rollback", "run.category": "debugging",
                    "run.output_dir": "/elsewhere"})  # the directory moved: not a change of the run
    with caplog.at_level(logging.WARNING):
        record = resume_check.compare(old(), new, 5)
    assert {c["key"]: (c["old"], c["new"], c["allowed_by"]) for c in record["changes"]} == {
        "train.eval_every": (0, 2, "harmless"), "train.num_workers": (2, 1, "harmless"),
        "train.micro_batch_size": (2, 4, "harmless"), "faults.crash_at_step": (None, 7, "harmless"),
        "guard.action": ("log", "rollback", "harmless"), "run.category": ("main", "debugging", "harmless")}
    assert "train.num_workers: 2 -> 1 (harmless)" in caplog.text


def test_trajectory_changes_stop_the_run_naming_each_key_and_the_allowance():
    new = config(**{"optim.lr": 2e-3, "train.seq_len": 64, "train.micro_batch_size": 1, "train.eval_every": 3})
    with pytest.raises(ConfigError) as e:
        resume_check.compare(old(), new, 5, where="runs/r/checkpoints/checkpoint_00000005")
    msg = str(e.value)
    assert msg.startswith("job.yaml: resuming from runs/r/checkpoints/checkpoint_00000005 (step 5)")
    assert "optim.lr: 0.001 -> 0.002" in msg and "train.seq_len: 32 -> 64" in msg
    assert "train.allow_changes='[optim.lr, train.seq_len]'" in msg
    assert "eval_every" not in msg  # harmless ones are not in the way


def test_list_changes_are_reported_per_entry_and_allowed_by_the_lists_prefix():
    new = config(**{"data.sources.0.weight": 0.5, "data.sources.1.weight": 0.5})
    with pytest.raises(ConfigError) as e:
        resume_check.compare(old(), new, 5)
    msg = str(e.value)
    assert "data.sources.0.weight: 0.7 -> 0.5" in msg and "data.sources.1.weight: 0.3 -> 0.5" in msg
    assert "train.allow_changes='[data.sources]'" in msg
    apply_override(new, 'train.allow_changes=["data.sources", "optim.lr"]')
    record = resume_check.compare(old(), new, 5)
    assert record["changes"] == [
        {"key": "data.sources.0.weight", "old": 0.7, "new": 0.5, "allowed_by": "train.allow_changes"},
        {"key": "data.sources.1.weight", "old": 0.3, "new": 0.5, "allowed_by": "train.allow_changes"}]


def test_an_added_source_is_one_readable_entry():
    new = config()
    new.data.sources.append(type(new.data.sources[0])(name="math", path="/d/math", weight=0.1))
    with pytest.raises(ConfigError, match=r'data.sources.2: \(not set\) -> \{"name": "math", "path": "/d/math"'):
        resume_check.compare(old(), new, 5)


def test_unknown_keys_are_trajectory_changes():
    recorded = old()
    recorded["train"]["some_future_knob"] = 3  # a key of another raysmol version
    with pytest.raises(ConfigError, match=r"train.some_future_knob: 3 -> \(not set\)"):
        resume_check.compare(recorded, config(), 5)
    apply_override(cfg := config(), "train.allow_changes=[train.some_future_knob]")
    assert resume_check.compare(recorded, cfg, 5)["changes"][0]["allowed_by"] == "train.allow_changes"


def test_an_allowance_that_names_no_key_is_an_error():
    with pytest.raises(ConfigError, match=r"train.allow_changes.1: 'data.source' names no config key"):
        resume_check.compare(old(), config(**{"train.allow_changes": ["optim.lr", "data.source"]}), 5)


def test_steps_cannot_go_below_the_checkpoint():
    with pytest.raises(ConfigError, match=r"train.steps: 4 is below step 5 of .*set train.steps >= 5 \(was 10\)"):
        resume_check.compare(old(), config(**{"train.steps": 4}), 5)
    # Shortening to a step not yet trained is allowed (with the schedule's warning).
    assert resume_check.compare(old(), config(**{"train.steps": 8}), 5)["changes"][0]["key"] == "train.steps"


@pytest.mark.parametrize("schedule,step,warned", [
    ("cosine", 5, True),       # past warmup: the decay is spread over the new length, the lr jumps
    ("cosine", 1, False),      # still warming up: continues as a fresh run of the new length would
    ("wsd", 5, False),         # stable phase (decay from step 8 of 10): the decay just moves later
    ("wsd", 9, True),          # decaying: extending puts the lr back up
    ("constant", 9, False),
])
def test_extending_steps_warns_when_the_schedule_changes_at_the_resumed_step(schedule, step, warned):
    record = resume_check.compare(old(**{"optim.schedule": schedule}),
                                  config(**{"optim.schedule": schedule, "train.steps": 20}), step)
    assert record["changes"] == [{"key": "train.steps", "old": 10, "new": 20, "allowed_by": "harmless"}]
    assert bool(record["warnings"]) == warned, record["warnings"]
    if warned:
        assert f"changes the {schedule} schedule at the resumed step {step}" in record["warnings"][0]


def write_checkpoint(run: Path, step: int, state: dict | None) -> None:
    folder = run / "checkpoints" / f"checkpoint_{step:08d}"
    folder.mkdir(parents=True)
    if state is not None:
        (folder / "state.json").write_text(json.dumps({"step": step, **state}))


def test_check_reads_the_newest_committed_checkpoint_or_config_yaml(tmp_path):
    run = tmp_path / "r"
    assert resume_check.check(config(), str(run)) is None  # a fresh run
    write_checkpoint(run, 5, {"config": old(**{"optim.lr": 5e-4})})
    write_checkpoint(run, 10, None)  # torn: resume never loads it, so it is not what the run continues
    with pytest.raises(ConfigError, match=r"checkpoint_00000005 \(step 5\).*\n  optim.lr: 0.0005 -> 0.001"):
        resume_check.check(config(), str(run))
    # A checkpoint from before configs were recorded in state.json: the run directory's config.yaml stands in.
    write_checkpoint(run, 15, {})
    (run / "config.yaml").write_text(yaml.safe_dump(old(**{"train.log_every": 5})))
    record = resume_check.check(config(), str(run))
    assert record["checkpoint"].endswith("checkpoint_00000015") and record["config_from"].endswith("config.yaml")
    assert record["changes"] == [{"key": "train.log_every", "old": 5, "new": 1, "allowed_by": "harmless"}]


# ---------------------------------------------------------------- a real run, re-submitted through the CLI


def test_resubmitting_checks_the_config_before_training(ray_local, small_data, tmp_path, capsys):
    from support import small_config

    from raysmol import cli, recipes

    cfg = small_config(tmp_path, small_data, {"train.num_workers": 1, "train.steps": 4, "train.checkpoint_every": 2,
                                              "train.keep_checkpoints": 5})
    first = recipes.run("pretrain", cfg, show_progress=False)
    assert first["steps"] == 4 and first["resume"] is None
    run = tmp_path / "runs" / "t"
    job = tmp_path / "job.yaml"
    job.write_text(cfg.to_yaml())
    before = {p: p.read_bytes() for p in (run / "metrics.jsonl", run / "config.yaml")}
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    capsys.readouterr()

    with pytest.raises(SystemExit) as e:
        cli.main(["pretrain", str(job), "data.sources.0.weight=0.5"])
    err = capsys.readouterr().err
    assert e.value.code == 2, err[-2000:]
    assert "data.sources.0.weight: 0.7 -> 0.5" in err and "train.allow_changes='[data.sources]'" in err
    assert {p: p.read_bytes() for p in before} == before  # no row, config.yaml untouched
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == checkpoints

    with pytest.raises(SystemExit) as e:
        cli.main(["pretrain", str(job), "train.steps=6"])
    assert e.value.code == 0, capsys.readouterr().err[-3000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    start = [r for r in rows if r.get("event") == "start"][-1]
    assert start["resumed_from"].endswith("checkpoint_00000004") and start["step"] == 4
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["resume"]["step"] == 4
    assert summary["resume"]["changes"] == [{"key": "train.steps", "old": 4, "new": 6, "allowed_by": "harmless"}]
    assert "cosine" in summary["resume"]["warnings"][0]
    state = json.loads((run / "checkpoints" / "checkpoint_00000006" / "state.json").read_text())
    assert state["config"]["train"]["steps"] == 6  # the next re-submission is compared against this
