"""The run directory `<run.output_dir>/<run.name>/` (a local path or an object-store URI): its metrics file,
its plots, and figures written to any storage."""

from __future__ import annotations

import io
import json
import os
from typing import Any

from raysmol import storage
from raysmol.config import Config


def run_dir(cfg: Config) -> str:
    out = cfg.run.output_dir if storage.is_remote(cfg.run.output_dir) else os.path.abspath(os.path.expanduser(cfg.run.output_dir))
    return storage.join(out, cfg.run.name)


class MetricsFile:
    """metrics.jsonl in the run directory: appended locally, rewritten whole on object storage."""

    def __init__(self, uri: str):
        self.uri, self.rows = uri, []
        if storage.exists(uri):
            self.rows = [json.loads(line) for line in storage.read_text(uri).splitlines() if line.strip()]

    def add(self, rows: list[dict[str, Any]]) -> None:
        self.rows += rows
        storage.write_text(self.uri, "".join(json.dumps(r) + "\n" for r in self.rows))


def pyplot():
    """matplotlib's pyplot on the file-only backend (no display on a cluster)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, uri: str, dpi: int = 120) -> str:
    """Write `fig` as a PNG to `uri` (local or object storage) and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    storage.write_bytes(uri, buf.getvalue())
    return uri


def plot_loss(rows: list[dict], rd: str) -> None:
    """plots/loss.png: training and validation loss with spikes, rollbacks and data-stage boundaries marked, and
    in-training benchmark accuracy beside it."""
    plt = pyplot()
    tasks = sorted({k for r in rows for k in r if k.startswith("eval/")})
    fig, axes = plt.subplots(1, 2 if tasks else 1, figsize=(12 if tasks else 7, 4), squeeze=False)
    ax = axes[0][0]
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if r.get("val_loss") is not None]
    for r in rows:
        if r.get("event") in ("spike", "rollback"):
            ax.axvline(r["step"], color="red" if r["event"] == "spike" else "orange", lw=0.8, alpha=0.6)
    # Data stages: a dashed line where a stage begins (its first logged step), labelled with the stage's name.
    for prev, r in zip(train, train[1:]):
        if r.get("stage") != prev.get("stage"):
            ax.axvline(r["step"] - 0.5, color="grey", ls="--", lw=0.8)
            ax.annotate(r["stage"], (r["step"], 1), xycoords=("data", "axes fraction"), va="top", fontsize=8)
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1)
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if tasks:  # benchmark accuracy next to the loss: the playbook's "loss alone misleads"
        bx = axes[0][1]
        for t in tasks:
            pts = [(r["step"], r[t]) for r in rows if t in r]
            bx.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=t.removeprefix("eval/"))
        bx.set_xlabel("step")
        bx.set_ylabel("accuracy (char-normalised)")
        bx.grid(alpha=0.3)
        bx.legend(fontsize=8)
    save_figure(fig, storage.join(rd, "plots", "loss.png"))


def recovery_report(rows: list[dict]) -> list[dict[str, Any]]:
    """One entry per restart: what failed (a drill, a hang the watchdog caught, a lost worker, or a re-submission:
    a new driver's `submit` row), the checkpoint resumed from, steps redone, and the seconds from the failure (a
    drill's own timestamp, a re-submission's start, the moment the hung rank's window began, else the last thing
    the run reported) to the first resumed step."""
    out: list[dict[str, Any]] = []
    starts = [i for i, r in enumerate(rows) if r.get("event") == "start"]
    for a, b in zip(starts, starts[1:]):
        before, start = rows[a:b], rows[b]
        faults = [r for r in before if r.get("event") == "fault"]
        submits = [r for r in before if r.get("event") == "submit"]
        # A rank that stops stalls the others in a collective: the cause is the one stuck elsewhere (then the first).
        hangs = [r for r in before if r.get("event") == "hang"]
        hang = min(hangs, key=lambda r: (r.get("collective", False), r["since"]), default=None)
        failed_at = (submits[-1]["time"] if submits else faults[-1]["time"] if faults else hang["since"] if hang
                     else max(r["time"] for r in before))
        # Steps finished before the failure: the last one logged, or the drill's step (it may not be logged yet).
        reached = max([r["step"] for r in before if "loss" in r] + [f["step"] for f in faults if "step" in f] + [0])
        first = next((r for r in rows[b + 1:] if "loss" in r), None)
        out.append({
            "failure": ("re-submitted: a new driver continued the run" if submits else faults[-1]["fault"] if faults
                        else _hung(hang) if hang else _lost_node(rows[a], start) if start.get("lost_nodes")
                        else _grown(rows[a], start) or "worker lost (no drill): killed, crashed or node gone"),
            **({"hang": {**{k: hang[k] for k in ("rank", "step", "window", "where", "stack", "stuck_s", "bound_s")},
                         "others": [f"rank {h['rank']}: {h['where']}" for h in hangs if h is not hang]}}
               if hang and not submits and not faults else {}),
            "resumed_from": start.get("resumed_from"),
            "rejected_checkpoints": start.get("rejected", []),
            "resume_step": start["step"],
            "world_size": start.get("world_size"),
            "steps_redone": max(0, reached - start["step"]),
            "seconds_to_first_resumed_step": (first["time"] - failed_at) if first else None,
        })
    return out


def _grown(before: dict, start: dict) -> str | None:
    """An elastic run restarted larger with nothing failing: Ray Train found room for more workers."""
    old, new = before.get("world_size"), start.get("world_size")
    return f"elastic resize: {old} -> {new} workers (room for more)" if old and new and new > old else None


def _lost_node(before: dict, start: dict) -> str:
    ranks = [r for r, n in enumerate(before.get("nodes") or []) if n in start["lost_nodes"]]
    return (f"node lost: {', '.join(n[:12] for n in start['lost_nodes'])} (rank{'s' * (len(ranks) > 1)} "
            f"{', '.join(map(str, ranks))} ran there)")


def _hung(h: dict) -> str:
    return (f"rank {h['rank']} hung at step {h['step']} ({h['window']} window): no progress for {h['stuck_s']} s (bound "
            f"{h['bound_s']} s), stuck in {h['where']}")


def format_summary(summary: dict[str, Any], run_dir: str | None = None) -> str:
    """The console's closing table for a training run; summary.json holds everything."""
    def num(x, fmt=".3f"):
        return "-" if x is None else format(x, fmt)

    lines = [f"run {summary['run']}: {summary['steps']:,} steps, {summary['tokens']:,} tokens in "
             f"{summary['wall_time_s'] / 60:.1f} min"]
    rows = [("loss", f"{num(summary.get('first_loss'))} -> {num(summary.get('last_loss'))}")]
    iv, fv = summary.get("initial_val_loss"), summary.get("final_val_loss")
    if iv is not None and fv is not None:
        rows.append(("val loss", f"{num(iv)} -> {num(fv)} ({(fv - iv) / iv:+.0%})"))
    recovery = summary.get("recovery") or []
    rows.append(("recovered", f"{len(recovery)} restart(s), last: {recovery[-1]['failure']}" if recovery else "none"))
    if summary.get("events"):
        rows.append(("guard", f"{len(summary['events'])} spike/rollback event(s)"))
    rows += [("checkpoint", summary.get("checkpoint") or "-"), ("export", summary.get("export") or "-")]
    if run_dir:
        rows += [("details", storage.join(run_dir, "summary.json")),
                 ("metrics", f"{storage.join(run_dir, 'metrics.jsonl')}, plots/"),
                 ("logs", storage.join(run_dir, "logs"))]
    return "\n".join([lines[0], *(f"  {k:<11} {v}" for k, v in rows)])
