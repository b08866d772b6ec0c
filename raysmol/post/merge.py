"""Merge Hugging Face checkpoints of one architecture: linear average, task arithmetic, SLERP (`raysmol merge`).

Merging is post-training's cheapest step: no data, no gradients, minutes on a CPU. Each method is a small pure
function of float32 tensors; `merge()` streams. For each tensor name it reads that tensor from every input
(safetensors `safe_open` memory-maps the files, so nothing is loaded whole), merges it and adds it to the output
shard being built. Peak memory is one output shard plus one tensor per input, not the sum of the models.

Methods (the coefficients used are recorded in merge.json):
- linear: sum_i w_i x_i / sum_i w_i (model soups, Wortsman et al. 2022). The weights are *normalised*, so
  `--weights 1 3` is `--weights 0.25 0.75`; they must be >= 0 with a positive sum; default equal.
- task_arithmetic: base + sum_i w_i (x_i - base) (Ilharco et al. 2023, "Editing models with task arithmetic").
  The weights are the paper's scaling coefficients and are *not* normalised; a negative weight negates a task (the
  paper's forgetting); default 1/n each, the mean task vector (so one model with no weights returns that model).
- slerp: spherical interpolation of exactly two models at t in [0, 1], tensor by tensor, as mergekit does it: the
  angle comes from the flattened, normalised tensors; the blend applies to the raw tensors; nearly colinear
  tensors (|cos| > 0.9995, e.g. two RMSNorm weights still all ones) and zero tensors fall back to linear
  interpolation, where sin(angle) would divide by ~0.

Every input must have the same config.json architecture keys (ARCH_KEYS), the same tensor names and the same
shapes; anything else is a MergeError naming the key or tensor and both models' values, raised before anything is
written. The output (config, tokenizer and other non-weight files, dtype per tensor) follows the *reference*
model: `--base` for task arithmetic, else the first model. Its folder appears whole or not at all: it is built
in a temporary sibling and renamed, with merge.json (method, inputs, coefficients, SHA-256 of every input weight
file) written last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from raysmol.train.checkpoint import sha256

METHODS = ("linear", "task_arithmetic", "slerp")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
RECORD_FILE = "merge.json"
DEFAULT_MAX_SHARD = "5GB"  # save_pretrained's default
# config.json keys that fix the weights' shapes or meaning: two checkpoints that differ in one are different
# architectures even when every shape matches (8 heads of 64 vs 16 heads of 32; NoPE on different layers).
ARCH_KEYS = ("architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings",
             "no_rope_layers", "no_rope_layer_interval")
# mergekit's DOT_THRESHOLD: above this |cos| the two directions are numerically one and slerp's
# sin(theta_t) / sin(theta) is 0/0-unstable, so linear interpolation is used (it is the limit anyway).
COLINEAR_DOT = 0.9995
_NORM_EPS = 1e-8
# safetensors dtype names -> bytes per element, to plan output shards from file headers before loading anything.
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
# Weights in any format are never copied into the output: the merged safetensors replace them.
_WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|msgpack|h5)$|.*\.safetensors\.index\.json$")


class MergeError(ValueError):
    """Inputs cannot be merged or the arguments are invalid; the message names the key, tensor or file."""


# ---- merge rules: pure functions of float32 tensors ---------------------------------------------------------


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i x_i with `weights` already normalised to sum to 1."""
    out = tensors[0] * weights[0]
    for x, w in zip(tensors[1:], weights[1:]):
        out.add_(x, alpha=w)
    return out


