"""Pretraining: the task that lives in `train/`. Ray Data prepares the mixture's sources; each worker opens the
prepared splits on its own node and reads its windows by index from the token store (a pure function of the
step)."""

from __future__ import annotations

from typing import Any

import torch

from raysmol.config import Config
from raysmol.data.batches import Batches
from raysmol.data.mixture import StagedMixture
from raysmol.data.prepare import prepare
from raysmol.data.store import TokenStream
from raysmol.data.tokenizer import tokenizer_for
from raysmol.model import build_model, load_model
from raysmol.model.folder import resolve_model
from raysmol.rundir import run_dir
from raysmol.train import start
from raysmol.train.hooks import Context
from raysmol.train.objectives import Objective, causal_lm
from raysmol.train.task import Task, check_vocab


class Pretrain(Task):
    verb = "pretrain"

    def prepare(self, cfg: Config, show_progress: bool = True) -> None:
        # Continued pretraining: the model's shape and tokenizer come from train.init_from (adopted into cfg).
        self.start = start.resolve(cfg, run_dir(cfg))
        tok = tokenizer_for(cfg)
        check_vocab(cfg, tok)
        self.sources = prepare(cfg, tok, show_progress=show_progress)
        self.eos_id, self.tokenizer_dir = tok.eos_id, tok.hf_dir

    def shared_paths(self, cfg: Config) -> dict[str, str]:
        return {"data.cache_dir": cfg.data.cache_dir}  # the prepared splits

    def summarise(self, cfg: Config, rows: list[dict[str, Any]]) -> dict[str, Any]:
        train = [r for r in rows if "loss" in r]
        epochs = train[-1]["epochs"] if train else {}
        return {"data": {s.name: {"prepared": s.uri, "tokens": s.manifest["splits"]["train"]["tokens"],
                                  "epochs": epochs.get(s.name, 0.0), "wrapped": epochs.get(s.name, 0.0) > 1,
                                  "skipped": s.manifest["skipped"], "budget": s.budget,
                                  "whole_source_read": s.manifest["complete"]}
                         for s in self.sources},
                "stages": stage_report(cfg),
                "init_from": self.start and {"uri": self.start.init_from, "weights": self.start.weights,
                                             "checkpoint": self.start.checkpoint, "step": self.start.state.get("step"),
                                             "carry": list(self.start.carry)}}

    def model(self, ctx: Context) -> torch.nn.Module:
        if self.start is not None:
            return load_model(resolve_model(self.start.weights), ctx.cfg)
        return build_model(ctx.cfg, self.eos_id, seed=ctx.cfg.train.seed)

    def objective(self, cfg: Config) -> Objective:
        return causal_lm

    def batches(self, ctx: Context) -> tuple[Batches, Batches | None]:
        cfg = ctx.cfg
        d, t, names = cfg.data, cfg.train, [s.name for s in cfg.data.sources]
        plan = d.stage_plan(t)
        # Each worker opens the prepared splits on its own node (object storage: one download per node); the
        # driver's local paths would not exist on a node with its own disk.
        train_dirs = [s.split_dir("train") for s in self.sources]
        val_dirs = [s.split_dir("val") if s.manifest["splits"]["val"]["tokens"] else None for s in self.sources]
        streams = [TokenStream(p, d.seed, d.shuffle) for p in train_dirs]
        train = Batches(streams, list(plan[0].weights), d.seed, t.seq_len, t.samples_per_step(), d.intra_doc_masking,
                        names, [(st.start, list(st.weights)) for st in plan], [st.name for st in plan])
        # Validation windows from the held-out documents of every source the run reads (seed: data.seed + 1),
        # weighted by its share of the whole run's tokens, so one validation loss is comparable across stages.
        # Read in prepared order: the first windows of the held-out stream stay the same when a raised budget
        # appends shards, so a run's validation loss means the same before and after an extension.
        share = [sum((st.end - st.start) * st.weights[i] for st in plan) for i in range(len(names))]
        held = [(TokenStream(p, d.seed), w, n) for p, w, n in zip(val_dirs, share, names) if p and w > 0]
        val = (Batches([h[0] for h in held], [h[1] for h in held], d.seed + 1, t.seq_len, t.samples_per_step(),
                       d.intra_doc_masking, [h[2] for h in held]) if held else None)
        return train, val


def stage_report(cfg: Config) -> list[dict[str, Any]]:
    """Per stage: its steps, and per source the weight, the realised share of the stage's samples and the tokens
    read (exact: the mixture is a pure function of the sample index; data skipped by a rollback not counted)."""
    plan = cfg.data.stage_plan(cfg.train)
    S, L = cfg.train.samples_per_step(), cfg.train.seq_len
    mix = StagedMixture([(st.start * S, st.weights) for st in plan], cfg.data.seed)
    out = []
    for i, st in enumerate(plan):
        c = mix.stage_counts(i, (st.end - st.start) * S)
        out.append({"name": st.name, "start_step": st.start, "end_step": st.end,
                    "sources": {s.name: {"weight": w, "share": float(n / c.sum()), "tokens": int(n) * L,
                                         "first_token": int(mix.offsets[i][j]) * L}
                                for j, (s, w, n) in enumerate(zip(cfg.data.sources, st.weights, c))}})
    return out
