"""Pretraining: the task that lives in `train/`. Ray Data prepares the mixture's sources; each worker reads its
windows by index from the token store (a pure function of the step)."""

from __future__ import annotations

from typing import Any

import torch

from raysmol.config import Config
from raysmol.data.batches import Batches
from raysmol.data.prepare import prepare
from raysmol.data.store import TokenStream
from raysmol.data.tokenizer import tokenizer_for
from raysmol.model import build_model
from raysmol.train.hooks import Context
from raysmol.train.objectives import Objective, causal_lm
from raysmol.train.task import Task, check_vocab


class Pretrain(Task):
    verb = "pretrain"

    def prepare(self, cfg: Config, show_progress: bool = True) -> None:
        tok = tokenizer_for(cfg)
        check_vocab(cfg, tok)
        self.sources = prepare(cfg, tok, show_progress=show_progress)
        self.eos_id, self.tokenizer_dir = tok.eos_id, tok.hf_dir
        self.train_dirs = [str(s.split_dir("train")) for s in self.sources]
        self.val_dirs = [str(s.split_dir("val")) if s.manifest["splits"]["val"]["tokens"] else None
                         for s in self.sources]

    def summarise(self, cfg: Config, rows: list[dict[str, Any]]) -> dict[str, Any]:
        train = [r for r in rows if "loss" in r]
        epochs = train[-1]["epochs"] if train else {}
        return {"data": {s.name: {"prepared": s.uri, "tokens": s.manifest["splits"]["train"]["tokens"],
                                  "epochs": epochs.get(s.name, 0.0), "wrapped": epochs.get(s.name, 0.0) > 1,
                                  "skipped": s.manifest["skipped"]}
                         for s in self.sources}}

    def model(self, ctx: Context) -> torch.nn.Module:
        return build_model(ctx.cfg, self.eos_id, seed=ctx.cfg.train.seed)

    def objective(self, cfg: Config) -> Objective:
        return causal_lm

    def batches(self, ctx: Context) -> tuple[Batches, Batches | None]:
        cfg = ctx.cfg
        d, names, weights = cfg.data, [s.name for s in cfg.data.sources], [s.weight for s in cfg.data.sources]
        train = Batches([TokenStream(p, d.seed) for p in self.train_dirs], weights, d.seed, cfg.train.seq_len,
                        cfg.train.samples_per_step(), d.intra_doc_masking, names)
        # Validation windows from the held-out documents of every source that has some (seed: data.seed + 1).
        held = [(TokenStream(p, d.seed), w, n) for p, w, n in zip(self.val_dirs, weights, names) if p and w > 0]
        val = (Batches([h[0] for h in held], [h[1] for h in held], d.seed + 1, cfg.train.seq_len,
                       cfg.train.samples_per_step(), d.intra_doc_masking, [h[2] for h in held]) if held else None)
        return train, val
