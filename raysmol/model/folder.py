"""The one model resolver: a run directory, a Hugging Face folder or an object-store URI -> a local folder.

Every caller that opens a model (post-training bases and references, GRPO engines, evaluation, merging) goes
through `resolve_model`, on the node that reads it: object-store URIs are fetched into this node's cache.
"""

from __future__ import annotations

import os
from pathlib import Path

from raysmol import storage
from raysmol.config import ConfigError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class ModelFolderError(ConfigError):
    """A model path that is not a Hugging Face model folder (nor a run directory holding one); names the path."""


def resolve_model(uri: str | os.PathLike[str]) -> Path:
    """The Hugging Face model folder on this node for `uri`: itself, `<run dir>/hf`, or this node's copy of either
    on object storage."""
    folder = Path(storage.model_folder(str(uri)))
    if not folder.is_dir():
        raise ModelFolderError(f"checkpoint {str(folder)!r} does not exist "
                               "(give a save_pretrained folder or a run directory)")
    if not (folder / "config.json").is_file() and (folder / "hf" / "config.json").is_file():
        folder = folder / "hf"  # a raysmol run directory: its final export
    missing = [" or ".join(names) for names in (("config.json",), WEIGHT_FILES, TOKENIZER_FILES)
               if not any((folder / n).is_file() for n in names)]
    if missing:
        hint = (" (a DeepSpeed training checkpoint: evaluate the run's hf/ export instead)"
                if (folder / "ds").is_dir() or (folder / "state.json").is_file() else "")
        raise ModelFolderError(f"checkpoint {str(folder)!r} is not a Hugging Face model folder{hint}: it has no "
                               f"{'; no '.join(missing)}. Expected the save_pretrained output of a model and its "
                               "tokenizer, e.g. <run dir>/hf")
    return folder.resolve()
