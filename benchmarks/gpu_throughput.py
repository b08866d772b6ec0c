"""GPU throughput: raysmol's training step (DeepSpeed engine) vs a plain PyTorch + SDPA loop, same model, same run.

What is measured, on every visible GPU (one process each; ``--dry-run``: one CPU process, tiny shape):

* ``raysmol``  the loop's own step: ``build_model`` + ``prepare_for_training`` (attention implementation, Liger,
               activation checkpointing, compile from the config), ``make_optimizer``, ``deepspeed.initialize``
               with ``deepspeed_config`` (bf16, ZeRO stage from the config), the spike guard, and
               ``raysmol.train.loop.train_step`` (pinned non-blocking copies, document boundaries computed
               on the host, causal-LM objective).
* ``plain``    the same model (same seed, ``attn_implementation: sdpa``) on the device in fp32 with bf16
               autocast, fused ``torch.optim.AdamW`` over the same parameter groups, DDP when there are several
               GPUs, forward / cross-entropy / backward (loss / grad_accum) / clip / step. Packed documents are
               honoured the way transformers does it for SDPA: a block-diagonal mask from the position ids.

Both see the same synthetic micro-batches: random tokens packed into documents of random (geometric) lengths,
position ids restarting per document, the first document of a row starting mid-document like a real window.
Reported per GPU: tokens/s, MFU (raysmol's ``flops_per_token`` x tokens/s over the device's dense bf16 peak,
``train.peak_flops`` when set), peak memory; and raysmol / plain tokens/s. Goal (issue 8): >= 45% MFU on one
H200 at sequence 4096 and >= 1.0x the plain loop.

    python benchmarks/gpu_throughput.py [--config jobs/smollm3_1b_baseline.yaml] [--seq-len 4096]
        [--micro-batch 3] [--grad-accum 4] [--warmup 3] [--steps 10] [--profile DIR] [--json] [key.sub=value ...]
    python benchmarks/gpu_throughput.py --dry-run --json          # CPU, tiny shape (what the tests run)
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from a checkout

GOAL_MFU, GOAL_RATIO = 0.45, 1.0
DRY_RUN = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
           "model.intermediate_size=128", "model.vocab_size=512", "model.max_position_embeddings=256",
           "train.use_gpu=false", "train.precision=auto", "model.attn_implementation=auto"]


# ---------------------------------------------------------------- set-up


def bench_config(args, world: int):
    """The benchmark shape on top of the config file: accumulation `--grad-accum` at this world size."""
    from raysmol.config import load_config

    shape = [f"train.seq_len={args.seq_len}", f"train.micro_batch_size={args.micro_batch}",
             f"train.num_workers={world}", f"train.global_batch_tokens={args.micro_batch * args.seq_len * world * args.grad_accum}",
             f"train.steps={args.warmup + args.steps + args.profile_steps + 1}", "optim.warmup_steps=0",
             f"train.log_every={10**9}"]
    return load_config(args.config, (DRY_RUN if args.dry_run else []) + shape + list(args.overrides))


def synthetic_batches(cfg, n: int, seed: int, mean_doc_len: int) -> list:
    """`n` packed micro-batches: random tokens, geometric document lengths, positions restarting per document."""
    import numpy as np
    import torch

    from raysmol.data.batches import Batch

    rng = np.random.default_rng(seed)
    m, length, vocab = cfg.train.micro_batch_size, cfg.train.seq_len, cfg.vocab_size()
    out = []
    for _ in range(n):
        positions = np.empty((m, length), dtype=np.int64)
        for row in positions:
            offset, filled = int(rng.integers(0, mean_doc_len)), 0  # the row starts inside a document
            while filled < length:
                doc = min(int(rng.geometric(1 / mean_doc_len)), length - filled)
                row[filled:filled + doc] = np.arange(offset, offset + doc)
                filled, offset = filled + doc, 0
        tokens = torch.from_numpy(rng.integers(0, vocab, (m, length + 1)))
        out.append(Batch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), torch.from_numpy(positions),
                         np.zeros(m, dtype=np.int64), np.zeros(m, dtype=np.int64)))
    return out


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_memory(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _figures(cfg, times: list[float], losses: list[float], device, peak_flops: float | None) -> dict:
    from raysmol.model import flops_per_token

    t = cfg.train
    tokens_per_step = t.micro_batch_size * t.seq_len * t.grad_accum(t.num_workers)  # per GPU
    tps = tokens_per_step * len(times) / sum(times)
    return {"tokens_per_s_per_gpu": tps, "mfu": tps * flops_per_token(cfg) / peak_flops if peak_flops else None,
            "step_time_s": sum(times) / len(times), "peak_memory_gib": _peak_gib(device),
            "first_loss": losses[0], "last_loss": losses[-1]}


# ---------------------------------------------------------------- the two loops


def run_raysmol(cfg, batches: list, device, args, rank: int) -> dict:
    import deepspeed
    import torch

    from raysmol.model import build_model, prepare_for_training
    from raysmol.train.guard import Sentry, SpikeGuard
    from raysmol.train.loop import deepspeed_config, make_optimizer, train_step
    from raysmol.train.objectives import causal_lm

    t, g, world = cfg.train, cfg.guard, cfg.train.num_workers
    model = prepare_for_training(build_model(cfg, seed=t.seed), cfg)
    optimizer = make_optimizer(cfg, model)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, world))
    sentry = Sentry(engine, SpikeGuard(g.window, g.min_steps, g.loss_zscore, g.grad_norm_factor), g.action)
    optimizer.veto = sentry.veto
    accum = t.grad_accum(world)

    def step(k: int) -> torch.Tensor:
        mbs = [batches[(k * accum + a) % len(batches)] for a in range(accum)]
        losses = train_step(engine, causal_lm, mbs, device, sentry, k + 1)
        sentry.verdict()
        return torch.stack(losses).mean()

    times, losses = _timed(step, device, args)
    if args.profile:
        _profile(step, device, args, Path(args.profile) / f"raysmol_rank{rank}.json")
    figures = _figures(cfg, times, losses, device, _peak(cfg))
    del engine, optimizer, model, sentry
    return figures


def run_plain(cfg, batches: list, device, args) -> dict:
    import torch
    import torch.nn.functional as F

    from raysmol.config import from_dict
    from raysmol.model import build_model, precision
    from raysmol.train.loop import param_groups

    plain_cfg = from_dict({**cfg.to_dict(), "model": {**cfg.to_dict()["model"], "attn_implementation": "sdpa"},
                           "train": {**cfg.to_dict()["train"], "liger": False, "activation_checkpointing": False,
                                     "compile": False}}, origin="plain baseline")
    t, o, world = cfg.train, cfg.optim, cfg.train.num_workers
    model = build_model(plain_cfg, seed=t.seed).to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                  fused=True if cuda else None)
    bf16 = precision(cfg) == "bf16"
    accum = t.grad_accum(world)

    def step(k: int) -> torch.Tensor:
        losses = []
        for a in range(accum):
            mb = batches[(k * accum + a) % len(batches)].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = ddp(input_ids=mb.input_ids, position_ids=mb.position_ids).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), mb.labels.flatten())
            (loss / accum).backward()
            losses.append(loss.detach())
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return torch.stack(losses).mean()

    times, losses = _timed(step, device, args)
    figures = _figures(cfg, times, losses, device, _peak(cfg))
    del ddp, optimizer, model
    return figures


def _timed(step, device, args) -> tuple[list[float], list[float]]:
    """Per-step wall times of the measured window (after `args.warmup` steps) and every step's mean loss.
    One sync per step: the time is the device's, not the launch queue's."""
    times, losses = [], []
    for k in range(args.warmup + args.steps):
        _sync(device)
        start = time.perf_counter()
        loss = step(k)
        _sync(device)
        if k >= args.warmup:
            times.append(time.perf_counter() - start)
        losses.append(float(loss))
    return times, losses


def _profile(step, device, args, path: Path) -> None:
    """A chrome trace (chrome://tracing, ui.perfetto.dev) of `--profile-steps` steps after the measured window."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    path.parent.mkdir(parents=True, exist_ok=True)
    with profile(activities=activities, record_shapes=True) as prof:
        for k in range(args.profile_steps):
            step(args.warmup + args.steps + k)
        _sync(device)
    prof.export_chrome_trace(str(path))
    torch.distributed.barrier()


def _peak(cfg) -> float | None:
    from raysmol.train.loop import _gpu_peak

    return cfg.train.peak_flops or (_gpu_peak() if cfg.train.use_gpu else None)


def attention_check(cfg, device) -> dict:
    """The configured attention implementation against eager attention (dense block-diagonal mask) on a small
    model with the same switches, on this device and in the training precision: the max logit difference."""
    import torch

    from raysmol.config import apply_override
    from raysmol.model import attn_implementation, build_model, precision
    from raysmol.train.objectives import model_inputs, to_device

    small = __import__("copy").deepcopy(cfg)
    for o in DRY_RUN[:7] + ["train.seq_len=256", "train.micro_batch_size=2"]:
        apply_override(small, o)
    dtype = torch.bfloat16 if precision(cfg) == "bf16" else torch.float32
    batch = to_device(synthetic_batches(small, 1, seed=7, mean_doc_len=40)[0], device)
    logits = {}
    for impl in (attn_implementation(cfg), "eager"):
        small.model.attn_implementation = impl
        model = build_model(small, seed=0).to(device, dtype).eval()
        with torch.no_grad():
            logits[impl] = model(**model_inputs(model, batch)).logits.float()
    tested = attn_implementation(cfg)
    return {"implementation": tested, "reference": "eager", "dtype": str(dtype).removeprefix("torch."),
            "max_abs_logit_diff": float((logits[tested] - logits["eager"]).abs().max())}


# ---------------------------------------------------------------- one process per device


def worker(rank: int, world: int, port: int, args) -> dict | None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    from raysmol.model import attn_implementation, flops_per_token, param_count, precision
    from raysmol.train.loop import _init_distributed

    cfg = bench_config(args, world)
    if cfg.train.use_gpu:
        torch.cuda.set_device(rank)
    _init_distributed(cfg)
    device = torch.device("cuda", rank) if cfg.train.use_gpu else torch.device("cpu")
    check = attention_check(cfg, device) if rank == 0 else None
    batches = synthetic_batches(cfg, 2 * cfg.train.grad_accum(world), seed=1000 + rank, mean_doc_len=args.mean_doc_len)
    _reset_memory(device)
    raysmol = run_raysmol(cfg, batches, device, args, rank)
    _reset_memory(device)
    plain = None if args.skip_plain else run_plain(cfg, batches, device, args)
    dist.barrier()
    dist.destroy_process_group()
    if rank != 0:
        return None
    t = cfg.train
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "world_size": world,
        "dry_run": args.dry_run,
        "shape": {"config": str(args.config or "jobs/tiny.yaml"), "params": param_count(cfg), "seq_len": t.seq_len,
                  "micro_batch_size": t.micro_batch_size, "grad_accum": t.grad_accum(world),
                  "mean_doc_len": args.mean_doc_len, "zero_stage": t.zero_stage, "precision": precision(cfg),
                  "attn_implementation": attn_implementation(cfg), "liger": t.liger,
                  "activation_checkpointing": t.activation_checkpointing, "compile": t.compile},
        "flops_per_token": flops_per_token(cfg), "peak_flops": _peak(cfg), "warmup": args.warmup, "steps": args.steps,
        "attention_check": check, "raysmol": raysmol, "plain": plain,
        "ratio": raysmol["tokens_per_s_per_gpu"] / plain["tokens_per_s_per_gpu"] if plain else None,
        "goal": {"mfu": GOAL_MFU, "ratio": GOAL_RATIO},
        "profile": str(Path(args.profile) / "raysmol_rank0.json") if args.profile else None,
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "deepspeed": __import__("deepspeed").__version__},
    }
    mfu = raysmol["mfu"]
    result["meets_goal"] = (mfu is not None and mfu >= GOAL_MFU and result["ratio"] is not None
                            and result["ratio"] >= GOAL_RATIO)
    _report(result, args)
    return result


