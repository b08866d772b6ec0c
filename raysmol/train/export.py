"""Hugging Face exports of a run: the folders the loop writes (`write`), and `raysmol export CHECKPOINT`, which
turns a training checkpoint (any ZeRO stage, any world size, local or object storage) into one on any machine:
no GPU, no torch.distributed, no Ray.

The weights come from the checkpoint's DeepSpeed files (`checkpoint.consolidated_state_dict`), the model from the
run's own config, the folder from the same `write` the run's exports use, and the tokenizer from the run
directory (`tokenizer/`, which the driver writes at the start of every run; runs made before it: `hf/`).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from raysmol import storage
from raysmol.config import Config, build_section
from raysmol.train import checkpoint as ckpt

TOKENIZER_DIR = "tokenizer"  # <run_dir>/tokenizer/: the run's tokenizer files, where every node can read them
EXPORTS_DIR = "exports"
# What save_pretrained writes for the model; every other file of a model folder belongs to the tokenizer.
MODEL_FILES = ("config.json", "generation_config.json")
WEIGHT_PREFIXES = ("model.safetensors", "model-", "pytorch_model")


class ExportError(ValueError):
    """A path that is not an exportable checkpoint, or a run without what an export needs; names the path."""


def export_dir(run_dir: str, step: int) -> str:
    """<run_dir>/exports/step_<step, 8 digits>: where the run's exports and `raysmol export` write."""
    return storage.join(run_dir, EXPORTS_DIR, f"step_{step:08d}")


def step_of_export(name: str) -> int | None:
    """step_00000120 -> 120; anything else -> None."""
    head, _, num = name.partition("_")
    return int(num) if head == "step" and num.isdigit() else None


def exports(run_dir: str) -> list[tuple[int, str]]:
    """(step, folder) of every export under <run_dir>/exports/, oldest first."""
    root = storage.join(run_dir, EXPORTS_DIR)
    if not storage.exists(root):
        return []
    found = [(step_of_export(n), storage.join(root, n)) for n in storage.listdir(root)]
    return sorted((s, uri) for s, uri in found if s is not None)


def tokenizer_files(folder: str) -> list[str]:
    """The tokenizer's files in a tokenizer folder or a model folder (local or object storage)."""
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(folder)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.File
                  and not i.base_name.startswith(("_", ".")) and i.base_name not in MODEL_FILES
                  and not i.base_name.startswith(WEIGHT_PREFIXES))


def copy_tokenizer(src: str, dest: str) -> list[str]:
    """Copy the tokenizer files of `src` into `dest` (both local or object storage); returns their names."""
    names = tokenizer_files(src)
    for n in names:
        storage.write_bytes(storage.join(dest, n), storage.read_bytes(storage.join(src, n)))
    return names


def write(model, state_dict: dict[str, torch.Tensor], dest: str, tokenizer: str | None = None) -> None:
    """A Hugging Face folder at `dest` (local or object storage): `state_dict` saved with `model`'s config, and
    the tokenizer files of the folder `tokenizer` when given. The run's exports and `raysmol export` both write
    through here, so the two give the same files."""
    with tempfile.TemporaryDirectory(prefix="raysmol-hf-") as d:
        ckpt.export_hf(model, state_dict, Path(d))
        if tokenizer is not None:
            copy_tokenizer(tokenizer, d)
        storage.upload_dir(d, dest)


# ---------------------------------------------------------------- raysmol export


def run_of(checkpoint_uri: str) -> str | None:
    """<run>/checkpoints/checkpoint_<step> -> <run>; None for a folder outside a run's checkpoints/."""
    parts = checkpoint_uri.rstrip("/").rsplit("/", 2)
    if len(parts) == 3 and parts[1] == "checkpoints" and ckpt.step_of(parts[2]) is not None:
        return parts[0]
    return None


def export_checkpoint(checkpoint: str, out: str | None = None) -> str:
    """Write checkpoint folder `checkpoint` as a Hugging Face folder at `out` (default: the run's
    exports/step_<step>/); returns where it went."""
    uri = (checkpoint if storage.is_remote(checkpoint) else os.path.abspath(os.path.expanduser(checkpoint))).rstrip("/")
    _check_is_checkpoint(uri)
    run = run_of(uri)
    with tempfile.TemporaryDirectory(prefix="raysmol-export-") as tmp:
        folder = ckpt.fetch(uri, Path(tmp))
        try:
            state = ckpt.verify(folder)
        except ckpt.CheckpointError as e:
            raise ExportError(f"{e}: a torn or damaged checkpoint is never exported; take an older one "
                              f"(the folders beside it)") from e
        step = state["step"]
        dest = out or (export_dir(run, step) if run else None)
        if dest is None:
            raise ExportError(f"{uri} is not inside a run directory (<run>/checkpoints/checkpoint_<step>): "
                              "give --out DIR")
        cfg = run_config(state, run, uri)
        tokenizer = _tokenizer_source(run, cfg, uri)
        from raysmol.model import precision

        sd = ckpt.consolidated_state_dict(folder, state.get("zero_stage", cfg.train.zero_stage),
                                          torch.bfloat16 if precision(cfg) == "bf16" else None)
        model = _model(cfg, run, tokenizer)
        _load(model, sd, uri)
        write(model, model.state_dict(), dest, tokenizer)
    return dest


