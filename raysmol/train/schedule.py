"""Learning-rate schedules as multipliers of the peak lr (for torch's LambdaLR)."""

from __future__ import annotations

import math
from typing import Callable

from raysmol.config import OptimConfig


def lr_multiplier(optim: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """Linear warmup, then cosine to min_lr_ratio, WSD (stable, then a linear decay over the last
    decay_fraction of steps, as in MiniCPM and SmolLM3), or constant."""
    warm, floor = optim.warmup_steps, optim.min_lr_ratio

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if optim.schedule == "constant":
            return 1.0
        if optim.schedule == "cosine":
            progress = min(1.0, (step - warm) / max(1, total_steps - warm))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        decay_start = total_steps - max(1, int(round(optim.decay_fraction * total_steps)))
        if step < decay_start:
            return 1.0
        return 1.0 - (1 - floor) * min(1.0, (step - decay_start + 1) / (total_steps - decay_start))

    return f
