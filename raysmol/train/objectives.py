"""Objectives: each maps (model, batch) to (loss, extra metrics). The loop is the same for all of them."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from functools import partial
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

from raysmol.data.batches import Batch
from raysmol.model import FUSED_LOSS, VARLEN_IMPLEMENTATIONS, packed_attention_kwargs

if TYPE_CHECKING:
    from raysmol.config import Config

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


def dpo(model: torch.nn.Module, batch: Batch, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The sigmoid DPO loss (Rafailov et al. 2023): rows alternate chosen, rejected; `ref_logps` are the frozen
    reference's summed log-probs of the same rows. Implicit reward r = beta * (log pi - log pi_ref)."""
    rewards = beta * (sequence_logps(model, batch) - batch.extras["ref_logps"].to(torch.float32))
    chosen, rejected = rewards[0::2], rewards[1::2]
    margin = chosen - rejected
    loss = -F.logsigmoid(margin).mean()
    return loss, {"reward_margin": margin.mean().detach(), "reward_accuracy": (margin > 0).float().mean(),
                  "chosen_reward": chosen.mean().detach(), "rejected_reward": rejected.mean().detach()}


def grpo(model: torch.nn.Module, batch: Batch, clip: float, kl_beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's clipped surrogate (Shao et al. 2024): one row per completion, labels on its tokens only.

    extras: `advantages` [m] (group-normalised rewards), `old_logps` [m, L] (the sampling policy's log-probs of
    the same tokens, as the engine reported them), `rewards` [m] (logged), and with kl_beta > 0 `ref_logps`
    [m, L]. Per token: -min(ratio * A, clip(ratio, 1 - clip, 1 + clip) * A) (+ kl_beta * k3 KL estimate), averaged
    over each completion's tokens, then over completions."""
    logp, mask = token_logps(model, batch)
    ratio = torch.exp(logp - batch.extras["old_logps"].to(logp.dtype))
    adv = batch.extras["advantages"].to(logp.dtype)[:, None]
    per_token = -torch.min(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    metrics = {}
    if kl_beta > 0:
        d = batch.extras["ref_logps"].to(logp.dtype) - logp
        kl = torch.exp(d) - d - 1  # Schulman's k3: unbiased, always >= 0
        per_token = per_token + kl_beta * kl
        metrics["kl"] = ((kl * mask).sum() / mask.sum().clamp(min=1)).detach()
    n = mask.sum(1).clamp(min=1)
    loss = ((per_token * mask).sum(1) / n).mean()
    clipped = ((ratio - 1).abs() > clip) & mask
    return loss, {**metrics, "reward": batch.extras["rewards"].float().mean(),
                  "clip_fraction": clipped.sum() / mask.sum().clamp(min=1), "completion_tokens": n.float().mean()}


def make_objective(cfg: "Config") -> Objective:
    """The run's objective: pretraining and SFT share next-token cross-entropy (SFT's prompts carry IGNORE)."""
    mode = cfg.post_training()
    if mode == "dpo":
        return partial(dpo, beta=cfg.dpo.beta)
    if mode == "grpo":
        return partial(grpo, clip=cfg.grpo.clip, kl_beta=cfg.grpo.kl_beta)
    return causal_lm


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

