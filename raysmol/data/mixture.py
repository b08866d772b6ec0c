"""The deterministic mixture cursor: global sample index -> (source, k-th sequence of that source).

Pure numpy, no Ray. The source of sample g is read off a golden-ratio Weyl sequence
x_g = (offset(seed) + g * 2^64/phi) mod 2^64, split into intervals proportional to the weights. A Weyl
sequence has discrepancy O(log N / N), so the realised share of every source stays within a fraction of a
percent of its weight at every prefix of a few hundred samples, for skewed weights too (0.9/0.1, 0.7/0.2/0.1),
where i.i.d. sampling would drift by ~1/sqrt(N). Exact 64-bit integer arithmetic makes it identical on every
machine. Because the map is a function of g alone, any world size sees the same global batches, and a
resume needs nothing but the step.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np

_PHI64 = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio, odd


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & (2**64 - 1)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return x ^ (x >> 31)


class Mixture:
    """Maps global sample indices to sources in proportion to `weights`, deterministically from `seed`."""

    def __init__(self, weights: Sequence[float], seed: int, chunk: int = 1 << 16):
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or len(w) == 0 or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"mixture weights must be >= 0 with a positive sum, got {list(weights)}")
        self.weights = w / w.sum()
        # Interval ends on [0, 2^64); a zero weight gives an empty interval, so that source is never drawn.
        cum = np.cumsum(self.weights)[:-1]
        self._thresholds = np.array([min(int(c * 2.0**64), 2**64 - 1) for c in cum], dtype=np.uint64)
        self._offset = np.uint64(_splitmix64(seed))
        self.chunk = chunk
        self._starts: list[np.ndarray] = [np.zeros(len(w), dtype=np.int64)]  # per-source counts before chunk c
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    @property
    def num_sources(self) -> int:
        return len(self.weights)

    def sources(self, g: np.ndarray) -> np.ndarray:
        """Source index of each global sample index."""
        g = np.asarray(g, dtype=np.uint64)
        with np.errstate(over="ignore"):
            x = self._offset + g * _PHI64  # wraps mod 2^64 by design
        return np.searchsorted(self._thresholds, x, side="right").astype(np.int64)

    def locate(self, g: np.ndarray | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(source, k) for each global index: sample g is the k-th sample drawn from its source."""
        g = np.asarray(g, dtype=np.int64)
        src = np.empty_like(g)
        k = np.empty_like(g)
        for c in np.unique(g // self.chunk):
            sel = (g // self.chunk) == c
            chunk_src, chunk_k = self._chunk(int(c))
            local = g[sel] - c * self.chunk
            src[sel] = chunk_src[local]
            k[sel] = chunk_k[local]
        return src, k

    def counts(self, n: int) -> np.ndarray:
        """How many of the first n samples each source received."""
        c, r = divmod(n, self.chunk)
        base = self._start(c).copy()
        if r:
            base += np.bincount(self._chunk(c)[0][:r], minlength=self.num_sources)
        return base

    def _start(self, c: int) -> np.ndarray:
        while len(self._starts) <= c:
            i = len(self._starts) - 1
            src = self.sources(np.arange(i * self.chunk, (i + 1) * self.chunk))
            self._starts.append(self._starts[i] + np.bincount(src, minlength=self.num_sources))
        return self._starts[c]

    def _chunk(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        if c in self._cache:
            self._cache.move_to_end(c)
            return self._cache[c]
        src = self.sources(np.arange(c * self.chunk, (c + 1) * self.chunk))
        k = np.empty(self.chunk, dtype=np.int64)
        start = self._start(c)
        for s in range(self.num_sources):
            idx = np.flatnonzero(src == s)
            k[idx] = start[s] + np.arange(len(idx))
        self._cache[c] = (src, k)
        if len(self._cache) > 4:
            self._cache.popitem(last=False)
        return src, k


class StagedMixture:
    """A mixture whose weights change at stage boundaries (SmolLM3's three stages): stage i covers global samples
    [starts[i], starts[i+1]) (the last stage runs on) and draws with its own weights; a source's reads continue
    across boundaries where they stopped: its k in stage i is offset by what it read in stages 0..i-1, so nothing
    is repeated or skipped. One stage is exactly `Mixture(weights, seed)`."""

    def __init__(self, stages: Sequence[tuple[int, Sequence[float]]], seed: int):
        self.starts = [int(s) for s, _ in stages]
        if not self.starts or self.starts[0] != 0 or any(b <= a for a, b in zip(self.starts, self.starts[1:])):
            raise ValueError(f"stage starts must begin at 0 and increase, got {self.starts}")
        # Stage 0 keeps the run's seed, so an unstaged run draws exactly what it did before stages existed.
        self.parts = [Mixture(w, seed if i == 0 else _splitmix64(seed * 1000003 + i)) for i, (_, w) in enumerate(stages)]
        if len({p.num_sources for p in self.parts}) != 1:
            raise ValueError("every stage needs one weight per source")
        self.offsets = [np.zeros(self.num_sources, dtype=np.int64)]
        for i in range(1, len(stages)):
            self.offsets.append(self.offsets[-1] + self.parts[i - 1].counts(self.starts[i] - self.starts[i - 1]))

    @property
    def num_sources(self) -> int:
        return self.parts[0].num_sources

    def stage_of(self, g: np.ndarray | Sequence[int]) -> np.ndarray:
        return np.searchsorted(self.starts, np.asarray(g, dtype=np.int64), side="right") - 1

    def locate(self, g: np.ndarray | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(source, k) for each global index: sample g is the k-th sample the run draws from its source."""
        g = np.asarray(g, dtype=np.int64)
        src, k = np.empty_like(g), np.empty_like(g)
        stage = self.stage_of(g)
        for i in np.unique(stage):
            sel = stage == i
            s, kk = self.parts[i].locate(g[sel] - self.starts[i])
            src[sel], k[sel] = s, kk + self.offsets[i][s]
        return src, k

    def counts(self, n: int) -> np.ndarray:
        """How many of the first n samples each source received (over all stages)."""
        i = int(self.stage_of([max(n - 1, 0)])[0])
        return self.offsets[i] + self.parts[i].counts(n - self.starts[i])

    def stage_counts(self, i: int, n: int) -> np.ndarray:
        """How many of stage i's first n samples each source received."""
        return self.parts[i].counts(n)
