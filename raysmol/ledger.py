"""Compute ledger: every run records the device-hours it spent and why, so a team can see what learning cost.

The Smol Training Playbook budgets compute by category (the main run, ablations, evaluation, and the
debugging and restarts nobody plans for) and reports it as "devices x days, device-hours, share of total".
Each run appends records to ``<run_dir>/ledger.jsonl`` through :func:`record`; ``raysmol ledger DIR``
sums every ledger under a directory tree into that table.

Device-hours are GPU-hours on GPUs and CPU-core-hours on CPUs (workers x cores per worker x wall hours);
the two are never added together: the table has one block per device kind.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from typing import Any

from raysmol import storage

LEDGER_FILE = "ledger.jsonl"
CATEGORIES = ("main", "ablation", "evaluation", "debugging")
# How the playbook names the categories in its table.
LABELS = {"main": "main", "ablation": "ablation", "evaluation": "evaluation", "debugging": "debugging/restart"}
DEVICE_KINDS = ("gpu", "cpu")


class LedgerError(ValueError):
    """A ledger record or file is invalid; the message names the file and the value."""


def record(run_dir: str, category: str, devices: float, device_kind: str, seconds: float,
           extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Append one record to ``<run_dir>/ledger.jsonl``: `devices` GPUs (or CPU cores) busy for `seconds`."""
    if category not in CATEGORIES:
        raise LedgerError(f"{run_dir}: category {category!r} is not one of {', '.join(CATEGORIES)}")
    if device_kind not in DEVICE_KINDS:
        raise LedgerError(f"{run_dir}: device_kind {device_kind!r} is not one of {', '.join(DEVICE_KINDS)}")
    if devices <= 0 or seconds < 0:
        raise LedgerError(f"{run_dir}: devices must be > 0 and seconds >= 0, got devices={devices} seconds={seconds}")
    rec = {"category": category, "devices": devices, "device_kind": device_kind, "seconds": float(seconds),
           "device_hours": devices * seconds / 3600.0, "time": time.time(), **(extra or {})}
    uri = storage.join(run_dir, LEDGER_FILE)
    # Read-append-write: object stores have no append, and a run writes only a handful of records.
    old = storage.read_text(uri) if storage.exists(uri) else ""
    storage.write_text(uri, old + json.dumps(rec) + "\n")
    return rec


def record_run(run_dir: str, cfg, wall_s: float, rows: list[dict], started: float,
               recovery: list[dict]) -> list[dict[str, Any]]:
    """The ledger records of one pretraining attempt: its category for the useful time and `debugging` for
    the time restarts cost (failure to first resumed step, plus the steps redone)."""
    t = cfg.train
    kind = "gpu" if t.use_gpu else "cpu"
    devices = t.num_workers * (1 if t.use_gpu else t.cpu_threads_per_worker)
    lost = min(wall_s, restart_seconds(rows, recovery, started))
    extra = {"run": cfg.run.name, "steps": max([r["step"] for r in rows if "loss" in r] + [0])}
    out = [record(run_dir, cfg.run.category, devices, kind, wall_s - lost, extra)]
    if lost > 0:
        out.append(record(run_dir, "debugging", devices, kind, lost,
                          {**extra, "restarts": len(recovery), "note": "time lost to restarts"}))
    return out


def restart_seconds(rows: list[dict], recovery: list[dict], started: float) -> float:
    """Seconds this attempt (begun at `started`) lost to restarts: per restart that resumed in this attempt,
    the time from the failure (or the attempt's start, if the failure was an earlier attempt's) to the first
    resumed step, plus the steps redone at the run's median step time."""
    step_times = sorted(r["step_time"] for r in rows if r.get("step_time"))
    median = step_times[len(step_times) // 2] if step_times else 0.0
    starts = [r for r in rows if r.get("event") == "start"][1:]  # the first start is not a restart
    lost = 0.0
    for start, rep in zip(starts, recovery):
        if start["time"] < started:
            continue
        first = next((r["time"] for r in rows if "loss" in r and r["time"] >= start["time"]), None)
        window = min(rep["seconds_to_first_resumed_step"] or 0.0, (first - started) if first else 0.0)
        lost += max(0.0, window) + rep["steps_redone"] * median
    return lost


def collect(root: str) -> list[dict[str, Any]]:
    """Every record of every ledger.jsonl under `root` (a local directory tree or object storage), with its file."""
    out = []
    root = root if storage.is_remote(root) else os.path.expanduser(root)
    for f in storage.find(root, LEDGER_FILE):
        for i, rec in storage.jsonl_objects(f, LedgerError):
            for key in ("category", "devices", "device_kind", "device_hours"):
                if key not in rec:
                    raise LedgerError(f"{f}:{i}: record lacks {key!r}")
            out.append({**rec, "file": str(f)})
    return out


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The playbook's table, one row per (device kind, category): the largest number of devices a record of
    the category used, the days that many devices would take for its device-hours, and its share of the
    device kind's total."""
    hours: dict[tuple[str, str], float] = defaultdict(float)
    devices: dict[tuple[str, str], float] = defaultdict(float)
    for r in records:
        key = (r["device_kind"], r["category"])
        hours[key] += r["device_hours"]
        devices[key] = max(devices[key], r["devices"])
    totals: dict[str, float] = defaultdict(float)
    for (kind, _), h in hours.items():
        totals[kind] += h
    rows = []
    for kind in DEVICE_KINDS:
        for cat in CATEGORIES:
            if (kind, cat) not in hours:
                continue
            h, d = hours[(kind, cat)], devices[(kind, cat)]
            rows.append({"device_kind": kind, "category": LABELS[cat], "devices": d, "days": h / d / 24,
                         "device_hours": h, "share": h / totals[kind] if totals[kind] else 0.0})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    unit = {"gpu": ("GPUs", "GPU-hours"), "cpu": ("CPU cores", "CPU-core-hours")}
    lines = []
    for kind in DEVICE_KINDS:
        mine = [r for r in rows if r["device_kind"] == kind]
        if not mine:
            continue
        dev, hrs = unit[kind]
        lines += [f"| category | {dev} x days | {hrs} | share |", "|---|---|---|---|"]
        for r in mine:
            lines.append(f"| {r['category']} | {r['devices']:g} x {r['days']:.4g} | {r['device_hours']:,.4g} "
                         f"| {100 * r['share']:.1f}% |")
        total = sum(r["device_hours"] for r in mine)
        lines += [f"| **total** | | {total:,.4g} | 100% |", ""]
    return "\n".join(lines).rstrip() + "\n" if lines else "no ledger records found\n"


def cmd_ledger(args) -> int:
    records = collect(args.dir)
    if args.json:
        print(json.dumps(summarize(records), indent=1))
    else:
        print(format_table(summarize(records)), end="")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("ledger", help="sum the compute ledgers under DIR: category, devices x days, "
                                             "device-hours, share of total")
    p.add_argument("dir", help="a directory tree holding run directories (each with ledger.jsonl)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_ledger)