def task_arithmetic(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """base + sum_i w_i (x_i - base)  (Ilharco et al. 2023)."""
    out = base.clone()
    for x, w in zip(tensors, weights):
        out.add_(x - base, alpha=w)
    return out


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation from a (t=0) to b (t=1), mergekit's formulation (see the module docstring)."""
    if t == 0.0:  # exact endpoints: sin ratios are not exactly 0 and 1 in floating point
        return a.clone()
    if t == 1.0:
        return b.clone()
    na, nb = torch.linalg.vector_norm(a).item(), torch.linalg.vector_norm(b).item()
    if na < _NORM_EPS or nb < _NORM_EPS:  # a zero tensor has no direction
        return torch.lerp(a, b, t)
    cos = max(-1.0, min(1.0, torch.dot(a.flatten(), b.flatten()).item() / (na * nb)))
    if abs(cos) > COLINEAR_DOT:
        return torch.lerp(a, b, t)  # exact when a == b
    theta = math.acos(cos)
    s = math.sin(theta)
    return a * (math.sin((1.0 - t) * theta) / s) + b * (math.sin(t * theta) / s)


# ---- reading checkpoints ----------------------------------------------------------------------------------


class Checkpoint:
    """One save_pretrained folder's safetensors weights (single file or sharded with an index), read a tensor
    at a time. The file handles live as long as `stack`."""

    def __init__(self, folder: str | Path, stack: ExitStack):
        from safetensors import safe_open

        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise MergeError(f"{self.folder}: not a directory (expected a save_pretrained folder)")
        self.config = _read_config(self.folder)
        files = _weight_map(self.folder)
        handles = {f: stack.enter_context(safe_open(str(self.folder / f), framework="pt"))
                   for f in sorted(set(files.values()))}
        held = {f: set(h.keys()) for f, h in handles.items()}
        self._handle = {}
        for name, f in files.items():
            if name not in held[f]:
                raise MergeError(f"{self.folder / INDEX_FILE}: lists tensor {name} in {f}, which does not hold it")
            self._handle[name] = handles[f]
        self.weight_files = sorted(handles)

    def names(self) -> set[str]:
        return set(self._handle)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle[name].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self._handle[name].get_slice(name).get_dtype()

    def tensor(self, name: str) -> torch.Tensor:
        return self._handle[name].get_tensor(name)


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.exists():
        raise MergeError(f"{folder}: no config.json (expected a save_pretrained folder)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MergeError(f"{path}: not valid JSON ({e})") from None


def _weight_map(folder: Path) -> dict[str, str]:
    """tensor name -> the safetensors file (relative to `folder`) that holds it."""
    from safetensors import safe_open

    index = folder / INDEX_FILE
    if index.exists():
        files = json.loads(index.read_text())["weight_map"]
        for f in sorted(set(files.values())):
            if not (folder / f).exists():
                raise MergeError(f"{index}: names shard {f}, which is missing")
        return files
    if (folder / SINGLE_FILE).exists():
        with safe_open(str(folder / SINGLE_FILE), framework="pt") as h:
            return {name: SINGLE_FILE for name in h.keys()}
    present = sorted(p.name for p in folder.iterdir())
    raise MergeError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE} (found {present}); only safetensors are read "
                     "- re-save with save_pretrained (safetensors is its default)")


def check_compatible(models: Sequence[Checkpoint]) -> list[str]:
    """The tensor names to merge (sorted), after checking every model against the first (the reference)."""
    ref = models[0]
    for m in models[1:]:
        for key in ARCH_KEYS:
            if ref.config.get(key) != m.config.get(key):
                raise MergeError(f"config.json key {key} differs: {ref.config.get(key)!r} in {ref.folder} but "
                                 f"{m.config.get(key)!r} in {m.folder}")
        missing, extra = sorted(ref.names() - m.names()), sorted(m.names() - ref.names())
        if missing or extra:
            raise MergeError(f"tensor names differ: {m.folder} lacks {_few(missing)} and has extra {_few(extra)} "
                             f"compared with {ref.folder}")
        for name in sorted(ref.names()):
            if ref.shape(name) != m.shape(name):
                raise MergeError(f"tensor {name}: shape {list(ref.shape(name))} in {ref.folder} but "
                                 f"{list(m.shape(name))} in {m.folder}")
    return sorted(ref.names())


def _few(names: list[str], n: int = 5) -> str:
    return "[]" if not names else str(names[:n])[:-1] + (f", ... {len(names) - n} more]" if len(names) > n else "]")


