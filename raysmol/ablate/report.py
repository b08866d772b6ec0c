"""The sweep report: per variant the parameter count, tokens, metric mean ± std over seeds, delta to the
baseline and a verdict against the baseline's seed noise; curves of all trials; a bar chart with error bars.

Verdict rule (documented in every report): with the baseline's metric over its completed seeds having sample
standard deviation s (ddof=1), a variant's delta d = mean(variant) - mean(baseline) is *within seed noise* when
|d| <= max(noise.factor x s, noise.floor); otherwise it is *better* or *worse* by the metric's direction. With
one baseline seed s is unknown and only the floor applies. A variant whose every trial ASHA stopped is *worse*
(ASHA stops only trials behind their peers at a rung); stopped trials never enter a mean (their metric is from an
earlier step).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

import yaml

from raysmol import ledger, storage
from raysmol.rundir import pyplot, save_figure
from raysmol.ablate.spec import BASELINE

WITHIN, BETTER, WORSE = "within seed noise", "better", "worse"


def verdict(delta: float, baseline_std: float, factor: float, floor: float, mode: str) -> str:
    """better / worse / within seed noise for a difference of means (see the module docstring)."""
    threshold = noise_threshold(baseline_std, factor, floor)
    if abs(delta) <= threshold:
        return WITHIN
    return BETTER if (delta < 0) == (mode == "min") else WORSE


def noise_threshold(baseline_std: float, factor: float, floor: float) -> float:
    return max(factor * baseline_std, floor) if math.isfinite(baseline_std) else floor


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (nan for fewer than two values)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


@dataclass
class VariantRow:
    variant: str
    changes: str
    params: int | None
    tokens: int
    values: list[float]
    mean: float
    std: float
    n_trials: int
    stopped: list[str] = field(default_factory=list)  # "seed 1 at step 40"
    failed: int = 0
    delta: float | None = None
    delta_params: int | None = None
    verdict: str = ""


def summarize(sweep: dict[str, Any]) -> list[VariantRow]:
    """One row per variant (baseline first) from a loaded sweep (see `load`)."""
    spec, trials = sweep["spec"], sweep["trials"]
    metric, mode, noise = spec["metric"]["name"], spec["metric"]["mode"], spec["noise"]
    variants = [BASELINE] + [v["name"] for v in spec["variants"]]
    changes = {BASELINE: "-", **{v["name"]: ", ".join(f"{k}={json.dumps(x)}" for k, x in v["changes"].items())
                                  for v in spec["variants"]}}
    rows = []
    for name in variants:
        mine = [t for t in trials if t["variant"] == name]
        done = [t for t in mine if t["status"] == "completed" and t.get("final") is not None]
        m, s = mean_std([t["final"] for t in done])
        rows.append(VariantRow(
            variant=name, changes=changes[name], params=next((t["params"] for t in mine if t.get("params")), None),
            tokens=sum(t.get("tokens", 0) for t in mine), values=[t["final"] for t in done], mean=m, std=s,
            n_trials=len(mine), failed=sum(t["status"] == "error" for t in mine),
            stopped=[f"seed {t['seed']} at step {t['stopped_at_step']}" for t in mine if t["status"] == "stopped"]))
    base = rows[0]
    for r in rows[1:]:
        if base.params is not None and r.params is not None:
            r.delta_params = r.params - base.params
        if not base.values:
            r.verdict = "n/a: no completed baseline trial"
        elif not r.values:
            r.verdict = f"{WORSE} (stopped early by ASHA)" if r.stopped and not r.failed else "n/a: no completed trial"
        else:
            r.delta = r.mean - base.mean
            r.verdict = verdict(r.delta, base.std, noise["factor"], noise["floor"], mode)
    base.verdict = "reference"
    return rows


def format_table(rows: list[VariantRow], metric: str) -> str:
    head = (f"| variant | change | parameters | Δ parameters | tokens trained | {metric} (mean ± std, n) "
            f"| Δ to baseline | verdict | stopped early |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        ms = "n/a" if not r.values else (f"{r.mean:.4f} ± {r.std:.4f} (n={len(r.values)})" if len(r.values) > 1
                                         else f"{r.mean:.4f} (n=1)")
        lines.append(" | ".join([
            f"| {r.variant}", r.changes, f"{r.params:,}" if r.params is not None else "?",
            "-" if r.delta_params is None else f"{r.delta_params:+,}", f"{r.tokens:,}", ms,
            "-" if r.delta is None else f"{r.delta:+.4f}", r.verdict, "; ".join(r.stopped) or "-"]) + " |")
    return "\n".join(lines) + "\n"


def load(sweep_dir: str) -> dict[str, Any]:
    """The sweep's resolved ablation file and its trials, each with its metrics rows, final metric, parameter
    count and tokens trained."""
    from raysmol.config import from_dict
    from raysmol.model import param_count

    spec = yaml.safe_load(storage.read_text(storage.join(sweep_dir, "ablation.yaml")))
    trials = json.loads(storage.read_text(storage.join(sweep_dir, "trials.json")))
    metric = spec["metric"]["name"]
    for t in trials:
        t["rows"] = _rows(t["run_dir"])
        cfg_uri = storage.join(t["run_dir"], "config.yaml")
        cfg = from_dict(yaml.safe_load(storage.read_text(cfg_uri)), origin=cfg_uri) if storage.exists(cfg_uri) else None
        t["params"] = param_count(cfg) if cfg else None
        gbt = cfg.train.global_batch_tokens if cfg else 0
        seen = [r["tokens"] for r in t["rows"] if "tokens" in r] + [s * gbt for s, _ in t["history"]]
        t["tokens"] = max(seen, default=0)
        vals = [r[metric] for r in t["rows"] if r.get(metric) is not None]
        t["final"] = vals[-1] if t["status"] == "completed" and vals else (
            t["history"][-1][1] if t["status"] == "completed" and t["history"] else None)
    return {"spec": spec, "trials": trials}


def write(sweep_dir: str) -> str:
    """report.md and plots/ in the sweep directory; returns the terminal version (the table and the rule)."""
    sweep = load(sweep_dir)
    spec = sweep["spec"]
    metric, noise = spec["metric"]["name"], spec["noise"]
    rows = summarize(sweep)
    table = format_table(rows, metric)
    base = rows[0]
    rule = (f"verdict: within seed noise when |Δ| <= max({noise['factor']:g} x baseline seed std, floor {noise['floor']:g})"
            f" = {noise_threshold(base.std, noise['factor'], noise['floor']):.4f}; {metric} "
            f"{'lower' if spec['metric']['mode'] == 'min' else 'higher'} is better")
    _plot_curves(sweep, sweep_dir)
    _plot_bars(rows, metric, noise_threshold(base.std, noise["factor"], noise["floor"]), sweep_dir)
    md = [f"# Ablation {spec['name']}", "", table, rule, "",
          f"Budget: {_budget(spec['budget'])}; seeds {spec['seeds']}; scheduler {_sched(spec['scheduler'])}.", "",
          _seed_note(spec), "",
          "![curves](plots/curves.png)", "", "![metric](plots/metric.png)", "", "## Variants", ""]
    md += [f"- **{v['name']}**: {v['reason']} (changes {', '.join(spec['diffs'][v['name']])}"
           f"{'; bundle' if v['bundle'] else ''})" for v in spec["variants"]]
    md += ["", "## Trials", "", "| trial | status | last step | wall s |", "|---|---|---|---|"]
    for t in sweep["trials"]:
        last = t["stopped_at_step"] if t["status"] == "stopped" else (t["history"][-1][0] if t["history"] else "-")
        md.append(f"| {t['name']} | {t['status']} | {last} | {t['seconds']:.0f} |")
    md += ["", "## Compute (ledger)", "", ledger.format_table(ledger.summarize(ledger.collect(sweep_dir)))]
    storage.write_text(storage.join(sweep_dir, "report.md"), "\n".join(md) + "\n")
    return table + rule + "\n" + f"report: {storage.join(sweep_dir, 'report.md')}\n"


def _rows(run_dir: str) -> list[dict]:
    uri = storage.join(run_dir, "metrics.jsonl")
    if not storage.exists(uri):
        return []
    return [json.loads(x) for x in storage.read_text(uri).splitlines() if x.strip()]


def _seed_note(spec: dict) -> str:
    """Which noise the band measures: what a seed changed in these trials."""
    vary = spec.get("seeds_vary", "init")  # sweeps recorded before seeds_vary existed varied train.seed only
    what = {"init": "the model initialisation only (every seed read the same batches)",
            "data": "the data order only (every seed started from the same weights)",
            "both": "the model initialisation and the data order"}[vary]
    return f"Seeds vary {what} (seeds_vary: {vary}): the noise band measures that noise."


def _budget(b: dict) -> str:
    return f"{b['steps']} steps" if b.get("steps") is not None else f"{b['tokens']:,} tokens"


def _sched(s: dict) -> str:
    if not s["enabled"]:
        return "off (every trial runs to the end)"
    return f"ASHA grace {s['grace_period']}, reduction factor {s['reduction_factor']:g}, margin {s['margin']:g}"


def _save(fig, sweep_dir: str, name: str) -> None:
    save_figure(fig, storage.join(sweep_dir, "plots", name), dpi=110)


def _plot_curves(sweep: dict, sweep_dir: str) -> None:
    """Training loss (left) and the judged metric (right) of every trial; an x where ASHA stopped one."""
    plt = pyplot()
    metric = sweep["spec"]["metric"]["name"]
    variants = [BASELINE] + [v["name"] for v in sweep["spec"]["variants"]]
    colors = {v: f"C{i}" for i, v in enumerate(variants)}
    styles = ["-", "--", ":", "-."]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for t in sweep["trials"]:
        c, ls = colors[t["variant"]], styles[sweep["spec"]["seeds"].index(t["seed"]) % len(styles)]
        train = [r for r in t["rows"] if "loss" in r]
        ax1.plot([r["step"] for r in train], [r["loss"] for r in train], color=c, ls=ls, lw=0.8, alpha=0.8,
                 label=t["name"])
        h = t["history"] or [[r["step"], r[metric]] for r in t["rows"] if r.get(metric) is not None]
        ax2.plot([s for s, _ in h], [v for _, v in h], color=c, ls=ls, marker=".", lw=1, label=t["name"])
        if t["status"] == "stopped" and h:
            ax2.plot([h[-1][0]], [h[-1][1]], "x", color=c, ms=10, mew=2)
    ax1.set(xlabel="step", ylabel="training loss", title="training loss, all trials")
    ax2.set(xlabel="step", ylabel=metric, title=f"{metric} (x: stopped early by ASHA)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax2.legend(fontsize=7, ncol=2)
    _save(fig, sweep_dir, "curves.png")


def _plot_bars(rows: list[VariantRow], metric: str, threshold: float, sweep_dir: str) -> None:
    """Mean ± std over completed seeds per variant; the band is the baseline's within-noise range."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(rows)), 4))
    xs = list(range(len(rows)))
    means = [r.mean if r.values else 0.0 for r in rows]
    errs = [r.std if len(r.values) > 1 else 0.0 for r in rows]
    ax.bar(xs, means, yerr=errs, capsize=6, color=[f"C{i}" for i in xs], alpha=0.8)
    if rows[0].values:
        ax.axhspan(rows[0].mean - threshold, rows[0].mean + threshold, color="grey", alpha=0.25,
                   label="baseline ± noise threshold")
        ax.legend(fontsize=8)
    done = [r.mean for r in rows if r.values]
    if done:
        lo, hi = min(done), max(done)
        pad = max(hi - lo, threshold, 1e-3)
        ax.set_ylim(lo - 2 * pad, hi + 2 * pad)
    for x, r in zip(xs, rows):
        if not r.values:
            ax.text(x, ax.get_ylim()[0], "stopped\nearly" if r.stopped else "n/a", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(xs, [r.variant for r in rows], rotation=20)
    ax.set_ylabel(f"{metric} (mean ± std over seeds)")
    ax.grid(axis="y", alpha=0.3)
    _save(fig, sweep_dir, "metric.png")
