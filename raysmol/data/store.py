"""Token store reader and packing: sequences are windows over a source's (endless) token stream.

A prepared split is a folder with `manifest.json` and, per shard, `<i>.tokens.npy` (all documents'
tokens, EOS appended, back to back) and `<i>.lens.npy` (document lengths). Shards are memory-mapped.

The stream of a source is epoch 0 (documents in prepared order), then epoch 1, 2, ... each in a new
order drawn from (seed, epoch): a source that runs out wraps instead of stopping the run. Window k
covers stream positions [k*L, (k+1)*L) as inputs and [k*L+1, (k+1)*L+1) as labels, so within the
consumed span every token is an input exactly once: none lost, none duplicated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np


@dataclass
class Window:
    tokens: np.ndarray  # L + 1 tokens: inputs are [:-1], labels [1:]
    positions: np.ndarray  # L position ids, restarting at 0 where a document starts
    epoch: int  # the epoch of the window's last input token


class TokenStream:
    """Random access into the endless token stream of one prepared split of one source."""

    def __init__(self, split_dir: str | Path, seed: int = 0):
        split_dir = Path(split_dir)
        manifest = json.loads((split_dir / "manifest.json").read_text())
        self.seed = seed
        self._shards = [np.load(split_dir / s["tokens"], mmap_mode="r") for s in manifest["shards"]]
        lens = [np.load(split_dir / s["lens"]).astype(np.int64) for s in manifest["shards"]]
        self.doc_lens = np.concatenate(lens) if lens else np.zeros(0, np.int64)
        self.doc_shard = np.concatenate([np.full(len(x), i) for i, x in enumerate(lens)]) if lens else np.zeros(0, int)
        # Offset of each document inside its shard.
        self.doc_offset = np.concatenate([np.cumsum(x) - x for x in lens]) if lens else np.zeros(0, np.int64)
        self.total = int(self.doc_lens.sum())
        if self.total == 0:
            raise ValueError(f"token store {split_dir} holds no tokens")

    @property
    def num_docs(self) -> int:
        return len(self.doc_lens)

    @lru_cache(maxsize=4)
    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Document order of an epoch and the stream offset where each of its documents starts."""
        if epoch == 0:
            order = np.arange(self.num_docs)
        else:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_docs)
        starts = np.concatenate([[0], np.cumsum(self.doc_lens[order])[:-1]])
        return order, starts

    def read(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tokens at stream positions [start, start+length), the in-document offset of the first token,
        and the window positions where a document starts."""
        out = np.empty(length, dtype=np.int64)
        doc_starts = []
        first_offset = 0
        pos, filled = start, 0
        while filled < length:
            epoch, off = divmod(pos, self.total)
            order, starts = self._order(epoch)
            j = int(np.searchsorted(starts, off, side="right")) - 1
            d = order[j]
            within = off - int(starts[j])
            n = min(length - filled, int(self.doc_lens[d]) - within)
            base = int(self.doc_offset[d]) + within
            out[filled : filled + n] = self._shards[self.doc_shard[d]][base : base + n]
            if within == 0:
                doc_starts.append(filled)
            elif filled == 0:
                first_offset = within
            filled += n
            pos += n
        return out, np.asarray([first_offset]), np.asarray(doc_starts, dtype=np.int64)

    def window(self, k: int, seq_len: int) -> Window:
        """The k-th packed sequence: L inputs plus the next token as the last label."""
        tokens, first, doc_starts = self.read(k * seq_len, seq_len + 1)
        positions = np.arange(seq_len, dtype=np.int64) + int(first[0])
        for s in doc_starts:
            if s < seq_len:
                positions[s:] = np.arange(seq_len - s)
        return Window(tokens, positions, epoch=((k + 1) * seq_len - 1) // self.total)
