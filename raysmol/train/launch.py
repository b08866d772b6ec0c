"""Ray glue for pretraining: tokenizer and data preparation, TorchTrainer, progress, run directory."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

import ray

from raysmol import ledger, storage
from raysmol.config import Config, ConfigError
from raysmol.data.prepare import prepare
from raysmol.data.tokenizer import resolve_tokenizer
from raysmol.model import flops_per_token, param_count
from raysmol.train.loop import train_func

log = logging.getLogger(__name__)


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in RAY_ADDRESS (as under `ray job submit`), else start a local one."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        # Logical CPUs may exceed physical cores: each worker pins torch to cpu_threads_per_worker threads.
        ray.init(address="local", num_cpus=num_cpus or max(4, os.cpu_count() or 1), log_to_driver=True)


@ray.remote(num_cpus=0)
class Progress:
    """Rank 0 pushes metrics here (fire and forget); the driver polls them for the bar and metrics.jsonl."""

    def __init__(self):
        self.rows: list[dict[str, Any]] = []

    def log(self, metrics: dict[str, Any]) -> None:
        self.rows.append(metrics)

    def since(self, i: int) -> list[dict[str, Any]]:
        return self.rows[i:]


class MetricsFile:
    """metrics.jsonl in the run directory: appended locally, rewritten whole on object storage."""

    def __init__(self, uri: str):
        self.uri, self.rows = uri, []
        if storage.exists(uri):
            self.rows = [json.loads(line) for line in storage.read_text(uri).splitlines() if line.strip()]

    def add(self, rows: list[dict[str, Any]]) -> None:
        self.rows += rows
        storage.write_text(self.uri, "".join(json.dumps(r) + "\n" for r in self.rows))


def run_dir(cfg: Config) -> str:
    out = cfg.run.output_dir if storage.is_remote(cfg.run.output_dir) else os.path.abspath(os.path.expanduser(cfg.run.output_dir))
    return storage.join(out, cfg.run.name)


def pretrain(cfg: Config, *, show_progress: bool = True,
             on_rows: Callable[[list[dict[str, Any]]], None] | None = None) -> dict[str, Any]:
    """Prepare data if needed, train on Ray Train + DeepSpeed, export, and write the run directory.
    `on_rows` sees every batch of new metrics rows as they arrive (an ablation trial reports them to Tune)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    init_ray()
    mode = cfg.post_training()
    base = _post_base(cfg, mode) if mode else None
    tok = tokenizer_for(cfg)
    if tok.vocab_size > cfg.vocab_size():
        raise ConfigError(f"{cfg.origin}: model.vocab_size={cfg.vocab_size()} is smaller than the tokenizer "
                          f"{cfg.tokenizer.name!r} ({tok.vocab_size} tokens)")
    tok_dir, post, rollouts, sources = tok.hf_dir, None, None, []
    if mode in ("sft", "dpo"):
        tok_dir, post = _post_data(cfg, mode, tok, base)
    elif mode == "grpo":
        from raysmol.post.rollout import start_rollouts

        tok_dir, rollouts = start_rollouts(cfg, base, tok.hf_dir)
    else:
        sources = prepare(cfg, tok, show_progress=show_progress)
    rd = run_dir(cfg)
    storage.makedirs(rd)
    storage.write_text(storage.join(rd, "config.yaml"), cfg.to_yaml())

    # Pinned to the driver's node: placed anywhere, losing a worker node (spot loss) would take it along.
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    progress = Progress.options(scheduling_strategy=here).remote()
    loop_config = {
        "config": cfg.to_dict(),
        "train_dirs": [str(s.split_dir("train")) for s in sources],
        "val_dirs": [str(s.split_dir("val")) if s.manifest["splits"]["val"]["tokens"] else None for s in sources],
        "eos_id": tok.eos_id,
        "eval_suite": _training_suite(cfg, tok),
        "post": post,
        "rollouts": rollouts,
        # The URI, not the driver's copy: workers on other nodes fetch their own (storage.model_folder).
        "init_from": _model_uri(getattr(cfg, mode).init_from, base) if mode else None,
        "progress": progress,
        "run_dir": rd,
    }
    storage_path, storage_fs = storage.ray_storage(rd)
    t = cfg.train
    trainer = TorchTrainer(
        train_func,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=_workers(t), use_gpu=t.use_gpu,
                                     resources_per_worker=None if t.use_gpu else {"CPU": 1}),
        run_config=RunConfig(name="checkpoints", storage_path=storage_path, storage_filesystem=storage_fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=t.max_failures)),
    )
    metrics = MetricsFile(storage.join(rd, "metrics.jsonl"))
    started = time.time()
    try:
        result = _fit_with_progress(trainer, progress, metrics, t.steps, show_progress, on_rows, mode or "pretrain")
    finally:
        if rollouts is not None:
            rollouts.shutdown()
    wall = time.time() - started

    for f in sorted(Path(tok_dir).iterdir()):  # tokenizer files beside the weights rank 0 exported
        if f.is_file() and not f.name.startswith("_"):
            storage.write_bytes(storage.join(rd, "hf", f.name), f.read_bytes())
    summary = _summary(cfg, metrics.rows, wall, result, rd, sources)
    if post is not None:
        summary[mode] = {"data": getattr(cfg, mode).data, "init_from": str(base), **post["stats"]}
    if rollouts is not None:
        from raysmol.post.rollout import grpo_summary

        summary["grpo"] = {"data": cfg.grpo.data, "init_from": str(base), **grpo_summary(metrics.rows, rollouts)}
    storage.write_text(storage.join(rd, "summary.json"), json.dumps(summary, indent=1))
    ledger.record_run(rd, cfg, wall, metrics.rows, started, summary["recovery"])
    _plot(metrics.rows, rd)
    return summary


