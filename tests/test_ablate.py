"""Ablations: the ablation file and its one-change rule, verdicts against seed noise, the report, and real Ray
Tune sweeps whose trials are raysmol Ray Train runs (ASHA stopping a diverging trial; resume after the driver
is killed)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from support import expected_scalars, mlflow_scalars, small_config, tensorboard_scalars

from raysmol.ablate import report
from raysmol.ablate.spec import load_ablation
from raysmol.config import ConfigError

REPO = Path(__file__).resolve().parent.parent


def write_spec(tmp_path: Path, baseline, **fields) -> Path:
    doc = {"name": "sweep", "output_dir": str(tmp_path / "sweeps"), "baseline": baseline,
           "seeds": [0, 1], "budget": {"steps": 40}, **fields}
    path = tmp_path / "ablation.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def variant(name: str, changes: dict, **extra) -> dict:
    return {"name": name, "reason": "test", "changes": changes, **extra}


# ---------------------------------------------------------------- the ablation file


def test_one_change_variants_are_accepted_and_every_trial_config_is_built(tmp_path):
    path = write_spec(tmp_path, str(REPO / "jobs" / "tiny.yaml"),
                      overrides={"train.num_workers": 1, "train.zero_stage": 0},
                      variants=[variant("mha", {"model.num_kv_heads": 4}), variant("lr", {"optim.lr": 0.001})],
                      budget={"tokens": 100_000}, resources={"workers": 1})
    spec = load_ablation(path)
    assert spec.diffs == {"baseline": [], "mha": ["model.num_kv_heads"], "lr": ["optim.lr"]}
    trials = spec.trials()
    # The baseline's seeds first.
    assert [t.name for t in trials] == ["baseline-s0", "baseline-s1", "mha-s0", "mha-s1", "lr-s0", "lr-s1"]
    mha = trials[2].config
    assert mha.model.num_kv_heads == 4 and mha.train.seed == 0 and trials[3].config.train.seed == 1
    assert mha.train.steps == math.ceil(100_000 / 2048) == 49  # token budget -> steps
    assert mha.train.num_workers == 1 and mha.run.category == "ablation" and mha.run.name == "mha-s0"
    assert mha.run.output_dir == str(tmp_path / "sweeps" / "sweep" / "trials")


@pytest.mark.parametrize("vary,init,data", [("both", [0, 1], [1234, 1235]), ("init", [0, 1], [1234, 1234]),
                                             ("data", [0, 0], [1234, 1235])])
def test_seeds_vary_the_initialisation_the_data_order_or_both(tmp_path, vary, init, data):
    path = write_spec(tmp_path, str(REPO / "jobs" / "tiny.yaml"), variants=[variant("lr", {"optim.lr": 0.001})],
                      seeds_vary=vary)
    spec = load_ablation(path)
    trials = [t for t in spec.trials() if t.variant == "lr"]
    assert [t.config.train.seed for t in trials] == init and [t.config.data.seed for t in trials] == data
    assert spec.diffs["lr"] == ["optim.lr"]  # the seeds are not a change of the variant
    assert f"seeds_vary: {vary}" in report._seed_note(spec.to_dict())
    with pytest.raises(ConfigError, match="seeds_vary: 'weights' is not one of init, data, both"):
        load_ablation(write_spec(tmp_path, str(REPO / "jobs" / "tiny.yaml"), variants=[variant("lr", {"optim.lr": 0.001})],
                                 seeds_vary="weights"))


def test_a_token_budget_gives_a_batch_size_variant_the_same_tokens_in_fewer_steps(tmp_path):
    path = write_spec(tmp_path, str(REPO / "jobs" / "tiny.yaml"), budget={"tokens": 409_600},
                      variants=[variant("big_batch", {"train.global_batch_tokens": 4096})])
    spec = load_ablation(path)
    assert spec.diffs["big_batch"] == ["train.global_batch_tokens"]  # the steps follow from the budget
    steps = {t.variant: t.config.train.steps for t in spec.trials()}
    assert steps == {"baseline": 200, "big_batch": 100}


def test_a_variant_changing_two_keys_is_refused_naming_them_unless_it_is_a_bundle(tmp_path):
    two = {"model.num_kv_heads": 4, "model.tie_embeddings": False}
    with pytest.raises(ConfigError) as e:
        load_ablation(write_spec(tmp_path, str(REPO / "jobs" / "tiny.yaml"), variants=[variant("both", two)]))
    msg = str(e.value)
    assert "ablation.yaml" in msg and "both" in msg and "model.num_kv_heads" in msg and "model.tie_embeddings" in msg
    assert "bundle: true" in msg
    spec = load_ablation(write_spec(tmp_path, str(REPO / "jobs" / "tiny.yaml"),
                                    variants=[variant("both", two, bundle=True)]))
    assert spec.diffs["both"] == ["model.num_kv_heads", "model.tie_embeddings"]


def test_a_change_that_sets_the_baseline_value_changes_nothing_and_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"noop.*leave the baseline unchanged"):
        load_ablation(write_spec(tmp_path, str(REPO / "jobs" / "tiny.yaml"),
                                 variants=[variant("noop", {"optim.lr": 3.0e-3})]))


@pytest.mark.parametrize("fields, words", [
    ({"variants": [variant("a", {"optim.lr": 1e-3})], "sedes": [0]}, ["unknown key 'sedes'"]),
    ({"variants": [variant("a", {"optim.lrr": 1e-3})]}, ["variants: a: changes", "optim.lrr"]),
    ({"variants": [{"name": "a", "reason": "r", "change": {"optim.lr": 1e-3}}]}, ["'variants.0.change'"]),
    ({"variants": [variant("a", {"optim.lr": 1e-3})], "scheduler": {"grace": 2}}, ["'scheduler.grace'"]),
    ({"variants": [variant("a", {"optim.lr": 1e-3})], "metric": {"name": "val_loss", "mode": "up"}}, ["metric.mode"]),
    ({"variants": [variant("a", {"model.num_kv_heads": 3})]}, ["model.num_kv_heads", "divisible"]),
    ({"variants": [variant("a", {"train.seed": 3})]}, ["train.seed is set by seeds"]),
    ({"variants": [variant("a", {"train.steps": 30})]}, ["train.steps is set by budget"]),
    ({"variants": [variant("baseline", {"optim.lr": 1e-3})]}, ["reserved"]),
    ({"variants": [{"name": "a", "changes": {"optim.lr": 1e-3}}]}, ["needs a reason"]),
    ({"variants": [variant("a", {"optim.lr": 1e-3})], "budget": {"steps": 5, "tokens": 9}}, ["exactly one of"]),
])
def test_bad_ablation_files_name_the_file_and_key(tmp_path, fields, words):
    with pytest.raises(ConfigError) as e:
        load_ablation(write_spec(tmp_path, str(REPO / "jobs" / "tiny.yaml"), **fields))
    assert "ablation.yaml" in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_an_inline_baseline_goes_through_config_validation(tmp_path):
    with pytest.raises(ConfigError, match=r"baseline: unknown key 'model.hiden_size'"):
        load_ablation(write_spec(tmp_path, {"model": {"hiden_size": 3}}, variants=[variant("a", {"optim.lr": 1e-3})]))


def test_the_example_sweeps_load(tmp_path):
    tiny = load_ablation(REPO / "jobs" / "ablations" / "tiny_lr.yaml")
    assert tiny.diffs == {"baseline": [], "lr_x30": ["optim.lr"], "lr_x1.1": ["optim.lr"]}
    assert tiny.trials()[3].config.optim.lr == pytest.approx(30 * tiny.baseline.optim.lr)
    big = load_ablation(REPO / "jobs" / "ablations" / "smollm3_attention.yaml")
    assert len(big.variants) >= 4 and all(len(k) == 1 or v.bundle for v in big.variants for k in [big.diffs[v.name]])
    assert big.trials()[0].config.train.use_gpu


# ---------------------------------------------------------------- verdicts


@pytest.mark.parametrize("delta, std, floor, mode, expected", [
    (0.05, 0.03, 0.0, "min", report.WITHIN),     # 0.05 <= 2 x 0.03
    (0.07, 0.03, 0.0, "min", report.WORSE),      # 0.07 > 0.06, higher loss
    (-0.07, 0.03, 0.0, "min", report.BETTER),
    (-0.07, 0.03, 0.0, "max", report.WORSE),     # an accuracy that dropped
    (0.07, 0.03, 0.0, "max", report.BETTER),
    (0.01, 0.001, 0.02, "min", report.WITHIN),   # the floor wins over a tiny std
    (0.03, math.nan, 0.02, "min", report.WORSE),  # one baseline seed: only the floor
    (0.06, 0.03, 0.0, "min", report.WITHIN),     # the boundary is within noise
])
def test_verdict_against_the_baselines_seed_spread(delta, std, floor, mode, expected):
    assert report.verdict(delta, std, 2.0, floor, mode) == expected


def hand_sweep(statuses: dict[str, list[tuple[str, float | None]]], floor: float = 0.0) -> dict:
    spec = {"metric": {"name": "val_loss", "mode": "min"}, "noise": {"factor": 2.0, "floor": floor},
            "variants": [{"name": v, "changes": {"optim.lr": 1}} for v in statuses if v != "baseline"]}
    trials = []
    for v, runs in statuses.items():
        for seed, (status, final) in enumerate(runs):
            trials.append({"variant": v, "seed": seed, "status": status, "final": final, "params": 100,
                           "tokens": 1000, "stopped_at_step": 20 if status == "stopped" else None})
    return {"spec": spec, "trials": trials}


def test_summary_rows_on_hand_made_numbers():
    # baseline 5.0, 5.1, 5.2: mean 5.1, std 0.1 -> within noise when |delta| <= 0.2
    rows = report.summarize(hand_sweep({
        "baseline": [("completed", 5.0), ("completed", 5.1), ("completed", 5.2)],
        "close": [("completed", 5.2), ("completed", 5.3), ("completed", 5.25)],      # +0.15
        "bad": [("stopped", None), ("stopped", None), ("stopped", None)],
        "good": [("completed", 4.7), ("completed", 4.8), ("stopped", None)],          # -0.35
        "worse": [("completed", 5.4), ("completed", 5.5), ("completed", 5.45)],       # +0.35
    }))
    by = {r.variant: r for r in rows}
    assert by["baseline"].mean == pytest.approx(5.1) and by["baseline"].std == pytest.approx(0.1)
    assert by["close"].delta == pytest.approx(0.15) and by["close"].verdict == report.WITHIN
    assert by["bad"].verdict.startswith(report.WORSE) and len(by["bad"].stopped) == 3 and by["bad"].delta is None
    assert by["good"].verdict == report.BETTER and by["good"].values == [4.7, 4.8]
    assert by["good"].stopped == ["seed 2 at step 20"] and by["good"].tokens == 3000
    assert by["worse"].verdict == report.WORSE
    table = report.format_table(rows, "val_loss")
    assert "| close |" in table and "5.1000 ± 0.1000 (n=3)" in table and "+0.1500" in table


# ---------------------------------------------------------------- the scheduler


class FakeTrial:
    def __init__(self, trial_id: str):
        self.trial_id = trial_id


@pytest.mark.parametrize("margin, expected", [(0.0, ["CONTINUE", "STOP", "STOP"]), (0.2, ["CONTINUE", "CONTINUE", "STOP"])])
def test_asha_with_a_margin_stops_only_trials_clearly_behind_at_a_rung(margin, expected):
    """Plain ASHA (margin 0) stops a trial 0.1 behind the first one at the rung; with margin 0.2 only the trial
    0.5 behind is stopped."""
    from raysmol.ablate.tune import MarginASHA

    s = MarginASHA(time_attr="step", metric="val_loss", mode="min", max_t=40, grace_period=10, reduction_factor=2,
                   margin=margin)
    trials = [FakeTrial(i) for i in "abc"]
    for t in trials:
        s.on_trial_add(None, t)
    assert s.on_trial_result(None, trials[0], {"step": 5, "val_loss": 9.0}) == "CONTINUE"  # before the first rung
    got = [s.on_trial_result(None, t, {"step": 10, "val_loss": v}) for t, v in zip(trials, [5.0, 5.1, 5.5])]
    assert got == expected


def test_asha_rungs_and_stops_survive_a_restore_of_the_sweep(tmp_path):
    """`Tuner.restore` re-creates the scheduler from `tuner.pkl`, pickled before the first trial: the rung records
    and stops it made before the driver died come back from the sweep directory, and the restored scheduler
    decides as one that was never interrupted does."""
    import pickle

    from raysmol.ablate.tune import MarginASHA, asha_stops

    def asha(state_uri=None):
        return MarginASHA(time_attr="step", metric="val_loss", mode="min", max_t=40, grace_period=10,
                          reduction_factor=2, margin=0.1, state_uri=state_uri)

    state = str(tmp_path / "asha.json")
    first, whole = asha(state), asha()
    tuner_pkl = pickle.dumps(first)
    a, b, c = (FakeTrial(i) for i in "abc")
    for s in (first, whole):
        for t in (a, b):
            s.on_trial_add(None, t)
        got = [s.on_trial_result(None, t, {"step": step, "val_loss": v}) for t, step, v in
               [(a, 10, 5.0), (b, 10, 5.5), (a, 20, 4.0)]]
        assert got == ["CONTINUE", "STOP", "CONTINUE"]
    assert asha_stops(state) == {"b": 10}

    restored = pickle.loads(tuner_pkl)  # what a restored sweep's driver holds: no records
    assert restored._recorded() == 0
    for t in (a, b, c):  # Tune adds every trial of the restored experiment, stopped ones too
        restored.on_trial_add(None, t)
    whole.on_trial_add(None, c)
    assert restored._brackets[0]._rungs == whole._brackets[0]._rungs and restored.stopped == {"b": 10}
    # c is within the margin of the first rung's cutoff (5.25 + 0.1), but 0.5 behind a at the second: stopped
    # there only by a scheduler that kept a's record.
    for s in (restored, whole):
        got = [s.on_trial_result(None, c, {"step": step, "val_loss": v}) for step, v in [(10, 5.3), (20, 4.5)]]
        assert got == ["CONTINUE", "STOP"]
    assert asha_stops(state) == {"b": 10, "c": 20}
    again = pickle.loads(tuner_pkl)
    again.on_trial_add(None, a)
    assert again._brackets[0]._rungs == whole._brackets[0]._rungs


def test_a_trial_asha_stopped_is_not_trained_again_when_tune_resumes_it(tmp_path, monkeypatch):
    """When the driver dies after ASHA stopped a trial but before Tune's experiment state says so, the restored
    experiment resumes the trial: its driver finds the stop in the sweep's ASHA state and returns at once."""
    from types import SimpleNamespace

    from ray import tune

    from raysmol.ablate.tune import run_trial

    state = tmp_path / "asha.json"
    state.write_text(json.dumps({"rungs": [], "stopped": {"id-b": 2}}))
    monkeypatch.setattr(tune, "get_context", lambda: SimpleNamespace(get_trial_id=lambda: "id-b"))
    # No config and no metric: a trial that went on to train would fail with a KeyError.
    assert run_trial({"trial": "b"}, {"b": {"name": "b", "scheduler_state": str(state)}}) is None


