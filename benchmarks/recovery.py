"""Recovery time: seconds from a crash to the first resumed step, from losing a node to training on fewer
workers, and from a rank that blocks forever to its detection and the first resumed step. Goals on the 2-core
development machine: <= 15 s, <= 30 s, and a hang caught within its bound (60 s by default) then resumed within 20 s.

    .venv/bin/python benchmarks/recovery.py [--only crash,node_loss,hang,chaos,fresh_nodes] [--steps 40] [--json]

Crash: a 2-worker ZeRO-2 run of the tiny model whose rank 0 hard-exits (`faults.crash_mode=exit`, like a
segfault) right after step 25; Ray Train restarts the worker group and raysmol resumes from checkpoint 20. The time
is read from the run's own recovery report (drill timestamp -> first step row after the restart).

Node loss: a Ray cluster of a CPU-less head and two 1-CPU worker nodes on this machine (`ray.cluster_utils.Cluster`),
an elastic run (`train.min_workers=1`, `train.num_workers=2`, one worker per node). At step 25 every rank pauses
(`faults.pause_at_step`), the benchmark removes one worker node, and Ray Train restarts with the one worker that
still fits; raysmol reshards the ZeRO state of checkpoint 20 through DeepSpeed's universal format. The time runs
from `remove_node` to the first step row of the 1-worker attempt.

Hang: the crash run's set-up, but rank 1 blocks forever after step 25 (`faults.hang_at_step`, default watchdog
settings). Without the watchdog it would wait in gloo's collective for the process group's timeout (1800 s, the
baseline the ratio is against); the run's recovery report gives the detection time (the hung window's age when it
fired) and the time from the hang to the first resumed step.

Fresh nodes: tests/test_autoscaling.py (Ray's autoscaler v2 on its fake multi-node provider, from zero worker
nodes): seconds from submitting a 2-worker run to its first step on the nodes launched for it, how soon the idle
nodes are removed afterwards, and how soon an elastic run trains at the larger size once a node may join.

Chaos: tests/test_chaos.py, run by pytest (its cluster of three private-disk nodes and its S3 server are test
fixtures): ten faults in one 40-step run, then the same run uninterrupted; the wall time of each, from the driver's
start to its exit (the chaos run's includes its re-submission), and the overhead. `--steps` does not apply.

`--steps N` scales the run: checkpoints every N/4 steps, the fault after step 5N/8 (the test suite runs 16 steps;
the recovery time itself does not depend on it). Each part runs in its own process (each owns its Ray cluster).
Prints one line per part, or JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

GOALS = {"crash": 15.0, "node_loss": 30.0, "hang": 60.0 + 20.0, "chaos": None, "fresh_nodes": None}
PG_TIMEOUT_S = 1800.0  # what a hung rank costs without the watchdog (torch's default process-group timeout)


def common(steps: int) -> list[str]:
    return [f"train.steps={steps}", f"train.checkpoint_every={steps // 4}", "optim.warmup_steps=5",
            "train.eval_every=0", "train.max_failures=2", "train.log_every=1"]


def fault_step(steps: int) -> int:
    return steps * 5 // 8


def crash(out: str, steps: int) -> dict:
    import ray

    from raysmol.config import load_config
    from raysmol.recipes import pretrain

    ray.init(address="local", num_cpus=4)
    cfg = load_config(None, [*common(steps), f"run.output_dir={out}", "run.name=crash",
                             f"faults.crash_at_step={fault_step(steps)}",
                             "faults.crash_mode=exit"])
    summary = pretrain(cfg, show_progress=False)
    (rec,) = summary["recovery"]
    return {"seconds": rec["seconds_to_first_resumed_step"], "resume_step": rec["resume_step"],
            "steps_redone": rec["steps_redone"], "world_size": rec["world_size"]}


def hang(out: str, steps: int) -> dict:
    import ray

    from raysmol.config import load_config
    from raysmol.recipes import pretrain

    ray.init(address="local", num_cpus=4)
    cfg = load_config(None, [*common(steps), f"run.output_dir={out}", "run.name=hang",
                             f"faults.hang_at_step={fault_step(steps)}", "faults.crash_rank=1"])
    summary = pretrain(cfg, show_progress=False)
    (rec,) = summary["recovery"]
    return {"seconds": rec["seconds_to_first_resumed_step"], "detect_s": rec["hang"]["stuck_s"],
            "bound_s": rec["hang"]["bound_s"], "where": rec["hang"]["where"], "resume_step": rec["resume_step"],
            "world_size": rec["world_size"]}


def _test_result(out: str, test: str, tag: str) -> dict:
    """Run a test module whose cluster the test fixtures own; the line it prints starting with `tag`."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "--basetemp", out,
                           test], cwd=root, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith(tag + " ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"{test} failed ({proc.returncode}):\n{proc.stdout[-5000:]}")
    return json.loads(line[len(tag) + 1:])


def chaos(out: str, steps: int) -> dict:
    r = _test_result(out, "tests/test_chaos.py", "CHAOS")
    return {**r, "seconds": r["chaos_s"] - r["clean_s"], "ratio": r["chaos_s"] / r["clean_s"]}


def fresh_nodes(out: str, steps: int) -> dict:
    r = _test_result(out, "tests/test_autoscaling.py", "FRESH_NODES")
    return {**r, "seconds": r["submit_to_first_step_s"]}


def node_loss(out: str, steps: int) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from raysmol.config import load_config
    from raysmol.recipes import pretrain

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    try:
        ray.init(address=cluster.address)
        cfg = load_config(None, [*common(steps), f"run.output_dir={out}", "run.name=node_loss", "train.min_workers=1",
                                 f"faults.pause_at_step={fault_step(steps)}", "faults.pause_seconds=600"])
        box: dict = {}

        def go():
            try:
                box["summary"] = pretrain(cfg, show_progress=False)
            except BaseException as e:  # reported below
                box["error"] = e

        th = threading.Thread(target=go, daemon=True)
        th.start()
        marker = os.path.join(out, "node_loss", "faults", f"pause_at_step-{fault_step(steps)}-rank0")
        deadline = time.time() + 600
        while not os.path.exists(marker) and time.time() < deadline:
            time.sleep(0.2)
        removed_at = time.time()
        cluster.remove_node(nodes[1])  # the main thread must call it (Ray's rule)
        th.join(timeout=900)
        if "error" in box:
            raise box["error"]
        rows = [json.loads(x) for x in open(os.path.join(out, "node_loss", "metrics.jsonl"))]
        starts = [i for i, r in enumerate(rows) if r.get("event") == "start"]
        first = next(r for r in rows[starts[-1]:] if "loss" in r)
        rec = box["summary"]["recovery"][-1]
        return {"seconds": first["time"] - removed_at, "resume_step": rec["resume_step"],
                "world_size": rec["world_size"], "final_step": box["summary"]["steps"]}
    finally:
        ray.shutdown()
        cluster.shutdown()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(GOALS), help=f"comma-separated parts (default: {','.join(GOALS)})")
    p.add_argument("--steps", type=int, default=40, help="run length (default 40; at least 8)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--_part", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.steps < 8:
        p.error(f"--steps {args.steps}: at least 8 (a checkpoint every steps/4, the fault after step 5*steps/8)")
    if args._part:
        with tempfile.TemporaryDirectory(prefix="raysmol-recovery-") as out:
            print("RESULT " + json.dumps({"crash": crash, "node_loss": node_loss, "hang": hang, "chaos": chaos,
                                        "fresh_nodes": fresh_nodes}[args._part](out, args.steps)))
        return 0
    parts = [x for x in args.only.split(",") if x]
    if bad := [x for x in parts if x not in GOALS]:
        p.error(f"--only: unknown part(s) {bad}; valid: {', '.join(GOALS)}")
    results = {}
    for part in parts:
        proc = subprocess.run([sys.executable, __file__, "--_part", part, "--steps", str(args.steps)],
                              capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{part}: failed (exit {proc.returncode})")
        results[part] = {**json.loads(line[len("RESULT "):]), "goal_s": GOALS[part]}
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    for part, r in results.items():
        if part == "fresh_nodes":
            print(f"{part:10s} {r['seconds']:6.1f} s from submit to the first step on freshly launched nodes "
                  f"({r['prepare_s']:.0f} s of it preparing data on a node launched for it); idle nodes gone "
                  f"{r['nodes_removed_after_s']:.0f} s after the run; an elastic run's first step at the larger size "
                  f"{r['grown_first_step_after_allowed_s']:.0f} s after a node was allowed to join")
            continue
        if part == "chaos":
            print(f"{part:10s} {r['chaos_s']:6.0f} s with {r['faults']} faults vs {r['clean_s']:.0f} s uninterrupted: "
                  f"{r['ratio']:.2f}x, {r['seconds'] / r['faults']:.0f} s per fault")
            continue
        ok = "met" if r["seconds"] <= r["goal_s"] else "MISSED"
        if part == "hang":
            print(f"{part:10s} {r['seconds']:6.1f} s from the hang to the first resumed step (goal <= {r['goal_s']:.0f} s: "
                  f"{ok}): caught after {r['detect_s']:.1f} s (bound {r['bound_s']:.0f} s) in {r['where']}; "
                  f"{PG_TIMEOUT_S / r['seconds']:.0f}x sooner than the process group's {PG_TIMEOUT_S:.0f} s timeout")
            continue
        print(f"{part:10s} {r['seconds']:6.1f} s to the first resumed step (goal <= {r['goal_s']:.0f} s: {ok}); "
              f"resumed at step {r['resume_step']} on {r['world_size']} worker(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
