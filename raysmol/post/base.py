"""What every post-training task shares: the starting model (`<verb>.init_from`) and its tokenizer."""

from __future__ import annotations

import json
from typing import Any

import torch

from raysmol import storage
from raysmol.config import Config
from raysmol.data.tokenizer import tokenizer_for
from raysmol.model import load_model
from raysmol.model.folder import resolve_model
from raysmol.post.chat import chat_tokenizer
from raysmol.train.hooks import Context
from raysmol.train.task import Task, check_vocab


class PostTask(Task):
    """Starts from `<verb>.init_from`: its weights and config as they are (the export keeps that config), its
    tokenizer with a chat template."""

    def section(self, cfg: Config):
        return getattr(cfg, self.verb)

    def prepare(self, cfg: Config, show_progress: bool = True) -> None:
        init_from = self.section(cfg).init_from
        self.base = resolve_model(init_from)
        # The URI, not the driver's copy: tasks and workers on other nodes fetch their own (storage.model_folder).
        self.init_uri = init_from if storage.is_remote(init_from) else str(self.base)
        cfg.tokenizer.name = str(self.base)
        cfg.adopt_model(json.loads((self.base / "config.json").read_text()), f"{self.verb}.init_from")
        tok = tokenizer_for(cfg)
        check_vocab(cfg, tok)
        self.tokenizer, chat_dir = chat_tokenizer(tok.hf_dir)
        self.tokenizer_dir = str(chat_dir)
        self.stats: dict[str, Any] = {}
        self.prepare_data(cfg)

    def shared_paths(self, cfg: Config) -> dict[str, str]:
        return {f"{self.verb}.init_from": self.section(cfg).init_from}  # every worker loads the starting weights

    def prepare_data(self, cfg: Config) -> None:
        raise NotImplementedError

    def summarise(self, cfg: Config, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {self.verb: {"data": self.section(cfg).data, "init_from": self.init_uri, **self.stats}}

    def model(self, ctx: Context) -> torch.nn.Module:
        return load_model(resolve_model(self.init_uri), ctx.cfg)

    def __getstate__(self):
        # The driver's tokenizer object stays there: workers that need one load it themselves.
        return {k: v for k, v in self.__dict__.items() if k != "tokenizer"}
