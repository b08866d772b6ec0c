"""Checkpoint layout, commit and validation; HF export. No Ray here: launch/loop hand folders to Ray Train.

A checkpoint folder holds DeepSpeed's files from every rank under `ds/` and `state.json`, which rank 0
writes after every rank has finished its files. state.json lists the SHA-256 of every file, so a folder
whose files are missing or damaged (a torn upload, a crash mid-save) is recognised and never loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

DS_TAG = "ds"
STATE_FILE = "state.json"


class CheckpointError(RuntimeError):
    pass


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_checksums(folder: Path) -> dict[str, str]:
    """Checksums of every file under `folder`, keyed by relative path (state.json excluded)."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            p = Path(root) / name
            rel = p.relative_to(folder).as_posix()
            if rel != STATE_FILE:
                out[rel] = sha256(p)
    return out


def save(engine, folder: Path, state: dict[str, Any]) -> None:
    """Every rank calls this: DeepSpeed files first, then (rank 0) state.json with all ranks' checksums."""
    import torch.distributed as dist

    folder.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(folder), tag=DS_TAG, save_latest=False)
    mine = file_checksums(folder)
    gathered: list[dict[str, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    if dist.get_rank() == 0:
        files: dict[str, str] = {}
        for part in gathered:
            files.update(part or {})
        _write_json(folder / STATE_FILE, {**state, "files": files})


def verify(folder: Path) -> dict[str, Any]:
    """state.json of a complete, undamaged checkpoint; CheckpointError naming the problem otherwise."""
    state_path = folder / STATE_FILE
    if not state_path.exists():
        raise CheckpointError(f"{folder}: no {STATE_FILE} (the save never finished)")
    state = json.loads(state_path.read_text())
    for rel, digest in state["files"].items():
        p = folder / rel
        if not p.exists():
            raise CheckpointError(f"{folder}: {rel} is missing")
        if sha256(p) != digest:
            raise CheckpointError(f"{folder}: {rel} does not match its checksum in {STATE_FILE}")
    return state


def fetch(uri: str, tmp: Path) -> Path:
    """A local folder holding the checkpoint at `uri` (object storage: downloaded into `tmp`)."""
    from raysmol import storage

    if not storage.is_remote(uri):
        return Path(uri)
    storage.download_dir(uri, tmp / "checkpoint")
    return tmp / "checkpoint"


def step_of(name: str) -> int | None:
    """checkpoint_00000120 -> 120; anything else -> None."""
    head, _, num = name.partition("_")
    return int(num) if head == "checkpoint" and num.isdigit() else None


def candidates(checkpoints_uri: str) -> list[tuple[int, str]]:
    """(step, folder URI) of every checkpoint folder on storage, newest first."""
    from raysmol import storage

    if not storage.exists(checkpoints_uri):
        return []
    found = [(step_of(n), storage.join(checkpoints_uri, n)) for n in storage.listdir(checkpoints_uri)]
    return sorted(((st, uri) for st, uri in found if st is not None), reverse=True)


def newest_valid(checkpoints_uri: str, local_root: Path) -> tuple[Path | None, dict | None, list[dict]]:
    """The newest checkpoint whose state.json exists and whose files all match their checksums, as a local
    folder (object-store folders are downloaded), its state, and the newer ones rejected with the reason."""
    from raysmol import storage

    rejected = []
    for step, uri in candidates(checkpoints_uri):
        if storage.is_remote(uri):
            if not storage.exists(storage.join(uri, STATE_FILE)):
                rejected.append({"checkpoint": uri, "step": step, "reason": f"no {STATE_FILE} (the save never finished)"})
                continue
            folder = local_root / f"checkpoint_{step:08d}"
            storage.download_dir(uri, folder)
        else:
            folder = Path(uri)
        try:
            return folder, verify(folder), rejected
        except CheckpointError as e:
            rejected.append({"checkpoint": uri, "step": step, "reason": str(e)})
    return None, None, rejected


def kept(step: int, keep_every: int) -> bool:
    """A checkpoint kept for good (train.keep_every): never pruned, by `prune` or by Ray Train."""
    return keep_every > 0 and step % keep_every == 0


RETENTION_METRIC = "retention"


def ray_retention(train) -> dict[str, Any]:
    """Ray Train's CheckpointConfig arguments for `train` (keep_checkpoints, keep_every).

    Ray deletes the registered checkpoints outside its `num_to_keep` best, and raysmol may not delete a registered
    one itself (Ray's restore then fails on the missing folder). So kept checkpoints are made Ray's best: every
    report carries `retention_score` (kept: above every step; others: the step) and Ray keeps the top
    keep_checkpoints + steps // keep_every, which holds every kept checkpoint (keep_every is a multiple of
    checkpoint_every, so there are at most that many) plus at least the newest keep_checkpoints others; until the
    kept ones fill their slots, Ray holds that many of the newest instead."""
    if not train.keep_every:
        return {"num_to_keep": train.keep_checkpoints}
    return {"num_to_keep": train.keep_checkpoints + train.steps // train.keep_every,
            "checkpoint_score_attribute": RETENTION_METRIC, "checkpoint_score_order": "max"}


def retention_score(step: int, keep_every: int) -> float:
    return float(step + (1 << 40 if kept(step, keep_every) else 0))


def prune(checkpoints_uri: str, keep: int, keep_every: int = 0) -> list[str]:
    """Remove what Ray Train's own retention (num_to_keep) never sees: torn folders (no state.json) and complete
    folders whose registration was lost, once older than the newest `keep` complete checkpoints. Folders Ray has
    registered are left to Ray (deleting one under it fails the run); nothing newer than the newest complete
    checkpoint is touched (it may be an upload in flight); complete folders at a multiple of `keep_every` stay."""
    from raysmol import storage

    snapshot = storage.join(checkpoints_uri, "checkpoint_manager_snapshot.json")
    registered = set()
    if storage.exists(snapshot):
        try:
            registered = {r["checkpoint_dir_name"] for r in json.loads(storage.read_text(snapshot)).get("checkpoint_results", [])}
        except (ValueError, OSError):
            # Ray's controller rewrites the snapshot in place: caught mid-write it reads empty or cut short.
            # Not knowing what Ray holds, delete nothing now; the next save prunes.
            return []
    removed, complete = [], 0
    for step, uri in candidates(checkpoints_uri):
        has_state = storage.exists(storage.join(uri, STATE_FILE))
        if has_state:
            complete += 1
        if (not complete or (has_state and (complete <= keep or kept(step, keep_every)))
                or uri.rstrip("/").rsplit("/", 1)[-1] in registered):
            continue
        storage.remove_tree(uri)
        removed.append(uri)
    return removed


def load(engine, folder: Path) -> dict[str, Any]:
    state = verify(folder)
    engine.load_checkpoint(str(folder), tag=DS_TAG, load_module_strict=True,
                           load_optimizer_states=True, load_lr_scheduler_states=True)
    return state


def load_universal(engine, universal: Path) -> None:
    """Load a checkpoint converted to DeepSpeed's universal format (any world size)."""
    engine.load_checkpoint(str(universal), tag=DS_TAG, load_module_strict=True,
                           load_optimizer_states=True, load_lr_scheduler_states=True)


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state().tolist()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def full_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on rank 0 (None elsewhere); every rank must call it (ZeRO-3 gathers)."""
    import torch.distributed as dist

    if engine.zero_optimization_stage() == 3:
        sd = engine._zero3_consolidated_16bit_state_dict()  # collective; returns the dict on rank 0 only
        return sd if dist.get_rank() == 0 else None
    if dist.get_rank() != 0:
        return None
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def consolidated_state_dict(folder: Path, zero_stage: int, train_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The whole model's weights from a checkpoint folder's DeepSpeed files, saved by any number of ranks, without
    torch.distributed: what `full_state_dict` returned in the run when it was saved.

    ZeRO 1-3 shard the fp32 master weights over the ranks' optimizer files; DeepSpeed's zero_to_fp32 joins them.
    Stage 0 shards nothing: the module's own weights are in the model-states file. With `train_dtype` (bf16
    training), the fp32 masters are rounded to it, as DeepSpeed rounds them into the module's weights after each
    step: the run's own exports are those module weights."""
    ds = folder / DS_TAG
    if zero_stage == 0:
        sd = torch.load(ds / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
        return {k: v.detach().clone() for k, v in sd.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=DS_TAG)
    return {k: v.to(train_dtype).float() if train_dtype is not None else v for k, v in sd.items()}


def export_hf(model, state_dict: dict[str, torch.Tensor], folder: Path) -> None:
    """save_pretrained with float32 weights (the master copy; bf16 training keeps fp32 masters), configured for
    generation: training builds its models with use_cache off (packed sequences, no cache to hold), and without
    this the exported generation_config.json carried that over, so every `generate` on the export (the
    transformers engines, a user's) recomputed the whole sequence for each new token."""
    sd = {k: v.float() for k, v in state_dict.items()}
    gen = getattr(model, "generation_config", None)
    before = model.config.use_cache, getattr(gen, "use_cache", None)
    model.config.use_cache = True
    if gen is not None:
        gen.use_cache = True
    try:
        model.save_pretrained(str(folder), state_dict=sd)
    finally:
        model.config.use_cache = before[0]
        if gen is not None:
            gen.use_cache = before[1]


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)
