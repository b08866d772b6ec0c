"""Objectives: each maps (model, batch) to (loss, extra metrics). The loop is the same for all of them."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from raysmol.data.batches import Batch

Objective = Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def causal_lm(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Next-token cross-entropy, averaged over every token of the micro-batch (packed: no padding).

    Labels come already shifted from the data cursor (window k's labels are its inputs moved by one, the last
    one being the next window's first token), so no token is dropped at sequence ends. Position ids restart per
    document; transformers turns restarting position ids into a block-diagonal causal mask (intra-document
    masking) when no attention mask is passed.
    """
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits
    loss = F.cross_entropy(logits.flatten(0, 1).float(), batch.labels.flatten())
    return loss, {}


OBJECTIVES: dict[str, Objective] = {"causal_lm": causal_lm}