def run_config(state: dict[str, Any], run: str | None, where: str) -> Config:
    """The config the checkpoint was trained with: state.json's own `config`, else the run's config.yaml. Not
    validated again (the run did; files it names, such as an eval suite, need not exist here)."""
    import yaml

    if isinstance(state.get("config"), dict):
        raw, origin = state["config"], f"{where}/{ckpt.STATE_FILE}"
    elif run is not None and storage.exists(storage.join(run, "config.yaml")):
        origin = storage.join(run, "config.yaml")
        raw = yaml.safe_load(storage.read_text(origin)) or {}
    else:
        raise ExportError(f"{where}: neither its {ckpt.STATE_FILE} nor a run directory's config.yaml two levels up "
                          "holds the run's config, which the model is built from")
    cfg = build_section(Config, raw, "", origin, set())
    cfg.origin = origin
    return cfg


def _check_is_checkpoint(uri: str) -> None:
    if not storage.exists(uri):
        raise ExportError(f"checkpoint {uri!r} does not exist")
    if storage.exists(storage.join(uri, ckpt.STATE_FILE)) or storage.exists(storage.join(uri, ckpt.DS_TAG)):
        return
    hint = ""
    found = ckpt.candidates(storage.join(uri, "checkpoints"))
    if found:
        hint = f"; it is a run directory: give one of its checkpoints, e.g. the newest, {found[0][1]}"
    raise ExportError(f"{uri!r} is not a raysmol checkpoint (a <run>/checkpoints/checkpoint_<step>/ folder holding "
                      f"{ckpt.DS_TAG}/ and {ckpt.STATE_FILE}){hint}")


def _tokenizer_source(run: str | None, cfg: Config, where: str) -> str:
    """The folder whose tokenizer files go with the export: the run's tokenizer/, its hf/ (runs older than
    tokenizer/), else the config's own tokenizer (pretraining: post-training's has a chat template added)."""
    looked = []
    if run is not None:
        for sub in (TOKENIZER_DIR, "hf"):
            d = storage.join(run, sub)
            looked.append(d)
            if storage.exists(d) and tokenizer_files(d):
                return d
    if cfg.post_training() is None:
        from raysmol.data.tokenizer import tokenizer_for

        return str(tokenizer_for(cfg).hf_dir)
    raise ExportError(f"{where}: no tokenizer for the export: none in {' or '.join(looked) or 'a run directory'}, "
                      f"and a {cfg.post_training()} run's tokenizer (a chat template added) is not rebuilt here")


def _model(cfg: Config, run: str | None, tokenizer: str) -> torch.nn.Module:
    """The model the run trained, freshly built (its weights are replaced): pretraining from the config's model
    section; post-training with the base's own config, as the run's export keeps it (the run's hf/ when there
    is one, else `<verb>.init_from`)."""
    import transformers

    from raysmol.model import build_model

    mode = cfg.post_training()
    if mode is None:
        return build_model(cfg, transformers.AutoTokenizer.from_pretrained(_local(tokenizer)).eos_token_id)
    init_from = getattr(cfg, mode).init_from
    sources = ([storage.join(run, "hf")] if run else []) + [init_from, storage.join(init_from, "hf")]
    src = next((s for s in sources if storage.exists(storage.join(s, "config.json"))), None)
    if src is None:
        raise ExportError(f"no config.json in {' or '.join(sources)}: the {mode} run's model config comes from "
                          f"its base ({mode}.init_from={init_from!r})")
    from raysmol.model import attn_implementation

    c = transformers.AutoConfig.for_model(**json.loads(storage.read_text(storage.join(src, "config.json"))))
    c._attn_implementation = attn_implementation(cfg)
    c.use_cache = False
    return transformers.AutoModelForCausalLM.from_config(c, dtype=torch.float32)


def _local(folder: str) -> str:
    return str(storage.local_copy(folder, "tokenizer_config.json")) if storage.is_remote(folder) else folder


def _load(model: torch.nn.Module, sd: dict[str, torch.Tensor], where: str) -> None:
    """Load `sd` into `model`: every parameter must come from the checkpoint but tied ones (lm_head when the
    embeddings are tied), and nothing else."""
    missing, unexpected = model.load_state_dict(sd, strict=False)
    own = model.state_dict()
    loaded = {own[k].data_ptr() for k in own if k not in missing}
    untied = [k for k in missing if own[k].data_ptr() not in loaded]
    if untied or unexpected:
        raise ExportError(f"{where}: the checkpoint's weights do not fit the run's model: missing {untied}, "
                          f"unexpected {list(unexpected)}")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help="a training checkpoint (any ZeRO stage and world size, local or s3://) as a "
                                      "Hugging Face folder; no GPU needed")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="<run dir>/checkpoints/checkpoint_<step>")
    p.add_argument("--out", default=None, help="output folder (default: <run dir>/exports/step_<step>)")
    p.set_defaults(fn=main)
    return p


def main(args) -> int:
    print(export_checkpoint(args.checkpoint, args.out))
    return 0