def _post_base(cfg: Config, mode: str) -> Path:
    """The starting model's folder; its tokenizer becomes the run's, and its shape must be the config's."""
    from raysmol.eval.cf import resolve_checkpoint
    from raysmol.model import hf_config

    key = f"{mode}.init_from"
    base = resolve_checkpoint(storage.model_folder(getattr(cfg, mode).init_from))
    cfg.tokenizer.name = str(base)
    have = json.loads((base / "config.json").read_text())
    want = hf_config(cfg, have.get("eos_token_id") or 0).to_dict()
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "tie_word_embeddings")
    diff = [f"{k}: config {want.get(k)!r} vs model {have.get(k)!r}" for k in keys if want.get(k) != have.get(k)]
    if diff:
        raise ConfigError(f"{cfg.origin}: {key}={getattr(cfg, mode).init_from!r} does not have the config's model "
                          f"shape ({'; '.join(diff)}); set the model section to the base model's")
    return base


def _model_uri(init_from: str, base: Path) -> str:
    """What a task or worker on any node can open: the object-store URI, or the resolved local folder."""
    return init_from if storage.is_remote(init_from) else str(base)


def chat_tokenizer(tok_dir: str):
    """The tokenizer with a chat template (raysmol's default where it has none) and a folder holding it, which is
    exported with the model."""
    import tempfile

    from transformers import AutoTokenizer

    from raysmol.post.chat import ensure_template

    hf_tok = AutoTokenizer.from_pretrained(tok_dir)
    ensure_template(hf_tok)
    out = Path(tempfile.mkdtemp(prefix="raysmol-chat-tok-"))
    hf_tok.save_pretrained(out)
    return hf_tok, out


