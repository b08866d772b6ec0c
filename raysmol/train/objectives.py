"""Objectives: each maps (model, batch) to (loss, extra metrics). The loop is the same for all of them."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Callable

import torch
import torch.nn.functional as F

from raysmol.data.batches import Batch
from raysmol.model import FUSED_LOSS, VARLEN_IMPLEMENTATIONS, packed_attention_kwargs

IGNORE = -100  # label of positions that carry no loss (F.cross_entropy's ignore_index)

Objective = Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def causal_lm(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Next-token cross-entropy, averaged over every token of the micro-batch (packed: no padding).

    Labels come already shifted from the data cursor (window k's labels are its inputs moved by one, the last
    one being the next window's first token), so no token is dropped at sequence ends. Position ids restart per
    document; transformers turns restarting position ids into a block-diagonal causal mask (intra-document
    masking) when no attention mask is passed.
    """
    inputs = model_inputs(model, batch)
    hf = _unwrap(model)
    if hf.training and getattr(hf, FUSED_LOSS, False):
        # Liger's fused linear cross-entropy: the mean loss straight from the hidden states (no logits).
        # `shift_labels`: our labels are already shifted, so the model must not shift them again.
        return model(**inputs, shift_labels=batch.labels).loss, {}
    logits = model(**inputs).logits
    loss = F.cross_entropy(logits.flatten(0, 1).float(), batch.labels.flatten())
    return loss, {}


def token_logps(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability of each label under the model [m, L], mask of positions with a label [m, L]);
    positions labelled IGNORE get log-probability 0."""
    logits = model(**model_inputs(model, batch)).logits
    m, L = batch.labels.shape
    # cross_entropy per position: the log-softmax without materialising [m, L, V] log-probs in fp32.
    nll = F.cross_entropy(logits.flatten(0, 1).float(), batch.labels.flatten(), ignore_index=IGNORE, reduction="none")
    return -nll.view(m, L), batch.labels != IGNORE


def sequence_logps(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Each row's summed log-probability of its labelled tokens (a reply's log-likelihood) [m]."""
    return token_logps(model, batch)[0].sum(1)


@dataclass
class DeviceBatch(Batch):
    """A Batch on the training device, with the document boundaries variable-length attention needs
    (computed on the host before the copy, so the step never waits on the device for them)."""

    attention: dict = field(default_factory=dict)


def to_device(batch: Batch, device: torch.device | str, model: torch.nn.Module | None = None) -> DeviceBatch:
    """The batch on `device`; with the document boundaries when `model` attends with a variable-length kernel
    (or when no model is given): sdpa and eager never read them, so their steps skip the host work."""
    moved = batch.to(device)
    cuda = torch.device(device).type == "cuda"
    attention = {}
    if model is None or needs_boundaries(model):
        attention = {k: v.pin_memory().to(device, non_blocking=True) if cuda and torch.is_tensor(v) else v
                     for k, v in packed_attention_kwargs(batch.position_ids).items()}
    return DeviceBatch(**{f.name: getattr(moved, f.name) for f in fields(Batch)}, attention=attention)


def needs_boundaries(model: torch.nn.Module) -> bool:
    return _unwrap(model).config._attn_implementation in VARLEN_IMPLEMENTATIONS


def model_inputs(model: torch.nn.Module, batch: Batch) -> dict:
    """input_ids and position_ids, plus document boundaries for the variable-length attention implementations
    (transformers forwards them to attention; sdpa and eager derive a block-diagonal mask from the position ids)."""
    # use_cache=False: with a KV cache (the default in most hub configs) transformers skips its packed-sequence
    # detection, and packed documents would attend to each other.
    inputs = {"input_ids": batch.input_ids, "position_ids": batch.position_ids, "use_cache": False}
    if needs_boundaries(model):
        # A batch that did not come through to_device with this model pays a device-to-host copy here.
        ready = isinstance(batch, DeviceBatch) and batch.attention
        inputs.update(batch.attention if ready else packed_attention_kwargs(batch.position_ids))
    return inputs


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a DeepSpeed engine or DDP wrapper."""
    return getattr(model, "module", model)

