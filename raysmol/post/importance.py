"""GRPO's probability ratio and the engine/trainer mismatch: which log-probs the ratio divides by, how far the
engine's log-probs are from the trainer's, and truncated importance sampling (TIS) over that gap.

The engine that samples (vLLM, other kernels, often another precision) and the trainer compute slightly
different probabilities for the same weights. A ratio taken against the engine's log-probs is then not 1
on-policy, so the clip fires on noise; verl recomputes the sampling weights' log-probs with the trainer, and Yao
et al. ("Your efficient RL framework secretly brings you off-policy RL training", 2025) weight each token by
min(pi_trainer / pi_engine, cap) to correct for the engine sampling from a slightly different distribution.

All tensors are [m, L] with `mask` on the completion tokens. Metrics stay on the device (no host sync in a step);
the loop reports `*_max`/`*_min` keys as extremes over its logging window and the ranks, the rest as means.
"""

from __future__ import annotations

import torch

DENOMINATORS = ("trainer", "engine")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def ratio_stats(ratio: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean, min and max of the probability ratio over the completion tokens: exactly 1 on-policy with the
    trainer's denominator."""
    r = ratio.detach()
    return {"ratio_mean": masked_mean(r, mask), "ratio_min": r.masked_fill(~mask, float("inf")).amin(),
            "ratio_max": r.masked_fill(~mask, float("-inf")).amax()}


def logp_gap(engine: torch.Tensor, trainer: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """How far the engine's log-probs of the sampled tokens are from the trainer's under the same weights:
    mean and max |engine - trainer|, and the mean importance weight exp(trainer - engine) (1 when they agree;
    what TIS truncates)."""
    d = (engine - trainer).detach()
    return {"engine_gap_mean": masked_mean(d.abs(), mask), "engine_gap_max": (d.abs() * mask).amax(),
            "engine_weight_mean": masked_mean(torch.exp(-d), mask)}


def tis_weight(engine: torch.Tensor, trainer: torch.Tensor, cap: float) -> torch.Tensor:
    """Per-token truncated importance weight min(pi_trainer / pi_engine, cap) of the sampling weights (no
    gradient: it corrects which tokens were sampled, it is not optimised)."""
    return torch.exp(trainer - engine).clamp(max=cap).detach()