def _post_data(cfg: Config, mode: str, tok, base: Path) -> tuple[Path, dict]:
    """SFT: packed conversations. DPO: chosen/rejected rows and the frozen reference's log-probs of them."""
    from raysmol.post.chat import prepare_chat
    from raysmol.post.preference import prepare_pairs

    hf_tok, tok_dir = chat_tokenizer(tok.hf_dir)
    if mode == "sft":
        s = cfg.sft
        data = prepare_chat(s.data, hf_tok, cfg.train.seq_len, s.val_fraction, s.messages_key)
        return tok_dir, {"mode": mode, "group": 1, **data, "extras": {"train": {}, "val": {}}}
    data = prepare_pairs(cfg.dpo.data, hf_tok, cfg.train.seq_len, cfg.dpo.val_fraction)
    t = time.perf_counter()
    gpu = {"num_gpus": 1} if cfg.train.use_gpu else {}
    refs = {k: _reference_logps.options(**gpu).remote(_model_uri(cfg.dpo.init_from, base), data[k],
                                                      max(64, cfg.train.micro_batch_size * 2))
            for k in ("train", "val") if data[k] is not None}
    logps = {k: ray.get(r) for k, r in refs.items()}
    data["stats"]["reference_s"] = time.perf_counter() - t
    return tok_dir, {"mode": mode, "group": 2, **data,
                     "extras": {k: {"ref_logps": logps[k]} if k in logps else {} for k in ("train", "val")}}


@ray.remote(num_cpus=1)
def _reference_logps(model_dir: str, packed, micro_batch: int):
    """The frozen reference's log-probs of every row, computed once before training (in a task: on a GPU where
    training has them, and no reference model is kept in the training workers)."""
    import torch
    from transformers import AutoModelForCausalLM

    from raysmol.eval.cf import resolve_checkpoint
    from raysmol.post.preference import reference_logps

    device = "cuda" if torch.cuda.is_available() else "cpu"
    folder = resolve_checkpoint(storage.model_folder(model_dir))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)
    return reference_logps(model, packed, micro_batch, device)


def _workers(t) -> int | tuple[int, int]:
    """A fixed size, or (min, max) for elastic training (Ray Train V2)."""
    return (t.min_workers, t.num_workers) if t.min_workers is not None and t.min_workers < t.num_workers else t.num_workers


def tokenizer_for(cfg: Config):
    """The run's tokenizer, cached on this machine (under data.cache_dir unless that is object storage)."""
    d = cfg.data.cache_dir
    cache = os.path.expanduser("~/.cache/raysmol") if storage.is_remote(d) else os.path.expanduser(d)
    return resolve_tokenizer(cfg.tokenizer.name, cache, builtin_vocab_size=cfg.tokenizer.vocab_size)


def _fit_with_progress(trainer, progress, metrics: MetricsFile, total: int, show: bool, on_rows=None,
                       desc: str = "pretrain"):
    from tqdm import tqdm

    box: dict[str, Any] = {}

    def fit():
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # re-raised on the main thread
            box["error"] = e

    th = threading.Thread(target=fit, daemon=True)
    th.start()
    bar = tqdm(total=total, desc=desc, unit="step", disable=not show, dynamic_ncols=True)
    seen = 0  # index into this run's Progress actor (metrics.rows may hold an earlier attempt's rows)
    last_flush = 0.0
    pending: list[dict[str, Any]] = []
    while True:
        alive = th.is_alive()
        rows = ray.get(progress.since.remote(seen))
        seen += len(rows)
        pending += rows
        for r in rows:
            if "loss" in r:
                bar.n = r["step"]
                bar.set_postfix(loss=f"{r['loss']:.3f}", tok_s=f"{r['tokens_per_s']:.0f}", refresh=False)
                bar.refresh()
        # Rows someone else acts on are on storage first: Tune may stop (kill) an ablation trial on them.
        if pending and (not alive or time.time() - last_flush > 5 or (rows and on_rows is not None)):
            metrics.add(pending)
            pending, last_flush = [], time.time()
        if rows and on_rows is not None:
            on_rows(rows)
        if not alive:
            break
        time.sleep(0.5)
    bar.close()
    if "error" in box:
        raise box["error"]
    return box["result"]


