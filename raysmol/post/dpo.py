"""DPO and its family (IPO, APO) on the shared loop: chosen/rejected rows, and the frozen reference's
log-probs of them computed once, before training, in a Ray task."""

from __future__ import annotations

import time
from functools import partial

import ray
import torch

from raysmol.config import Config
from raysmol.data.batches import Batch
from raysmol.model.folder import resolve_model
from raysmol.post.preference import prepare_pairs, reference_logps
from raysmol.post.preference_losses import preference_loss
from raysmol.post.sft import SFT
from raysmol.train.objectives import Objective, sequence_logps


def dpo(model: torch.nn.Module, batch: Batch, beta: float,
        loss: str = "sigmoid") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A preference loss (`dpo.loss`; Rafailov et al. 2023 by default): rows alternate chosen, rejected;
    `ref_logps` are the frozen reference's summed log-probs of the same rows. Implicit reward
    r = beta * (log pi - log pi_ref)."""
    logratio = sequence_logps(model, batch) - batch.extras["ref_logps"].to(torch.float32)
    chosen, rejected = beta * logratio[0::2], beta * logratio[1::2]
    margin = chosen - rejected
    value = preference_loss(loss, logratio[0::2], logratio[1::2], beta).mean()
    return value, {"reward_margin": margin.mean().detach(), "reward_accuracy": (margin > 0).float().mean(),
                   "chosen_reward": chosen.mean().detach(), "rejected_reward": rejected.mean().detach()}


class DPO(SFT):
    """SFT's batches with items of two rows (chosen, rejected) and the reference's log-probs as extras."""

    verb = "dpo"
    group = 2

    def prepare_data(self, cfg: Config) -> None:
        data = prepare_pairs(cfg.dpo.data, self.tokenizer, cfg.train.seq_len, cfg.dpo.val_fraction)
        t = time.perf_counter()
        gpu = {"num_gpus": 1} if cfg.train.use_gpu else {}
        refs = {k: _reference_logps.options(**gpu).remote(self.init_uri, data[k], max(64, cfg.train.micro_batch_size * 2))
                for k in ("train", "val") if data[k] is not None}
        logps = {k: ray.get(r) for k, r in refs.items()}
        data["stats"]["reference_s"] = time.perf_counter() - t
        self.rows, self.stats = {"train": data["train"], "val": data["val"]}, data["stats"]
        self.extras = {k: {"ref_logps": logps[k]} if k in logps else {} for k in ("train", "val")}

    def objective(self, cfg: Config) -> Objective:
        return partial(dpo, beta=cfg.dpo.beta, loss=cfg.dpo.loss)


@ray.remote(num_cpus=1)
def _reference_logps(model_uri: str, packed, micro_batch: int):
    """The frozen reference's log-probs of every row, computed once before training (in a task: on a GPU where
    training has them, and no reference model is kept in the training workers)."""
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(resolve_model(model_uri), dtype=torch.float32).to(device)
    return reference_logps(model, packed, micro_batch, device)
