"""The task interface: what a kind of run (pretraining, SFT, DPO, GRPO, ...) brings to the one loop.

A task object is built and `prepare`d on the driver, then shipped to every worker (so what it prepares must be
picklable and must make sense on any node: URIs, not the driver's local paths). Recipes live above `train/`
(`raysmol/post/`); `train/` only knows this interface.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from raysmol.config import Config, ConfigError
from raysmol.data.batches import Batch
from raysmol.train.hooks import Context, Hook
from raysmol.train.objectives import Objective


class BatchSource(Protocol):
    """A pure function of the step: the same global batch at any world size, so resume and resizes are exact."""

    def micro_batches(self, step: int, rank: int, world: int, micro: int) -> list[Batch]: ...

    def position(self, step: int) -> dict[str, Any]:
        """Keys for the metrics row after data step `step`: at least "epochs" (passes over each source)."""
        ...


class Task:
    verb = "pretrain"  # the CLI verb that runs this task

    # ---------------------------------------------------------------- driver

    def prepare(self, cfg: Config, show_progress: bool = True) -> None:
        """Everything the workers need (data, tokenizer, engines); sets `tokenizer_dir`, exported with the model."""
        raise NotImplementedError

    tokenizer_dir: str = ""

    def shared_paths(self, cfg: Config) -> dict[str, str]:
        """{config key: path} of what the workers read from the config's paths (besides the run directory):
        on a cluster, a local one must be visible from every node (checked before `prepare`)."""
        return {}

    def summarise(self, cfg: Config, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Keys this task adds to summary.json."""
        return {}

    def close(self) -> None:
        """Release what `prepare` started (engine actors), after training."""

    # ---------------------------------------------------------------- worker

    def model(self, ctx: Context) -> torch.nn.Module:
        raise NotImplementedError

    def objective(self, cfg: Config) -> Objective:
        raise NotImplementedError

    def batches(self, ctx: Context) -> tuple[BatchSource, Any | None]:
        """(training batches, held-out batches with `samples(indices)`, or None)."""
        raise NotImplementedError

    def hooks(self) -> list[Hook]:
        return []


def check_vocab(cfg: Config, tok) -> None:
    if tok.vocab_size > cfg.vocab_size():
        raise ConfigError(f"{cfg.origin}: model.vocab_size={cfg.vocab_size()} is smaller than the tokenizer "
                          f"{cfg.tokenizer.name!r} ({tok.vocab_size} tokens)")