def _summary(cfg: Config, rows: list[dict], wall: float, result, rd: str, sources) -> dict[str, Any]:
    train_rows = [r for r in rows if "loss" in r]
    val = [r for r in rows if r.get("val_loss") is not None]
    ckpt = result.checkpoint.path if result.checkpoint else None
    epochs = train_rows[-1]["epochs"] if train_rows else {}
    return {
        "run": cfg.run.name,
        "steps": train_rows[-1]["step"] if train_rows else 0,
        "tokens": train_rows[-1]["tokens"] if train_rows else 0,
        "first_loss": train_rows[0]["loss"] if train_rows else None,
        "last_loss": train_rows[-1]["loss"] if train_rows else None,
        "initial_val_loss": val[0]["val_loss"] if val else None,
        "final_val_loss": val[-1]["val_loss"] if val else None,
        "wall_time_s": wall,
        "parameters": param_count(cfg),
        "flops_per_token": flops_per_token(cfg),
        "checkpoint": (storage.join(rd, "checkpoints", os.path.basename(ckpt)) if ckpt else None),
        "events": [r for r in rows if r.get("event") in ("spike", "rollback")],
        "recovery": recovery_report(rows),
        "export": storage.join(rd, "hf"),
        "data": {s.name: {"prepared": s.uri, "tokens": s.manifest["splits"]["train"]["tokens"],
                          "epochs": epochs.get(s.name, 0.0), "wrapped": epochs.get(s.name, 0.0) > 1,
                          "skipped": s.manifest["skipped"]}
                 for s in sources},
    }


def recovery_report(rows: list[dict]) -> list[dict[str, Any]]:
    """One entry per restart: what failed, the checkpoint resumed from, steps redone, and the seconds from the
    failure (a drill's own timestamp, else the last thing the run reported) to the first resumed step."""
    out: list[dict[str, Any]] = []
    starts = [i for i, r in enumerate(rows) if r.get("event") == "start"]
    for a, b in zip(starts, starts[1:]):
        before, start = rows[a:b], rows[b]
        faults = [r for r in before if r.get("event") == "fault"]
        failed_at = faults[-1]["time"] if faults else max(r["time"] for r in before)
        # Steps finished before the failure: the last one logged, or the drill's step (it may not be logged yet).
        reached = max([r["step"] for r in before if "loss" in r] + [f["step"] for f in faults if "step" in f] + [0])
        first = next((r for r in rows[b + 1:] if "loss" in r), None)
        out.append({
            "failure": faults[-1]["fault"] if faults else "worker lost (no drill): killed, crashed or node gone",
            "resumed_from": start.get("resumed_from"),
            "rejected_checkpoints": start.get("rejected", []),
            "resume_step": start["step"],
            "world_size": start.get("world_size"),
            "steps_redone": max(0, reached - start["step"]),
            "seconds_to_first_resumed_step": (first["time"] - failed_at) if first else None,
        })
    return out


def _training_suite(cfg: Config, tok):
    if not cfg.train.eval_suite:
        return None
    from raysmol.eval.cf import TrainingSuite

    return TrainingSuite(cfg.train.eval_suite, cfg.train.eval_suite_samples, tok.hf_dir)


def _plot(rows: list[dict], rd: str) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({k for r in rows for k in r if k.startswith("eval/")})
    fig, axes = plt.subplots(1, 2 if tasks else 1, figsize=(12 if tasks else 7, 4), squeeze=False)
    ax = axes[0][0]
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if r.get("val_loss") is not None]
    for r in rows:
        if r.get("event") in ("spike", "rollback"):
            ax.axvline(r["step"], color="red" if r["event"] == "spike" else "orange", lw=0.8, alpha=0.6)
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
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    storage.write_bytes(storage.join(rd, "plots", "loss.png"), buf.getvalue())
