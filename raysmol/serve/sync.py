"""Weights in buckets: a state dict cut into ordered lists of named tensors of at most a given size, what GRPO puts
into Ray's object store (one ray.put per bucket) and every engine loads in order (begin, bucket 0, 1, ..., end).
No Ray here: raysmol/serve/pool.py puts and fetches."""

from __future__ import annotations

from typing import Iterable

import torch

MIB = 2**20

Bucket = list[tuple[str, torch.Tensor]]


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def buckets(state_dict: dict[str, torch.Tensor], bucket_mb: float, dtype: torch.dtype | None = None) -> list[Bucket]:
    """The state dict's tensors in its own order, on the CPU and contiguous (floating ones cast to `dtype` when
    given; the tensors themselves where nothing changes, so put them before the weights move), cut into buckets of
    at most `bucket_mb` MiB: a bucket closes before the tensor that would overflow it; a tensor larger than the
    limit is a bucket alone. Tied tensors (one storage under two names) go once, under
    their first name: every engine re-ties them."""
    if bucket_mb <= 0:
        raise ValueError(f"bucket_mb must be positive, got {bucket_mb}")
    limit = bucket_mb * MIB
    out: list[Bucket] = []
    current: Bucket = []
    size = 0
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    for name, t in state_dict.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and key in seen:
            continue
        seen.add(key)
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.to("cpu").contiguous()  # no copy where it already is: ray.put copies
        n = nbytes(t)
        if current and size + n > limit:
            out.append(current)
            current, size = [], 0
        current.append((name, t))
        size += n
    if current:
        out.append(current)
    return out


def reassemble(parts: Iterable[Bucket]) -> dict[str, torch.Tensor]:
    """The buckets back into one state dict, in order (a name twice is an error)."""
    sd: dict[str, torch.Tensor] = {}
    for bucket in parts:
        for name, t in bucket:
            if name in sd:
                raise ValueError(f"tensor {name!r} is in two buckets")
            sd[name] = t
    return sd