def test_placement_groups_of_killed_train_controllers_are_released(ray_local):
    """A stopped trial's Train controller dies with its trial; the group reserving its workers outlives it (it
    is scoped to the job) unless the sweep removes it."""
    import ray

    from raysmol.ablate.tune import release_orphaned_placement_groups

    @ray.remote(num_cpus=0)
    class Controller:
        def reserve(self):
            from ray.util.placement_group import placement_group

            pg = placement_group([{"CPU": 1}])
            ray.get(pg.ready())
            return pg

    alive, doomed = Controller.remote(), Controller.remote()
    keep, lost = ray.get([alive.reserve.remote(), doomed.reserve.remote()])
    driver_made = ray.util.placement_group([{"CPU": 0.01}])  # as Tune makes one per trial
    ray.get(driver_made.ready())
    assert release_orphaned_placement_groups() == 0
    ray.kill(doomed)
    deadline = time.time() + 30
    while release_orphaned_placement_groups() == 0 and time.time() < deadline:
        time.sleep(0.2)
    table = ray.util.placement_group_table()
    assert table[lost.id.hex()]["state"] == "REMOVED" and table[keep.id.hex()]["state"] == "CREATED"
    assert table[driver_made.id.hex()]["state"] == "CREATED"
    ray.util.remove_placement_group(keep)
    ray.util.remove_placement_group(driver_made)
    ray.kill(alive)