def _spawned(rank: int, world: int, port: int, args) -> None:
    worker(rank, world, port, args)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _report(res: dict, args) -> None:
    if args.json:
        print(json.dumps(res), flush=True)  # one line: the last line of stdout
        return
    s = res["shape"]
    print(f"{res['device']} x{res['world_size']}: {s['params'] / 1e6:,.1f}M params, micro-batch {s['micro_batch_size']}x"
          f"{s['seq_len']}, grad_accum {s['grad_accum']}, docs ~{s['mean_doc_len']} tokens, {s['precision']}, "
          f"ZeRO-{s['zero_stage']}, attention {s['attn_implementation']}; {res['steps']} steps after {res['warmup']}")
    print(f"{'loop':<10}{'tokens/s/GPU':>14}{'MFU':>8}{'ms/step':>10}{'peak GiB':>10}{'first loss':>12}")
    for name in ("raysmol", "plain"):
        r = res[name]
        if r is None:
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "n/a"
        print(f"{name:<10}{r['tokens_per_s_per_gpu']:>14,.0f}{mfu:>8}{1000 * r['step_time_s']:>10.1f}{mem:>10}"
              f"{r['first_loss']:>12.4f}")
    if res["ratio"] is not None:
        print(f"raysmol / plain tokens/s = {res['ratio']:.2f}x (goal >= {GOAL_RATIO}x; MFU goal >= {GOAL_MFU:.0%}: "
              f"{'met' if res['meets_goal'] else 'not met'})")
    c = res["attention_check"]
    print(f"attention check: {c['implementation']} vs {c['reference']} on packed documents ({c['dtype']}): "
          f"max |logit diff| {c['max_abs_logit_diff']:.2e}")
    if res["profile"]:
        print(f"profiler trace: {res['profile']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides (parsed as YAML)")
    p.add_argument("--config", default=None, help="YAML config (default: jobs/smollm3_1b_baseline.yaml; "
                                                  "--dry-run: the embedded jobs/tiny.yaml)")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length (default: 4096; dry run 64)")
    p.add_argument("--micro-batch", type=int, default=None, help="micro-batch per GPU (default: 3; dry run 2)")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per step (default: 4; dry run 1)")
    p.add_argument("--warmup", type=int, default=None, help="discarded steps (default: 3; dry run 1)")
    p.add_argument("--steps", type=int, default=None, help="measured steps (default: 10; dry run 2)")
    p.add_argument("--mean-doc-len", type=int, default=None, help="mean document length (default: 1024; dry run 16)")
    p.add_argument("--profile", metavar="DIR", default=None, help="write a PyTorch profiler chrome trace to DIR")
    p.add_argument("--profile-steps", type=int, default=None, help="steps in the trace (default: 3; dry run 1)")
    p.add_argument("--skip-plain", action="store_true", help="measure raysmol only")
    p.add_argument("--dry-run", action="store_true", help="CPU, one process, tiny model: checks the script runs")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    defaults = ({"seq_len": 64, "micro_batch": 2, "grad_accum": 1, "warmup": 1, "steps": 2, "mean_doc_len": 16,
                 "profile_steps": 1} if args.dry_run else
                {"seq_len": 4096, "micro_batch": 3, "grad_accum": 4, "warmup": 3, "steps": 10, "mean_doc_len": 1024,
                 "profile_steps": 3, "config": str(ROOT / "jobs" / "smollm3_1b_baseline.yaml")})
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if not args.profile:
        args.profile_steps = 0
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            p.error("no CUDA GPU visible; use --dry-run to check the script on a CPU")
    world = 1 if args.dry_run else __import__("torch").cuda.device_count()
    port = _free_port()
    if world == 1:
        worker(0, 1, port, args)
    else:
        import torch.multiprocessing as mp

        mp.spawn(_spawned, args=(world, port, args), nprocs=world, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
