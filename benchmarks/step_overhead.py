"""Step overhead: a 1-worker raysmol run (Ray Train + DeepSpeed) vs a plain PyTorch loop, same model and batches.

What is measured:

* ``raysmol``  the real path: ``raysmol.recipes.pretrain(cfg)`` with ``train.num_workers=1`` (a Ray Train
               ``TorchTrainer`` running ``raysmol.train.loop.train_func`` under DeepSpeed). Two numbers come out
               of the run's ``metrics.jsonl`` (written by the driver):
               - ``step_time``: what the loop itself logs per step (data, forward, backward, ``engine.step``
                 of every micro-batch; not the logging, grad-norm and loss all-reduce that follow it);
               - ``iteration``: the interval between consecutive steps' metric rows reaching the driver's
                 progress actor (this benchmark swaps in a progress actor that stamps arrival times), i.e.
                 everything the loop does per step, bookkeeping included.
               Warm-up steps and the last step (validation and the final checkpoint) are discarded;
               ``checkpoint_every`` and ``eval_every`` are set so nothing else falls in the window.
* ``plain``    a subprocess with the same torch thread count as a raysmol worker
               (``train.cpu_threads_per_worker``): the same model (``build_model(cfg, eos_id, seed)``),
               ``torch.optim.AdamW`` over the same ``param_groups``, the same LambdaLR schedule, the same
               micro-batches (raysmol's ``Batches`` over the same prepared data), forward, cross-entropy,
               backward (loss / grad_accum), ``clip_grad_norm_``, ``step``, ``zero_grad``. Run once before and
               once after the raysmol run (``--baseline-runs``), so drifting machine load shows up.

How to read the output: medians in milliseconds and the ratios raysmol/plain; the goal is <= 1.10x for
``step_time``. The ``iteration`` ratio is what a user's tokens/s actually sees. Data preparation, Ray and
DeepSpeed start-up are not in any of the medians (the raysmol run's total wall time is printed for reference).

    .venv/bin/python benchmarks/step_overhead.py [--steps 100] [--warmup 10] [key.sub=value ...] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

GOAL = 1.10


# ---------------------------------------------------------------- plain PyTorch baseline (a subprocess)


def _plain(spec: dict) -> dict:
    import torch

    threads = spec["threads"]
    torch.set_num_threads(threads)
    import torch.nn.functional as F

    from raysmol.config import from_dict
    from raysmol.data.batches import Batches
    from raysmol.data.store import TokenStream
    from raysmol.model import build_model
    from raysmol.train.loop import param_groups
    from raysmol.train.schedule import lr_multiplier

    cfg = from_dict(spec["config"], origin="step_overhead")
    t, o = cfg.train, cfg.optim
    batches = Batches([TokenStream(d, cfg.data.seed, cfg.data.shuffle) for d in spec["train_dirs"]], [s.weight for s in cfg.data.sources],
                      cfg.data.seed, t.seq_len, t.samples_per_step(), cfg.data.intra_doc_masking)
    model = build_model(cfg, spec["eos_id"], seed=t.seed)
    model.train()
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(o, t.steps))
    accum = t.grad_accum(1)
    times, first_losses = [], []
    for step in range(t.steps):
        start = time.perf_counter()
        for mb in batches.micro_batches(step, 0, 1, t.micro_batch_size):
            logits = model(input_ids=mb.input_ids, position_ids=mb.position_ids).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), mb.labels.flatten())
            (loss / accum).backward()
            if step == 0:
                first_losses.append(float(loss))
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {"step_time": times, "first_loss": sum(first_losses) / len(first_losses), "threads": torch.get_num_threads()}


def run_plain(spec: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        proc = subprocess.run([sys.executable, __file__, "--_plain", f.name], env=env, capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if proc.returncode:
        raise RuntimeError(f"plain baseline failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- raysmol


def _timed_progress_class():
    import ray

    @ray.remote(num_cpus=0)
    class TimedProgress:
        """raysmol.train.launch.Progress, plus the arrival time of each row (for the iteration interval)."""

        def __init__(self):
            self.rows = []

        def log(self, metrics):
            self.rows.append({**metrics, "recv_time": time.time()})

        def since(self, i):
            return self.rows[i:]

    return TimedProgress


def run_raysmol(cfg) -> dict:
    from raysmol import recipes, storage
    from raysmol.rundir import run_dir
    from raysmol.train import launch

    launch.Progress = _timed_progress_class()  # same interface; rows also carry recv_time
    summary = recipes.pretrain(cfg, show_progress=False)
    rows = [json.loads(line) for line in storage.read_text(storage.join(run_dir(cfg), "metrics.jsonl")).splitlines()
            if line.strip()]
    return {"rows": [r for r in rows if "loss" in r], "wall_s": summary["wall_time_s"], "first_loss": summary["first_loss"]}


# ---------------------------------------------------------------- main


def _ms(xs: list[float]) -> float:
    return 1000 * statistics.median(xs)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides (parsed as YAML)")
    p.add_argument("--config", default=None, help="YAML config (default: the embedded jobs/tiny.yaml)")
    p.add_argument("--steps", type=int, default=100, help="measured steps (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=10, help="discarded steps at the start (default: %(default)s)")
    p.add_argument("--baseline-runs", type=int, default=2, choices=(1, 2),
                   help="plain runs: 1 = before raysmol, 2 = before and after (default: %(default)s)")
    p.add_argument("--keep", action="store_true", help="keep the run directory (printed)")
    p.add_argument("--verbose", action="store_true", help="show Ray's and the workers' logs")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--_plain", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._plain:
        with open(args._plain) as f:
            print(json.dumps(_plain(json.load(f))))
        return 0

    import logging

    import ray

    from raysmol.config import load_config
    from raysmol.data.prepare import prepare
    from raysmol.data.tokenizer import tokenizer_for

    if not args.verbose:
        logging.getLogger("ray").setLevel(logging.ERROR)
    out_dir = tempfile.mkdtemp(prefix="raysmol-step-overhead-")
    total = args.warmup + args.steps + 1  # +1: the last step evaluates and checkpoints, and is discarded
    defaults = [f"train.steps={total}", "train.num_workers=1", f"train.checkpoint_every={10**9}", "train.eval_every=0",
                "train.log_every=1", f"run.output_dir={out_dir}", "run.name=step_overhead"]
    cfg = load_config(args.config, defaults + list(args.overrides))
    if cfg.train.steps != total or cfg.train.num_workers != 1:
        p.error("set the step count with --steps/--warmup; this benchmark measures 1 worker")
    cfg.optim.warmup_steps = min(cfg.optim.warmup_steps, total - 1)  # keep the config valid for short runs
    threads = cfg.train.cpu_threads_per_worker

    # Untimed set-up: Ray, tokenizer, prepared data (normally a cache hit).
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=args.verbose)
        else:
            ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=args.verbose,
                     logging_level="INFO" if args.verbose else "ERROR")
    tok = tokenizer_for(cfg)
    sources = prepare(cfg, tok, show_progress=False)
    spec = {"config": cfg.to_dict(), "train_dirs": [str(s.split_dir("train")) for s in sources], "eos_id": tok.eos_id,
            "threads": threads}
    load_before = os.getloadavg()[0]
    try:
        plain_runs = [run_plain(spec)]
        ray_res = run_raysmol(cfg)
        if args.baseline_runs == 2:
            plain_runs.append(run_plain(spec))
    finally:
        ray.shutdown()
        if not args.keep:
            shutil.rmtree(out_dir, ignore_errors=True)
    load_after = os.getloadavg()[0]

    rows = ray_res["rows"]
    window = [r for r in rows if args.warmup < r["step"] < total]
    step_times = [r["step_time"] for r in window]
    by_step = {r["step"]: r for r in rows}
    intervals = [r["recv_time"] - by_step[r["step"] - 1]["recv_time"] for r in window
                 if "recv_time" in r and "recv_time" in by_step.get(r["step"] - 1, {})]
    plain_times = [x for run in plain_runs for x in run["step_time"][args.warmup: total - 1]]
    plain_ms = _ms(plain_times)
    res = {
        "config": {"model": cfg.to_dict()["model"], "micro_batch_size": cfg.train.micro_batch_size,
                   "seq_len": cfg.train.seq_len, "global_batch_tokens": cfg.train.global_batch_tokens,
                   "grad_accum": cfg.train.grad_accum(1), "zero_stage": cfg.train.zero_stage, "threads": threads},
        "steps": args.steps, "warmup": args.warmup, "load_avg_1m": [load_before, load_after],
        "raysmol_step_time_ms": _ms(step_times),
        "raysmol_iteration_ms": _ms(intervals) if intervals else None,
        "plain_step_ms": plain_ms,
        "plain_step_ms_per_run": [_ms(r["step_time"][args.warmup: total - 1]) for r in plain_runs],
        "ratio_step_time": _ms(step_times) / plain_ms,
        "ratio_iteration": (_ms(intervals) / plain_ms) if intervals else None,
        "goal": GOAL,
        "first_loss": {"raysmol": ray_res["first_loss"], "plain": plain_runs[0]["first_loss"]},
        "raysmol_wall_s": ray_res["wall_s"],
        "run_dir": os.path.join(out_dir, "step_overhead") if args.keep else None,
    }
    res["meets_goal"] = res["ratio_step_time"] <= GOAL
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    c = res["config"]
    print(f"model: {cfg.model.arch} h={cfg.model.hidden_size} layers={cfg.model.num_layers}; micro-batch "
          f"{c['micro_batch_size']}x{c['seq_len']}, grad_accum {c['grad_accum']}, ZeRO-{c['zero_stage']}, "
          f"{threads} torch thread(s); median of {args.steps} steps after {args.warmup} warm-up "
          f"(load avg {load_before:.1f} -> {load_after:.1f})")
    print(f"{'method':<40}{'median ms/step':>16}{'vs plain':>10}")
    print(f"{'plain PyTorch (' + ', '.join(f'{x:.1f}' for x in res['plain_step_ms_per_run']) + ' per run)':<40}"
          f"{plain_ms:>16.1f}{1:>10.2f}")
    print(f"{'raysmol step_time (metrics.jsonl)':<40}{res['raysmol_step_time_ms']:>16.1f}{res['ratio_step_time']:>10.2f}")
    if intervals:
        print(f"{'raysmol iteration (row arrival interval)':<40}{res['raysmol_iteration_ms']:>16.1f}"
              f"{res['ratio_iteration']:>10.2f}")
    print(f"raysmol/plain step_time = {res['ratio_step_time']:.2f}x "
          f"(goal <= {GOAL}x: {'met' if res['meets_goal'] else 'MISSED'}); "
          f"first loss raysmol {res['first_loss']['raysmol']:.4f} vs plain {res['first_loss']['plain']:.4f}; "
          f"raysmol run wall time {res['raysmol_wall_s']:.0f}s (start-up included)")
    if res["run_dir"]:
        print(f"run directory (kept): {res['run_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
