"""The compute ledger (records, restart time, sums over a tree) and the benchmark-signal criteria, on hand-made
data checked against hand computation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from raysmol import ledger
from raysmol.ablate import signal
from raysmol.config import from_dict


def test_records_are_appended_and_checked(tmp_path):
    run = str(tmp_path / "run")
    r = ledger.record(run, "evaluation", 8, "gpu", 1800, {"suite": "core"})
    assert r["device_hours"] == pytest.approx(4.0) and r["suite"] == "core"
    ledger.record(run, "main", 8, "gpu", 3600)
    lines = (tmp_path / "run" / "ledger.jsonl").read_text().splitlines()
    assert [json.loads(x)["category"] for x in lines] == ["evaluation", "main"]
    with pytest.raises(ledger.LedgerError, match="category 'training' is not one of main, ablation"):
        ledger.record(run, "training", 1, "gpu", 1)
    with pytest.raises(ledger.LedgerError, match="device_kind 'tpu'"):
        ledger.record(run, "main", 1, "tpu", 1)


def test_ledger_sums_a_tree_into_the_playbooks_table(tmp_path):
    # GPU: main 384 GPUs x 24 h = 9216; ablation 2 runs x 8 GPUs x 48 h = 768; eval 8 x 12 h = 96;
    # restarts 384 x 1 h = 384. Total 10464. CPU kept apart: 4 cores x 30 min = 2 core-hours.
    ledger.record(str(tmp_path / "main"), "main", 384, "gpu", 24 * 3600)
    ledger.record(str(tmp_path / "main"), "debugging", 384, "gpu", 3600)
    for i in range(2):
        ledger.record(str(tmp_path / "ablations" / "a" / "trials" / f"t{i}"), "ablation", 8, "gpu", 48 * 3600)
    ledger.record(str(tmp_path / "eval" / "x"), "evaluation", 8, "gpu", 12 * 3600)
    ledger.record(str(tmp_path / "cpu"), "ablation", 4, "cpu", 1800)
    rows = {(r["device_kind"], r["category"]): r for r in ledger.summarize(ledger.collect(str(tmp_path)))}
    main = rows[("gpu", "main")]
    assert main["device_hours"] == pytest.approx(9216) and main["devices"] == 384 and main["days"] == pytest.approx(1.0)
    assert main["share"] == pytest.approx(9216 / 10464)
    abl = rows[("gpu", "ablation")]
    assert abl["device_hours"] == pytest.approx(768) and abl["days"] == pytest.approx(768 / 8 / 24)
    assert rows[("gpu", "debugging/restart")]["share"] == pytest.approx(384 / 10464)
    assert rows[("cpu", "ablation")]["device_hours"] == pytest.approx(2.0) and rows[("cpu", "ablation")]["share"] == 1
    assert sum(r["share"] for r in rows.values() if r["device_kind"] == "gpu") == pytest.approx(1.0)
    table = ledger.format_table(list(rows.values()))
    assert "| main | 384 x 1 | 9,216 | 88.1% |" in table and "CPU-core-hours" in table and "| debugging/restart |" in table


def test_a_broken_ledger_line_names_the_file(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "ledger.jsonl").write_text('{"category": "main"\n')
    with pytest.raises(ledger.LedgerError, match=r"r/ledger.jsonl:1: not valid JSON"):
        ledger.collect(str(tmp_path))


def test_time_lost_to_a_restart_is_booked_as_debugging(tmp_path):
    """A crash at t=130 after step 12 (checkpoint at 10); the first resumed step lands at t=150; 2 steps redone
    at a median step time of 1 s: 20 + 2 = 22 s of the 100 s attempt are debugging/restart."""
    rows = [{"event": "start", "step": 0, "time": 100.0}]
    rows += [{"step": s, "loss": 1.0, "step_time": 1.0, "time": 100.0 + 2.5 * s} for s in range(1, 13)]
    rows += [{"event": "fault", "fault": "crash", "step": 12, "time": 130.0},
             {"event": "start", "step": 10, "resumed_from": "c10", "time": 145.0},
             {"step": 11, "loss": 1.0, "step_time": 1.0, "time": 150.0}]
    recovery = [{"seconds_to_first_resumed_step": 20.0, "steps_redone": 2}]
    assert ledger.restart_seconds(rows, recovery, started=99.0) == pytest.approx(22.0)
    # A restart of the driver (this attempt began after the failure) costs only this attempt's share.
    assert ledger.restart_seconds(rows, recovery, started=144.0) == pytest.approx(6.0 + 2.0)
    cfg = from_dict({"data": {"sources": [{"name": "a", "path": "x", "weight": 1}]},
                     "train": {"num_workers": 2, "cpu_threads_per_worker": 2}})
    recs = ledger.record_run(str(tmp_path), cfg, 100.0, rows, 99.0, recovery)
    assert [(r["category"], r["devices"], r["device_kind"], r["seconds"]) for r in recs] == [
        ("main", 4, "cpu", pytest.approx(78.0)), ("debugging", 4, "cpu", pytest.approx(22.0))]


# ---------------------------------------------------------------- signal


def test_rank_statistics_match_hand_computation_with_ties():
    assert signal.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert signal.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # y = [1, 2, 2, 3]: ranks [1, 2.5, 2.5, 4]; rho = Pearson of ranks = 4.5 / sqrt(5 * 4.5) = 0.9487
    assert signal.spearman([1, 2, 3, 4], [1, 2, 2, 3]) == pytest.approx(4.5 / math.sqrt(5 * 4.5))
    # x = [1,2,3], y = [1,3,2]: concordant 2, discordant 1 -> tau = 1/3
    assert signal.kendall([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    # tau-b with a tie in y: y = [1,1,2]: nc=2, nd=0, ties_y=1 -> 2 / sqrt(3 * 2)
    assert signal.kendall([1, 2, 3], [1, 1, 2]) == pytest.approx(2 / math.sqrt(6))
    assert math.isnan(signal.spearman([1, 2, 3], [5, 5, 5])) and math.isnan(signal.kendall([1], [2]))


def test_criteria_on_a_hand_made_loss_table():
    # Two variants x two seeds, losses at steps 10, 20, 30.
    table = {
        ("baseline", 0): {10: 5.0, 20: 4.0, 30: 3.0},
        ("baseline", 1): {10: 5.2, 20: 4.2, 30: 3.4},
        ("wide", 0): {10: 4.8, 20: 4.3, 30: 3.1},
        ("wide", 1): {10: 4.8, 20: 4.1, 30: 3.3},
    }
    s = signal.criteria("val_loss", table, higher_is_better=False, random=math.log(512))
    assert s.monotonicity == pytest.approx(1.0)  # every loss curve falls steadily
    # final std: baseline stdev(3.0, 3.4) = 0.2828; wide stdev(3.1, 3.3) = 0.1414; mean 0.2121
    assert s.seed_noise == pytest.approx((math.sqrt(0.08) + math.sqrt(0.02)) / 2)
    assert s.margin == pytest.approx(math.log(512) - 3.2)  # baseline final mean 3.2 below ln V
    # variant means: step 10 baseline 5.1 wide 4.8; step 20 4.1 / 4.2; step 30 3.2 / 3.2 (tie)
    # 10->20: order flips (tau -1); 20->30: y tied -> undefined; mean over defined pairs = -1
    assert s.ranking_consistency == pytest.approx(-1.0)
    assert (s.checkpoints, s.trials) == (3, 4)


def test_criteria_for_a_score_where_higher_is_better():
    table = {("baseline", 0): {1: 0.25, 2: 0.30, 3: 0.28, 4: 0.40},
             ("a", 0): {1: 0.20, 2: 0.22, 3: 0.26, 4: 0.30},
             ("b", 0): {1: 0.30, 2: 0.35, 3: 0.36, 4: 0.45}}
    s = signal.criteria("arc", table, higher_is_better=True, random=0.25)
    # baseline ranks of [0.25, 0.30, 0.28, 0.40] = [1, 3, 2, 4]: rho = 1 - 6*2/(4*15) = 0.8; a and b: 1.0
    assert s.monotonicity == pytest.approx((0.8 + 1 + 1) / 3)
    assert math.isnan(s.seed_noise)  # one seed per variant
    assert s.margin == pytest.approx(0.40 - 0.25)
    assert s.ranking_consistency == pytest.approx(1.0)  # b > baseline > a at every checkpoint


def test_signal_reads_a_sweep_directory(tmp_path):
    trials = []
    for variant, seed, losses in [("baseline", 0, [6.0, 5.0, 4.0]), ("baseline", 1, [6.1, 5.1, 4.2]),
                                  ("lr", 0, [6.0, 5.5, 5.2])]:
        rd = tmp_path / "trials" / f"{variant}-s{seed}"
        rd.mkdir(parents=True)
        (rd / "config.yaml").write_text(yaml.safe_dump({"model": {"vocab_size": None}, "tokenizer": {"vocab_size": 8192}}))
        rows = [{"step": 10 * i, "val_loss": v} for i, v in enumerate(losses)] + [{"step": 5, "loss": 9.0}]
        (rd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        if variant == "lr":
            (rd / "scores.jsonl").write_text(json.dumps({"step": 20, "task": "arc", "score": 0.3, "random": 0.25}) + "\n")
        trials.append({"variant": variant, "seed": seed, "run_dir": str(rd)})
    (tmp_path / "trials.json").write_text(json.dumps(trials))
    rows = {r.task: r for r in signal.signal(str(tmp_path))}
    assert set(rows) == {"val_loss", "arc"}
    assert rows["val_loss"].margin == pytest.approx(math.log(8192) - 4.1)
    assert rows["val_loss"].checkpoints == 3 and rows["val_loss"].trials == 3
    # Only the lr trial has a score table: no baseline scores, so the margin is over the trials that have one.
    assert rows["arc"].margin == pytest.approx(0.3 - 0.25) and rows["arc"].trials == 1
    out = signal.format_table(list(rows.values()))
    assert "| val_loss | 1.000 |" in out
