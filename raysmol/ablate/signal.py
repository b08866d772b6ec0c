"""Which benchmarks to trust early: the Smol Training Playbook's four signal criteria, per task, over a sweep.

For every task (validation loss, and any per-checkpoint score table a trial holds) across the sweep's trials:

- **monotonicity**: Spearman correlation of the score with the training step, per trial (the score oriented so
  that higher is better), averaged over trials with at least 3 checkpoints: near 1 means it improves steadily.
- **seed noise**: standard deviation across seeds of the score at each variant's last common checkpoint,
  averaged over variants with at least 2 seeds.
- **margin above random**: how far the baseline's final score is from chance, oriented so that positive is
  better than random (for a loss, chance is the uniform-vocabulary loss ln V).
- **ranking consistency**: Kendall tau-b between the variants' rankings (mean over seeds) at consecutive
  checkpoints, averaged over pairs: near 1 means the early ranking already predicts the later one.

Score tables: `<trial run_dir>/scores.jsonl`, one JSON row per (checkpoint, task):
`{"step": 100, "task": "hellaswag", "score": 0.31, "higher_is_better": true, "random": 0.25}`.
The validation loss is read from `metrics.jsonl`.
"""

from __future__ import annotations

import json
import math
import statistics
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass

from raysmol import storage

SCORES_FILE = "scores.jsonl"
# (variant, seed) -> {step: score}
Table = dict[tuple[str, int], dict[int, float]]


@dataclass
class TaskSignal:
    task: str
    monotonicity: float
    seed_noise: float
    margin: float
    ranking_consistency: float
    checkpoints: int
    trials: int


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rho with average ranks for ties; nan when undefined (fewer than 2 points or a constant)."""
    return _stat("spearmanr", x, y)


def kendall(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b (tie-corrected); nan when undefined."""
    return _stat("kendalltau", x, y)


def _stat(name: str, x: list[float], y: list[float]) -> float:
    import scipy.stats

    if len(x) < 2 or len(set(x)) < 2 or len(set(y)) < 2:
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(getattr(scipy.stats, name)(x, y)[0])


def criteria(task: str, table: Table, higher_is_better: bool, random: float | None,
             baseline: str | None = "baseline") -> TaskSignal:
    """The four criteria for one task's table (see the module docstring)."""
    sign = 1.0 if higher_is_better else -1.0
    mono = [spearman(sorted(s), [sign * s[k] for k in sorted(s)]) for s in table.values() if len(s) >= 3]
    by_variant: dict[str, list[dict[int, float]]] = defaultdict(list)
    for (variant, _), scores in table.items():
        by_variant[variant].append(scores)
    noise = []
    for runs in by_variant.values():
        common = set.intersection(*(set(r) for r in runs))
        if len(runs) >= 2 and common:
            noise.append(statistics.stdev(r[max(common)] for r in runs))
    ref = by_variant.get(baseline) or list(table.values())
    finals = [r[max(r)] for r in ref if r]
    margin = sign * (statistics.fmean(finals) - random) if finals and random is not None else math.nan
    means = {v: _mean_by_step(runs) for v, runs in by_variant.items()}
    steps = sorted({s for m in means.values() for s in m})
    taus = []
    for a, b in zip(steps, steps[1:]):
        both = [v for v in means if a in means[v] and b in means[v]]
        if len(both) >= 2:
            taus.append(kendall([means[v][a] for v in both], [means[v][b] for v in both]))
    return TaskSignal(task, _nanmean(mono), _nanmean(noise), margin, _nanmean(taus), len(steps), len(table))


def _mean_by_step(runs: list[dict[int, float]]) -> dict[int, float]:
    acc: dict[int, list[float]] = defaultdict(list)
    for r in runs:
        for s, v in r.items():
            acc[s].append(v)
    return {s: statistics.fmean(v) for s, v in acc.items()}


def _nanmean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.fmean(xs) if xs else math.nan


def load_tables(sweep_dir: str) -> dict[str, tuple[Table, bool, float | None]]:
    """Per task: the score table of every trial in the sweep, whether higher is better, and chance level."""
    import yaml

    trials = json.loads(storage.read_text(storage.join(sweep_dir, "trials.json")))
    tasks: dict[str, tuple[Table, bool, float | None]] = {}
    for t in trials:
        key = (t["variant"], t["seed"])
        rows_uri = storage.join(t["run_dir"], "metrics.jsonl")
        if storage.exists(rows_uri):
            cfg = yaml.safe_load(storage.read_text(storage.join(t["run_dir"], "config.yaml")))
            vocab = cfg["model"]["vocab_size"] or cfg["tokenizer"]["vocab_size"]
            table = tasks.setdefault("val_loss", ({}, False, math.log(vocab)))[0]
            for r in storage.read_text(rows_uri).splitlines():
                r = json.loads(r) if r.strip() else {}
                if r.get("val_loss") is not None:
                    table.setdefault(key, {})[r["step"]] = r["val_loss"]
        scores_uri = storage.join(t["run_dir"], SCORES_FILE)
        if storage.exists(scores_uri):
            for r in storage.read_text(scores_uri).splitlines():
                if r.strip():
                    r = json.loads(r)
                    table = tasks.setdefault(r["task"], ({}, r.get("higher_is_better", True), r.get("random")))[0]
                    table.setdefault(key, {})[r["step"]] = r["score"]
    return tasks


def signal(sweep_dir: str) -> list[TaskSignal]:
    return [criteria(task, table, hib, rnd) for task, (table, hib, rnd) in sorted(load_tables(sweep_dir).items())]


def format_table(rows: list[TaskSignal]) -> str:
    lines = ["| task | monotonicity (Spearman) | seed noise (std) | margin above random | ranking consistency "
             "(Kendall τ) | checkpoints | trials |", "|" + "---|" * 7]
    f = lambda x: "n/a" if math.isnan(x) else f"{x:.3f}"  # noqa: E731
    for r in rows:
        lines.append(f"| {r.task} | {f(r.monotonicity)} | {f(r.seed_noise)} | {f(r.margin)} | "
                     f"{f(r.ranking_consistency)} | {r.checkpoints} | {r.trials} |")
    return "\n".join(lines) + "\n"


def cmd_signal(args) -> int:
    rows = signal(args.sweep_dir)
    storage.write_text(storage.join(args.sweep_dir, "signal.json"), json.dumps([asdict(r) for r in rows], indent=1))
    print(json.dumps([asdict(r) for r in rows], indent=1) if args.json else format_table(rows), end="")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("signal", help="per task of a sweep: monotonicity, seed noise, margin above random, "
                                             "ranking consistency (which benchmarks to trust early)")
    p.add_argument("sweep_dir", help="a sweep directory written by `raysmol ablate`")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_signal)
