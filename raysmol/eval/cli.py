"""`raysmol eval`: one verb, three ways in.

    raysmol eval CHECKPOINT [CHECKPOINT ...] --suite eval/suites/tiny.yaml     CF/MCF through LightEval
    raysmol eval CHECKPOINT [CHECKPOINT ...] --task gsm8k|humaneval            generate with engine actors, score
    raysmol eval --task gsm8k|humaneval --predictions FILE.jsonl               score given completions
    raysmol eval RUN_DIR [RUN_DIR ...] --exports --suite FILE | --task ...      every export of a run, by step

Results land under `--out` (JSON per checkpoint and task); with several checkpoints a PNG compares them; with
--exports a PNG and a JSON give each run's scores against the training step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from raysmol import storage
from raysmol.eval import cf, freeform


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="score checkpoints on a CF/MCF suite (LightEval) or GSM8K/HumanEval (engines), "
                                    "or score a predictions file", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="*", metavar="CHECKPOINT",
                   help="Hugging Face model folder (save_pretrained) or a run directory (uses its hf/)")
    p.add_argument("--suite", help="suite YAML, e.g. eval/suites/smollm3_ablation.yaml")
    p.add_argument("--out", default="eval_results", help="results folder (default: ./eval_results)")
    p.add_argument("--exports", action="store_true",
                   help="each CHECKPOINT is a run directory: score each of its exports (exports/step_*/, from "
                        "train.export_every or `raysmol export`, and the final hf/); plot score against step in "
                        "OUT/exports.png, scores in OUT/exports.json")
    p.add_argument("--max-samples", type=int, default=None, help="suite: samples per task (overrides the suite)")
    p.add_argument("--batch-size", type=int, default=64, help="suite: sequences per forward pass (default 64)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="suite: default cpu")
    freeform.add_arguments(p)
    p.add_argument("--engine", default="vllm", choices=("vllm", "transformers"), help="freeform: default vllm")
    p.add_argument("--num-engines", type=int, default=1, help="freeform: engine actors (default 1)")
    p.add_argument("--gpus-per-engine", type=float, default=0, help="freeform: 1 on GPU clusters (default 0)")
    p.add_argument("--limit", type=int, default=None, help="freeform: first N problems only")
    p.add_argument("--samples", type=int, default=1, help="freeform: samples per problem (pass@k needs k)")
    p.add_argument("--max-tokens", type=int, default=None, help="freeform: tokens per sample")
    p.add_argument("--shots", type=int, default=5, help="GSM8K: worked examples in the prompt (default 5)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="freeform: prompts as a conversation in the model's chat template (default: when it has "
                        "one); --no-chat: base-model text prompts")
    p.add_argument("--timeout", type=float, default=1800, help="freeform: seconds per engine call (default 1800)")
    p.set_defaults(fn=run)
    return p


def run(args) -> int:
    if args.predictions:
        if args.checkpoints or args.suite:
            return _usage("--predictions scores a file; it takes no CHECKPOINT and no --suite")
        return freeform.run_predictions(args)
    if not args.checkpoints:
        return _usage("give one or more CHECKPOINTs (with --suite or --task), or --task and --predictions")
    if bool(args.suite) == bool(args.task):
        return _usage("give exactly one of --suite FILE and --task gsm8k|humaneval")
    scores: dict[str, dict[str, tuple[float, float]]] = {}
    # (what to evaluate, (run, step) when it is one of a run's exports)
    targets: list[tuple[str, tuple[str, int] | None]] = [(c, None) for c in args.checkpoints]
    if args.exports:
        targets = [(folder, (run, step)) for run in args.checkpoints for step, folder in run_exports(run)]
    curves: dict[str, list[dict[str, Any]]] = {}
    for ckpt, at in targets:
        folder = cf.resolve_checkpoint(ckpt)
        started = time.time()
        if args.suite:
            results = cf.evaluate_suite(str(folder), args.suite, args.out, max_samples=args.max_samples,
                                        batch_size=args.batch_size, device=args.device)
            print(cf.format_table(results))
            name = next(iter(results.values()))["model"]["name"]
            scores[name] = {t: (r["score"], r["stderr"]) for t, r in results.items()}
        else:
            name, res = _freeform(args, folder, ckpt)
            print(freeform.format_table(res))
            scores[name] = {res["task"]: (res["score"], res["stderr"])}
        _book(args, name, time.time() - started)
        print(f"{name}: results in {storage.join(args.out, name)}")
        if at is not None:
            curves.setdefault(at[0], []).append({"step": at[1], "model": name, "path": str(folder),
                                                 "scores": scores[name]})
    if curves:
        print(format_curves(curves))
        print(f"scores by step: {exports_plot(curves, args.out)}")
    elif len(scores) > 1:
        print(f"comparison plot: {compare_plot(scores, args.out)}")
    return 0


def run_exports(run: str) -> list[tuple[int, str]]:
    """(step, folder) of every export of run directory `run`, oldest first: exports/step_*/ and the final hf/ (its
    step from summary.json), unless an export of that step is already there."""
    from raysmol.model.folder import ModelFolderError
    from raysmol.train.export import exports

    run = run if storage.is_remote(run) else os.path.abspath(os.path.expanduser(run))
    found = exports(run)
    final, summary = storage.join(run, "hf"), storage.join(run, "summary.json")
    if storage.exists(storage.join(final, "config.json")):
        if storage.exists(summary):
            step = json.loads(storage.read_text(summary))["steps"]
            if step not in {s for s, _ in found}:
                found.append((step, final))
        else:
            print(f"raysmol eval: note: {final} skipped: no summary.json says which step it is", file=sys.stderr)
    if not found:
        raise ModelFolderError(f"--exports: {run!r} holds no exports (exports/step_<step>/ or hf/): give a run "
                               "directory trained with train.export_every, or make exports with `raysmol export "
                               "<run>/checkpoints/checkpoint_<step>`")
    return sorted(found)


def format_curves(curves: dict[str, list[dict[str, Any]]]) -> str:
    """One table per run: a row per export, a column per task (score ± stderr)."""
    out = []
    for run, points in curves.items():
        tasks = sorted({t for p in points for t in p["scores"]})
        out.append(run)
        out.append(" | ".join(["step", *tasks, "model"]))
        for p in sorted(points, key=lambda p: p["step"]):
            cells = [f"{p['scores'][t][0]:.4f} ± {p['scores'][t][1]:.4f}" if t in p["scores"] else "-" for t in tasks]
            out.append(" | ".join([str(p["step"]), *cells, p["model"]]))
    return "\n".join(out)


def exports_plot(curves: dict[str, list[dict[str, Any]]], out: str) -> str:
    """Score against training step: a line per run and task, stderr as error bars; the numbers in exports.json."""
    from raysmol.rundir import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for run, points in curves.items():
        points = sorted(points, key=lambda p: p["step"])
        label = run.rstrip("/").rsplit("/", 1)[-1]
        for t in sorted({t for p in points for t in p["scores"]}):
            pts = [(p["step"], *p["scores"][t]) for p in points if t in p["scores"]]
            ax.errorbar([x[0] for x in pts], [x[1] for x in pts], yerr=[x[2] for x in pts], marker="o", capsize=3,
                        label=f"{label}: {t}" if len(curves) > 1 else t)
    if len(curves) == 1:
        ax.set_title(next(iter(curves)).rstrip("/").rsplit("/", 1)[-1])
    ax.set_xlabel("step")
    ax.set_ylabel("score")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    path = save_figure(fig, storage.join(out, "exports.png"))
    storage.write_text(storage.join(out, "exports.json"), json.dumps(curves, indent=1) + "\n")
    return path


def _freeform(args, folder, given: str) -> tuple[str, dict[str, Any]]:
    from raysmol import nodes
    from raysmol.eval.generate import evaluate_freeform, use_chat
    from raysmol.runtime import init_ray
    from raysmol.serve.pool import EnginePool

    from transformers import AutoTokenizer

    name = cf.model_identity(folder)["name"]
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    chat = use_chat(tokenizer, args.chat, given)
    why = {True: "--chat", False: "--no-chat", None: f"the model has {'a' if chat else 'no'} chat template"}[args.chat]
    print(f"raysmol eval: {args.task} prompts {'in its chat template' if chat else 'as plain text'} ({why})",
          file=sys.stderr)
    init_ray()
    # The engines may start on any node: a model on object storage goes to them as its URI (each node fetches
    # its own copy); a local one must be visible there.
    remote_folder = storage.is_remote(given) and any(storage.exists(storage.join(given, *p, "config.json"))
                                                     for p in ((), ("hf",)))  # what storage.model_folder takes
    model = given if remote_folder else str(folder)
    if model == str(folder):
        nodes.require_shared({"CHECKPOINT": model}, "the inference engines load it")
    with EnginePool(args.engine, model, num_engines=args.num_engines, timeout_s=args.timeout,
                    gpus_per_engine=args.gpus_per_engine) as pool:
        res = evaluate_freeform(pool, args.task, storage.join(args.out, name, "freeform"), limit=args.limit,
                                samples=args.samples, max_tokens=args.max_tokens, shots=args.shots,
                                reference=args.reference, workers=args.workers,
                                allow_unsandboxed=args.allow_unsandboxed, tokenizer=tokenizer if chat else None)
    return name, res


def _book(args, name: str, seconds: float) -> None:
    """The compute ledger's `evaluation` line: GPUs held by the engines, else one CPU core per engine/process."""
    from raysmol import ledger

    gpus = args.num_engines * args.gpus_per_engine if args.task else (1 if args.device == "cuda" else 0)
    ledger.record(storage.join(args.out, name), "evaluation", gpus or (args.num_engines if args.task else 1),
                  "gpu" if gpus else "cpu", seconds, {"suite": args.suite, "task": args.task})


def compare_plot(scores: dict[str, dict[str, tuple[float, float]]], out: str) -> str:
    """Grouped bars: one group per task, one bar per checkpoint, stderr as error bars."""
    from raysmol.rundir import pyplot, save_figure

    plt = pyplot()
    tasks = sorted({t for s in scores.values() for t in s})
    width = 0.8 / len(scores)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(tasks) * len(scores)), 4))
    for i, (name, s) in enumerate(scores.items()):
        xs = [j + i * width for j, t in enumerate(tasks) if t in s]
        ax.bar(xs, [s[t][0] for t in tasks if t in s], width, yerr=[s[t][1] for t in tasks if t in s],
               capsize=3, label=name)
    ax.set_xticks([j + width * (len(scores) - 1) / 2 for j in range(len(tasks))], tasks, rotation=20)
    ax.set_ylabel("score")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    path = save_figure(fig, storage.join(out, "compare.png"))
    storage.write_text(storage.join(out, "compare.json"), json.dumps(scores, indent=1) + "\n")
    return path


def _usage(msg: str) -> int:
    print(f"raysmol eval: error: {msg}", file=sys.stderr)
    return 2