# ---------------------------------------------------------------- real sweeps


def tiny_sweep(tmp_path: Path, small_data, variants: list[dict], **fields) -> Path:
    """An ablation file whose baseline is the test suite's tiny 1-worker ZeRO-0 run."""
    cfg = small_config(tmp_path, small_data, {"train.num_workers": 1, "train.zero_stage": 0,
                                              "train.checkpoint_every": 4, "train.eval_every": 2,
                                              "run.trackers": ["tensorboard", "mlflow"]})
    base = cfg.to_dict()
    return write_spec(tmp_path, base, variants=variants, **{"metric": {"name": "val_loss", "mode": "min"}, **fields})


def terminated_trials(sweep: Path) -> dict[str, str]:
    """Name -> trial id of the trials the sweep's saved Tune experiment state records as finished."""
    out = {}
    for f in (sweep / "tune").glob("experiment_state-*.json"):
        try:
            for data in json.loads(f.read_text())["trial_data"]:
                trial = json.loads(data[0])
                if trial["status"] == "TERMINATED":
                    out[trial["config"]["trial"]] = trial["trial_id"]
        except (json.JSONDecodeError, KeyError):  # being rewritten
            pass
    return out


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_without_rerunning_finished_trials(small_data, tmp_path):
    """The driver and its Ray are killed (SIGKILL) once ASHA has stopped a diverging trial after the baseline
    finished; `ablate` again restores the Tune experiment: finished and stopped trials keep their results and are
    not started again, ASHA keeps its rung records, the other trial runs to the end."""
    # One trial at a time, in this order: the diverging trial is compared with the baseline at the first rung.
    path = tiny_sweep(tmp_path, small_data, [variant("lr_x300", {"optim.lr": 1.0}),
                                             variant("lr_x1.1", {"optim.lr": 3.3e-3})],
                      seeds=[0], budget={"steps": 8}, resources={"workers": 1, "max_concurrent_trials": 1},
                      scheduler={"grace_period": 2, "reduction_factor": 2, "margin": 0.1})
    sweep = tmp_path / "sweeps" / "sweep"
    code = ("import sys, ray; from raysmol.ablate.tune import ablate; "
            "ray.init(address='local', num_cpus=2, log_to_driver=False); print(ablate(sys.argv[1], show_progress=False))")
    env = {**os.environ, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "120"}
    first = subprocess.Popen([sys.executable, "-c", code, str(path)], cwd=REPO, env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 400
    while "lr_x300-s0" not in terminated_trials(sweep) and time.time() < deadline:
        assert first.poll() is None, "the sweep ended before it could be interrupted"
        time.sleep(1)
    finished = terminated_trials(sweep)
    assert "baseline-s0" in finished and "lr_x300-s0" in finished and len(finished) < 3, finished
    os.killpg(first.pid, signal.SIGKILL)  # the driver and the local Ray it started
    first.wait()
    assert not (sweep / "trials.json").exists()
    before = json.loads((sweep / "asha.json").read_text())
    stopped_at = before["stopped"][finished["lr_x300-s0"]]
    out = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    trials = {t["name"]: t for t in json.loads((sweep / "trials.json").read_text())}
    assert len(trials) == 3 and trials["baseline-s0"]["status"] == trials["lr_x1.1-s0"]["status"] == "completed", trials
    bad = trials["lr_x300-s0"]
    assert bad["status"] == "stopped" and bad["stopped_at_step"] == stopped_at < 8, bad
    # The restored scheduler went on from the records made before the kill (a fresh one would have rewritten the
    # file with the last trial's alone).
    after = json.loads((sweep / "asha.json").read_text())
    rungs = {m: r for m, r in after["rungs"]}
    for milestone, recorded in before["rungs"]:
        assert recorded.items() <= rungs[milestone].items(), (before, after)
    assert sum(len(r) for r in rungs.values()) > sum(len(r) for _, r in before["rungs"])
    assert after["stopped"] == before["stopped"]
    for name in finished:
        rows = [json.loads(x) for x in (sweep / "trials" / name / "metrics.jsonl").read_text().splitlines()]
        assert sum(r.get("event") == "start" for r in rows) == 1, f"{name} was run again"
        assert len((sweep / "trials" / name / "ledger.jsonl").read_text().splitlines()) == 1
    # One tracked run per trial, across the driver's kill and the restore: MLflow's store beside the trials holds
    # one run per trial name, and each trial's TensorBoard run holds metrics.jsonl's values, one per step (a trial
    # killed by ASHA or with the driver may have logged a last row its driver never wrote to metrics.jsonl).
    uri = f"file://{sweep}/trials/mlruns"
    from mlflow import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("raysmol").experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(trials)
    # The trial ASHA stopped never closed its run (its workers were killed): the sweep marks it KILLED.
    assert {r.info.run_name: r.info.status for r in runs} == {
        "baseline-s0": "FINISHED", "lr_x1.1-s0": "FINISHED", "lr_x300-s0": "KILLED"}
    for name in trials:
        rows = [json.loads(x) for x in (sweep / "trials" / name / "metrics.jsonl").read_text().splitlines()]
        want = expected_scalars(rows)
        state = json.loads((sweep / "trials" / name / "tracking.json").read_text())
        for got in (tensorboard_scalars(sweep / "trials" / name), mlflow_scalars(uri, state["mlflow"]["run_id"])):
            assert {"loss", "val_loss"} <= set(got)
            for k, steps in want.items():
                for step, v in steps.items():
                    assert got[k][step] == pytest.approx(v, rel=1e-6, nan_ok=True), (name, k, step)