# ---- writing the merged folder ----------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '2048' -> bytes (decimal units, as save_pretrained's max_shard_size)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB)?\s*", str(text).upper())
    if not m or float(m.group(1)) <= 0:
        raise MergeError(f"--max-shard-size: {text!r} is not a size like 5GB, 500MB or 2048 (bytes)")
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}[m.group(2) or "B"]
    return int(float(m.group(1)) * scale)


def plan_shards(sizes: Sequence[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Greedy, in order: a shard closes when the next tensor would take it past max_bytes (a bigger tensor gets
    a shard of its own), as save_pretrained does. Planned from headers, so file names know the shard count."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes:
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def _tensor_bytes(ckpt: Checkpoint, name: str) -> int:
    dtype = ckpt.dtype(name)
    if dtype not in _DTYPE_BYTES:
        raise MergeError(f"tensor {name} in {ckpt.folder}: dtype {dtype} is not supported ({sorted(_DTYPE_BYTES)})")
    return math.prod(ckpt.shape(name)) * _DTYPE_BYTES[dtype]


def _merged_tensor(name: str, inputs: Sequence[Checkpoint], rule: Callable[[list[torch.Tensor]], torch.Tensor]):
    """One output tensor: every input's copy of `name`, merged in float32, cast to inputs[0]'s dtype."""
    xs = [m.tensor(name) for m in inputs]
    ref = xs[0]
    if not ref.is_floating_point():  # integer buffers (ids, masks) cannot be averaged: they must agree
        for m, x in zip(inputs[1:], xs[1:]):
            if not torch.equal(ref, x):
                raise MergeError(f"tensor {name}: integer tensor differs between {inputs[0].folder} and {m.folder}")
        return ref
    return rule([x.float() for x in xs]).to(ref.dtype).contiguous()


def _write_weights(out: Path, names: list[str], inputs: Sequence[Checkpoint], rule, max_bytes: int,
                   progress: bool) -> None:
    from safetensors.torch import save_file
    from tqdm import tqdm

    ref = inputs[0]
    shards = plan_shards([(n, _tensor_bytes(ref, n)) for n in names], max_bytes)
    weight_map = {}
    with tqdm(total=len(names), desc="merge", unit="tensor", disable=not progress, dynamic_ncols=True) as bar:
        for i, shard in enumerate(shards):
            fname = SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for name in shard:
                tensors[name] = _merged_tensor(name, inputs, rule)
                weight_map[name] = fname
                bar.update(1)
            save_file(tensors, str(out / fname), metadata={"format": "pt"})
            del tensors  # this shard's memory is free before the next one fills
    if len(shards) > 1:
        total = sum(_tensor_bytes(ref, n) for n in names)
        (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2, sort_keys=True))


def _copy_support_files(src: Path, out: Path) -> list[str]:
    """config.json, tokenizer files, generation config...: every top-level non-weight file of the reference."""
    copied = []
    for p in sorted(src.iterdir()):
        if p.is_file() and p.name != RECORD_FILE and not _WEIGHT_FILE.match(p.name):
            shutil.copy2(p, out / p.name)
            copied.append(p.name)
    return copied


# ---- the merge --------------------------------------------------------------------------------------------


def _coefficients(method: str, n_models: int, weights: Sequence[float] | None, base: str | Path | None,
                  t: float | None) -> tuple[list[float] | None, float | None]:
    """Validated (weights, t) for `method`; MergeError naming the argument otherwise."""
    if method not in METHODS:
        raise MergeError(f"--method: {method!r} is not one of {list(METHODS)}")
    if (base is not None) != (method == "task_arithmetic"):
        raise MergeError("--base: required by task_arithmetic" if base is None else f"--base: not used by {method}")
    if method == "slerp":
        if n_models != 2:
            raise MergeError(f"slerp merges exactly 2 models, got {n_models}")
        if weights is not None:
            raise MergeError("--weights: not used by slerp (use --t)")
        t = 0.5 if t is None else float(t)
        if not 0.0 <= t <= 1.0:
            raise MergeError(f"--t: {t} is outside [0, 1]")
        return None, t
    if t is not None:
        raise MergeError(f"--t: only used by slerp, not {method}")
    if method == "linear" and n_models < 2:
        raise MergeError(f"linear merges 2 or more models, got {n_models}")
    if weights is None:
        return [1.0 / n_models] * n_models, None
    weights = [float(w) for w in weights]
    if len(weights) != n_models:
        raise MergeError(f"--weights: {len(weights)} values for {n_models} models")
    if not all(math.isfinite(w) for w in weights):
        raise MergeError(f"--weights: {weights} must be finite numbers")
    if method == "linear":
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise MergeError(f"--weights: {weights} must be >= 0 with a positive sum for a linear merge")
        return [w / sum(weights) for w in weights], None
    return weights, None


def _describe(ckpt: Checkpoint) -> dict[str, Any]:
    return {"path": str(ckpt.folder.resolve()), "sha256": {f: sha256(ckpt.folder / f) for f in ckpt.weight_files}}


def merge(method: str, models: Sequence[str | Path], out: str | Path, *, weights: Sequence[float] | None = None,
          base: str | Path | None = None, t: float | None = None, max_shard_size: str | int = DEFAULT_MAX_SHARD,
          progress: bool = True) -> dict[str, Any]:
    """Merge `models` into a new save_pretrained folder `out`; returns the merge.json record."""
    coeffs, t = _coefficients(method, len(models), weights, base, t)
    max_bytes = parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MergeError(f"--out: {out} already exists and is not an empty directory")
    with ExitStack() as stack:
        ckpts = [Checkpoint(m, stack) for m in models]
        base_ckpt = Checkpoint(base, stack) if base is not None else None
        inputs = [base_ckpt, *ckpts] if base_ckpt is not None else ckpts
        names = check_compatible(inputs)
        rule: Callable[[list[torch.Tensor]], torch.Tensor] = {
            "linear": lambda xs: linear(xs, coeffs),
            "task_arithmetic": lambda xs: task_arithmetic(xs[0], xs[1:], coeffs),
            "slerp": lambda xs: slerp(xs[0], xs[1], t),
        }[method]
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            _write_weights(tmp, names, inputs, rule, max_bytes, progress)
            copied = _copy_support_files(inputs[0].folder, tmp)
            record = {"method": method, "models": [_describe(c) for c in ckpts],
                      "base": _describe(base_ckpt) if base_ckpt is not None else None,
                      "weights": coeffs, "t": t, "reference": str(inputs[0].folder.resolve()),
                      "tensors": len(names), "copied": copied}
            (tmp / RECORD_FILE).write_text(json.dumps(record, indent=1))  # last: marks the folder complete
            if out.exists():
                out.rmdir()
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return record


# ---- CLI --------------------------------------------------------------------------------------------------


def cmd_merge(args) -> int:
    try:
        record = merge(args.method, args.models, args.out, weights=args.weights, base=args.base, t=args.t,
                       max_shard_size=args.max_shard_size, progress=sys.stderr.isatty())
    except MergeError as e:
        print(f"raysmol: error: {e}", file=sys.stderr)
        return 2
    coeff = f"t={record['t']}" if record["t"] is not None else f"weights={record['weights']}"
    print(f"merged {record['tensors']} tensors ({args.method}, {coeff}) -> {args.out}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("merge", help="merge HF checkpoints of one architecture: linear, task_arithmetic, slerp",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", metavar="MODEL", help="save_pretrained folders (safetensors weights)")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--out", required=True, help="new folder for the merged model (must not exist or be empty)")
    p.add_argument("--weights", type=float, nargs="+", metavar="W",
                   help="one per MODEL; linear: normalised, >= 0 (default equal); task_arithmetic: scaling "
                        "coefficients, not normalised (default 1/n each)")
    p.add_argument("--base", help="task_arithmetic: the model the others were fine-tuned from")
    p.add_argument("--t", type=float, help="slerp: 0 gives the first model, 1 the second (default 0.5)")
    p.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD, help="output shard size (default 5GB)")
    p.set_defaults(fn=cmd_merge)
