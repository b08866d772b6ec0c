"""DPO-family preference losses as pure functions of per-pair log-ratios. No Ray, no model here.

Every function takes, for a batch of n pairs,

    c = chosen_logratio   [n] = log pi(chosen | prompt)   - log pi_ref(chosen | prompt)
    r = rejected_logratio [n] = log pi(rejected | prompt) - log pi_ref(rejected | prompt)

where each log-prob is SUMMED over the reply's tokens (what `raysmol.train.objectives.sequence_logps` returns),
and returns the per-pair loss [n] (the caller takes the mean). `beta * c` and `beta * r` are DPO's implicit
rewards. Conventions match TRL's `DPOTrainer` (`loss_type` of the same names, with its default
`f_divergence_type="reverse_kl"`), except that TRL's `ipo` divides each log-ratio by the reply's token count
first; see `ipo`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LOSSES = ("sigmoid", "ipo", "apo_zero", "apo_down")


def sigmoid(chosen_logratio: torch.Tensor, rejected_logratio: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, "Direct Preference Optimization"): -log sigmoid(beta * (c - r)).
    Use by default: only the margin between chosen and rejected matters, not where either likelihood goes."""
    # The margin of the implicit rewards, beta*c - beta*r: the same floating-point arithmetic as DPO always had.
    return -F.logsigmoid(beta * chosen_logratio - beta * rejected_logratio)


def ipo(chosen_logratio: torch.Tensor, rejected_logratio: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
    Eq. 17, with tau = beta): (c - r - 1/(2 beta))^2. Use when preferences are near-deterministic and DPO
    over-fits: the squared loss pulls the margin to a finite target 1/(2 beta) instead of pushing it to infinity.

    This is the paper's formula applied to the log-ratios exactly as given, and callers pass SUMMED log-ratios
    (like every loss here), so the margin, and the loss, grows with reply length. TRL's `ipo` instead divides each
    of c and r by its reply's token count first (it says the IPO authors confirmed that form); to get TRL's
    behaviour, pass length-averaged log-ratios. A beta tuned for one form does not carry over to the other: here
    the target 1/(2 beta) is a margin between whole-reply log-ratios, in TRL a margin per token."""
    return (chosen_logratio - rejected_logratio - 1 / (2 * beta)) ** 2


def apo_zero(chosen_logratio: torch.Tensor, rejected_logratio: torch.Tensor, beta: float) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions", Eq. 7;
    SmolLM3's preference stage): (1 - sigmoid(beta c)) + sigmoid(beta r). Use when the chosen outputs are better
    than the model's own: it raises the chosen likelihood and lowers the rejected one, each anchored at the
    reference (c = 0, r = 0)."""
    return (1 - torch.sigmoid(beta * chosen_logratio)) + torch.sigmoid(beta * rejected_logratio)


def apo_down(chosen_logratio: torch.Tensor, rejected_logratio: torch.Tensor, beta: float) -> torch.Tensor:
    """APO-down (D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions", Eq. 8):
    sigmoid(beta c) + (1 - sigmoid(beta (c - r))). Use when the model's own outputs are better than the chosen
    ones: it lowers both likelihoods, the rejected one more (the first term pushes c down, the second widens
    c - r). The gradient on r is always positive; the one on c is positive only while |c| < |c - r| (zero at
    c = r = 0), since the margin term pulls c up."""
    return torch.sigmoid(beta * chosen_logratio) + (1 - torch.sigmoid(beta * (chosen_logratio - rejected_logratio)))


_LOSS_FNS: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "sigmoid": sigmoid, "ipo": ipo, "apo_zero": apo_zero, "apo_down": apo_down}
assert tuple(_LOSS_FNS) == LOSSES


def preference_loss(kind: str, chosen_logratio: torch.Tensor, rejected_logratio: torch.Tensor,
                    beta: float) -> torch.Tensor:
    """Per-pair loss [n]; chosen_logratio = log pi(chosen) - log ref(chosen) (summed over the reply's tokens),
    same for rejected. `kind` is one of LOSSES."""
    fn = _LOSS_FNS.get(kind)
    if fn is None:
        raise ValueError(f"unknown preference loss {kind!r}; valid: {', '.join(LOSSES)}")
    if chosen_logratio.shape != rejected_logratio.shape:
        raise ValueError(f"chosen and rejected log-ratios differ in shape: {tuple(chosen_logratio.shape)} vs "
                         f"{tuple(rejected_logratio.shape)}")
    return fn(chosen_logratio, rejected_logratio, beta)
