"""Loss-spike guard: detection against running statistics, skipped updates, rollback bookkeeping. No Ray.
(The running statistics are checkpointed with the run through the loop's hook state.)

Detection (per optimizer step, the same on every rank because it reads all-reduced values): a non-finite loss or
grad norm; a loss above mean + `loss_zscore` x std of the last `window` accepted steps; a grad norm above
`grad_norm_factor` x their mean. Nothing is flagged during the first `min_steps` accepted steps.

`skip` drops the update inside the optimizer (`GuardedAdamW`): weights and Adam moments stay as they were, as in
OLMo's skip-step optimizer. `rollback` (PaLM, section 5.1) reloads the last good checkpoint, skips a window of
data batches at the spike and may lower the learning rate for a while; the skips and lr windows are part of
the checkpointed state, so a later resume replays them exactly.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from raysmol.train.hooks import Hook


class GuardError(RuntimeError):
    """The run rolled back more often than allowed; continuing would burn compute on a diverging run."""


class GuardedAdamW(torch.optim.AdamW):
    """torch AdamW that drops a whole update when `veto()` says so (weights and moments untouched).

    DeepSpeed's ZeRO optimizers call this `step()` after computing the global grad norm and before changing
    any weight, so the veto can look at this step's loss and grad norm. ZeRO-3 may call it once per
    parameter sub-group: the veto must give one answer per optimizer step (Sentry decides once per step).
    """

    veto: Callable[[], bool] | None = None

    @torch.no_grad()
    def step(self, closure=None):
        if self.veto is not None and self.veto():
            return None
        return super().step(closure)


@dataclass
class DataPlan:
    """Which data step each training step reads, and the learning-rate windows set by rollbacks."""

    skips: list[tuple[int, int]] = field(default_factory=list)  # (from training step, batches skipped)
    lr_windows: list[tuple[int, int, float]] = field(default_factory=list)  # (start, end, factor)

    def data_step(self, step: int) -> int:
        return step + sum(n for at, n in self.skips if step >= at)

    def lr_factor(self, step: int) -> float:
        f = 1.0
        for start, end, factor in self.lr_windows:
            if start <= step < end:
                f *= factor
        return f

    def to_dict(self) -> dict[str, Any]:
        return {"skips": [list(s) for s in self.skips], "lr_windows": [list(w) for w in self.lr_windows]}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "DataPlan":
        d = d or {}
        return cls([tuple(s) for s in d.get("skips", [])], [tuple(w) for w in d.get("lr_windows", [])])


class SpikeGuard:
    def __init__(self, window: int, min_steps: int, loss_zscore: float, grad_norm_factor: float):
        self.losses: deque[float] = deque(maxlen=window)
        self.norms: deque[float] = deque(maxlen=window)
        self.min_steps, self.loss_zscore, self.grad_norm_factor = min_steps, loss_zscore, grad_norm_factor

    def check(self, loss: float, grad_norm: float | None) -> str | None:
        """Why a step with this loss and grad norm is a spike, or None."""
        return self._reason(loss, grad_norm)

    def accept(self, loss: float, grad_norm: float | None) -> None:
        """A healthy step joins the running statistics (spikes never do, or they would hide the next one)."""
        self.losses.append(loss)
        if grad_norm is not None and math.isfinite(grad_norm):
            self.norms.append(grad_norm)

    def _reason(self, loss: float, grad_norm: float | None) -> str | None:
        if not math.isfinite(loss):
            return f"non-finite loss {loss}"
        if grad_norm is not None and not math.isfinite(grad_norm):
            return f"non-finite grad norm {grad_norm}"
        if len(self.losses) < self.min_steps:
            return None
        mean = sum(self.losses) / len(self.losses)
        std = math.sqrt(sum((x - mean) ** 2 for x in self.losses) / len(self.losses))
        # A floor on std keeps a flat stretch of loss from flagging ordinary noise.
        limit = mean + self.loss_zscore * max(std, 0.01 * abs(mean))
        if loss > limit:
            return f"loss {loss:.4f} > {limit:.4f} (mean {mean:.4f} + {self.loss_zscore} std)"
        if grad_norm is not None and self.norms:
            norm_mean = sum(self.norms) / len(self.norms)
            if grad_norm > self.grad_norm_factor * norm_mean:
                return f"grad norm {grad_norm:.4f} > {self.grad_norm_factor} x mean {norm_mean:.4f}"
        return None


class Sentry(Hook):
    """Wires a SpikeGuard into the DeepSpeed step: `before_update` after the last backward of a step,
    `veto` from inside the optimizer, `verdict` once the step is done (why it was a spike, or None).

    As a loop hook it checkpoints the guard's running statistics with the run, so a resumed run judges its
    first steps against the same history instead of being blind for `min_steps` after every restart."""

    name = "guard"

    def __init__(self, engine, guard: SpikeGuard, action: str):
        self.engine, self.guard, self.action = engine, guard, action
        self.pending: dict[str, Any] | None = None

    def after_restore(self, ctx) -> None:
        self.engine = ctx.engine

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.guard.losses), "norms": list(self.guard.norms)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.guard.losses.clear()
        self.guard.losses.extend(state["losses"])
        self.guard.norms.clear()
        self.guard.norms.extend(state["norms"])

    def before_update(self, step: int, losses: list[torch.Tensor]) -> None:
        if self.action == "off":
            self.pending = None
            return
        import torch.distributed as dist

        loss = torch.stack(losses).mean().detach().double().clone()
        dist.all_reduce(loss)  # one host sync per step: the price of judging every step, not every log
        norm = None
        if self.engine.zero_optimization_stage() == 0:
            # Without ZeRO the gradients are whole (already all-reduced) and clipped later, inside step():
            # take the norm now, before clipping hides a spike.
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        self.pending = {"step": step, "loss": float(loss) / dist.get_world_size(), "grad_norm": norm,
                        "reason": None, "checked": False, "vetoed": False}

    def veto(self) -> bool:
        p = self.pending
        if p is None:
            return False
        self._check(p)
        nonfinite = p["reason"] is not None and p["reason"].startswith("non-finite")
        p["vetoed"] = p["reason"] is not None and (self.action in ("skip", "rollback") or nonfinite)
        return p["vetoed"]

    def verdict(self) -> dict[str, Any] | None:
        p, self.pending = self.pending, None
        if p is None:
            return None
        self._check(p)  # ZeRO drops a step with non-finite gradients itself, before asking the veto
        if p["reason"] is None:
            self.guard.accept(p["loss"], p["grad_norm"])
            return None
        # Not "loss"/"grad_norm": metrics rows are the ones with those keys.
        return {"reason": p["reason"], "observed_loss": p["loss"], "observed_grad_norm": p["grad_norm"],
                "update_applied": not p["vetoed"] and math.isfinite(p["grad_norm"] or 0.0)}

    def _check(self, p: dict[str, Any]) -> None:
        if p["checked"]:
            return
        if p["grad_norm"] is None:
            # ZeRO optimizers compute the global (all-reduced) norm before calling the torch optimizer.
            g = getattr(self.engine.optimizer, "_global_grad_norm", None)
            p["grad_norm"] = float(g) if g is not None else None
        p["reason"] = self.guard.check(p["loss"], p["grad_norm"])
        p["checked"] = True
