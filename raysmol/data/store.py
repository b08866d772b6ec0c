"""Token store reader and packing: sequences are windows over a source's (endless) token stream.

A prepared split is a folder with `manifest.json` and, per shard, `<i>.tokens.npy` (all documents'
tokens, EOS appended, back to back) and `<i>.lens.npy` (document lengths). Shards are memory-mapped.

The stream of a source is epoch 0, then epoch 1, 2, ... each in a new document order drawn from (seed, epoch):
a source that runs out wraps instead of stopping the run. Epoch 0 keeps the shards in prepared order and, with
`shuffle`, permutes the documents inside each shard (a shard is one work item of preparation, ~1M tokens), so a
source whose preparation is extended by appended shards keeps the stream it has already been read from. Slot w
covers stream positions [w*L, (w+1)*L) as inputs and [w*L+1, (w+1)*L+1) as labels, so within the consumed span
every token is an input exactly once: none lost, none duplicated.

The k-th window read is slot k without `shuffle`. With it, reads go through the slots in blocks of
B = min(MAX_BLOCK, tokens per epoch // L) slots, each block in a seeded pseudo-random order (a Feistel permutation:
O(1) memory, a pure function of (seed, block, k)): consecutive reads, and so the samples of a global batch, come
from far-apart parts of the source, and once a block is read every slot in it has been read exactly once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

# Slots per shuffled block (268M tokens at L=4096). A source with at least this many windows per epoch has
# blocks of exactly this size, whatever its length, so appending prepared shards (a raised budget) changes nothing
# already read; preparation budgets add one block of tokens to their margin so a run never reaches the block that
# straddles the prepared end.
MAX_BLOCK = 1 << 16
_M64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finaliser: a 64-bit bijective hash."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def permute(j: int, n: int, key: int) -> int:
    """Element j of a seeded permutation of range(n): a 4-round Feistel network over the smallest even-bit
    power of two >= n, cycle-walking until the value falls inside range(n) (a bijection of range(n), since
    the network is a bijection of the larger domain)."""
    if n <= 1:
        return j
    half = ((n - 1).bit_length() + 1) // 2
    mask = (1 << half) - 1
    keys = [_mix((key * 4 + r) & _M64) for r in range(4)]
    x = j
    while True:
        left, right = x >> half, x & mask
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & mask)
        x = (left << half) | right
        if x < n:
            return x


@dataclass
class Window:
    tokens: np.ndarray  # L + 1 tokens: inputs are [:-1], labels [1:]
    positions: np.ndarray  # L position ids, restarting at 0 where a document starts
    epoch: int  # the epoch of the window's last input token


class TokenStream:
    """Random access into the endless token stream of one prepared split of one source."""

    def __init__(self, split_dir: str | Path, seed: int = 0, shuffle: bool = False):
        split_dir = Path(split_dir)
        manifest = json.loads((split_dir / "manifest.json").read_text())
        self.seed, self.shuffle = seed, shuffle
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
        if epoch == 0 and not self.shuffle:
            order = np.arange(self.num_docs)
        elif epoch == 0:  # within each shard, shards in order: appending shards keeps this part of the stream
            order = np.arange(self.num_docs)
            edges = np.flatnonzero(np.diff(self.doc_shard)) + 1
            for i, (a, b) in enumerate(zip([0, *edges], [*edges, self.num_docs])):
                order[a:b] = a + np.random.default_rng([self.seed, 0, i]).permutation(b - a)
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

    def slot(self, k: int, seq_len: int) -> int:
        """The stream slot of the k-th window read (see the module docstring)."""
        if not self.shuffle:
            return k
        block = max(1, min(MAX_BLOCK, self.total // seq_len))
        b, j = divmod(k, block)
        return b * block + permute(j, block, _mix((self.seed << 32) ^ b))

    def window(self, k: int, seq_len: int) -> Window:
        """The k-th packed sequence read: L inputs plus the next token as the last label."""
        w = self.slot(k, seq_len)
        tokens, first, doc_starts = self.read(w * seq_len, seq_len + 1)
        positions = np.arange(seq_len, dtype=np.int64) + int(first[0])
        for s in doc_starts:
            if s < seq_len:
                positions[s:] = np.arange(seq_len - s)
        return Window(tokens, positions, epoch=((w + 1) * seq_len - 1) // self.total)
