"""Per-rank micro-batches from the global data cursor. The only state is the step.

Step t's global batch is samples [t*B, (t+1)*B) of the mixture (B = global_batch_tokens / seq_len); with data
stages, the mixture's weights change at each stage's first step (StagedMixture).
Micro-batch a of rank r takes samples t*B + (a*W + r)*m + [0, m): every world size W sees the same global
batch, so an elastic restart changes only the order of the gradient reduction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from raysmol.data.mixture import StagedMixture
from raysmol.data.store import TokenStream


@dataclass
class Batch:
    input_ids: torch.Tensor  # [m, L]
    labels: torch.Tensor  # [m, L]
    position_ids: torch.Tensor  # [m, L]
    sources: np.ndarray  # [m] source index of each row
    epochs: np.ndarray  # [m] epoch of each row's source stream
    # Per-row tensors an objective needs besides tokens (DPO: reference log-probs; GRPO: advantages, sampling
    # log-probs); they travel to the device with the rest.
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> "Batch":
        nb = torch.device(device).type == "cuda"
        # Only a copy from pinned host memory is asynchronous: from pageable memory non_blocking still waits.
        move = lambda t: (t.pin_memory() if nb else t).to(device, non_blocking=nb)  # noqa: E731
        return Batch(move(self.input_ids), move(self.labels), move(self.position_ids), self.sources, self.epochs,
                     {k: move(v) for k, v in self.extras.items()})


class Batches:
    def __init__(self, streams: list[TokenStream], weights: list[float], seed: int, seq_len: int,
                 samples_per_step: int, intra_doc_masking: bool = True, names: list[str] | None = None,
                 stages: list[tuple[int, list[float]]] | None = None, stage_names: list[str] | None = None):
        """`stages`: (first step, weights) per stage, replacing `weights` (config: DataConfig.stage_plan)."""
        stages = stages or [(0, weights)]
        if any(len(streams) != len(w) for _, w in stages):
            raise ValueError("one stream per mixture weight")
        self.streams = streams
        self.names = names or [f"source{i}" for i in range(len(streams))]
        self.stage_names = stage_names or [f"stage{i}" for i in range(len(stages))]
        self.mixture = StagedMixture([(start * samples_per_step, w) for start, w in stages], seed)
        self.seq_len = seq_len
        self.samples_per_step = samples_per_step
        self.intra_doc_masking = intra_doc_masking

    def samples(self, g: np.ndarray) -> Batch:
        """The packed sequences of global sample indices `g`."""
        src, k = self.mixture.locate(g)
        windows = [self.streams[s].window(int(i), self.seq_len) for s, i in zip(src, k)]
        tokens = torch.from_numpy(np.stack([w.tokens for w in windows]))
        if self.intra_doc_masking:
            positions = np.stack([w.positions for w in windows])
        else:
            positions = np.broadcast_to(np.arange(self.seq_len), (len(windows), self.seq_len)).copy()
        return Batch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), torch.from_numpy(positions),
                     src, np.asarray([w.epoch for w in windows]))

    def micro_batches(self, step: int, rank: int, world: int, micro: int) -> list[Batch]:
        per_pass = world * micro
        if self.samples_per_step % per_pass:
            raise ValueError(f"{self.samples_per_step} samples per step do not split into {world} ranks x {micro}")
        base = step * self.samples_per_step
        return [self.samples(base + (a * world + rank) * micro + np.arange(micro))
                for a in range(self.samples_per_step // per_pass)]

    def epochs(self, step: int) -> dict[str, float]:
        """How many passes over each source's token stream the run has made by the end of this step."""
        counts = self.mixture.counts((step + 1) * self.samples_per_step)
        return {n: float(c * self.seq_len / s.total) for n, c, s in zip(self.names, counts, self.streams)}

    def position(self, step: int) -> dict:
        """Where the data stands after data step `step`, for the metrics row: passes over each source, tokens read
        from each, the stage and each source's realised share of the stage's samples so far."""
        n = (step + 1) * self.samples_per_step
        m = self.mixture
        i = int(m.stage_of([n - 1])[0])
        in_stage = m.stage_counts(i, n - m.starts[i])
        return {"epochs": self.epochs(step), "stage": self.stage_names[i],
                "source_tokens": {k: int(c) * self.seq_len for k, c in zip(self.names, m.counts(n))},
                "stage_shares": {k: float(c / in_stage.sum()) for k, c in zip(self.names, in_stage)}}
