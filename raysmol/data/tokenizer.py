"""Tokenizer resolution: turn what the user wrote (``builtin``, a local path, a hub repo id) into files.

Every spec resolves to a :class:`TokenizerInfo` holding two artefacts on disk:

* ``json_path``, a ``tokenizer.json`` that data workers in other processes (or on other nodes, when
  ``cache_dir`` is shared storage) load with the light ``tokenizers`` library;
* ``hf_dir``, a folder ``transformers.AutoTokenizer.from_pretrained`` loads offline, exported next to
  trained models so they are usable with the usual Hugging Face tooling.

``transformers`` is imported lazily: it takes seconds to import, and a cache hit on the builtin
tokenizer needs only ``tokenizers``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from raysmol.data.corpus import build_default_corpus, corpus_version

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
BUILTIN_SPEC = "builtin"
# Bump when the builtin training recipe changes, so caches trained the old way are not reused.
BUILTIN_RECIPE_VERSION = "1"
DONE_MARKER = "_DONE"

_VALID_FORMS = (
    f'"{BUILTIN_SPEC}" (a byte-level BPE trained on the embedded default corpus), '
    "a local folder containing tokenizer.json (or the path of a tokenizer.json file), "
    'or a Hugging Face hub repo id such as "HuggingFaceTB/SmolLM3-3B"'
)
# What a hub repo id looks like ("name" or "owner/name"); anything else that does not exist on disk
# is reported as a missing path instead of being sent to the hub.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
# EOS names of common tokenizer families, for a bare tokenizer.json that carries no config saying
# which of its special tokens ends a document.
_EOS_CANDIDATES = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>", "<|eot_id|>")


class TokenizerError(ValueError):
    """A tokenizer spec that cannot be resolved; the message names the spec and the valid forms."""


@dataclass(frozen=True)
class TokenizerInfo:
    spec: str  # what the user wrote
    json_path: Path  # tokenizer.json, loadable by tokenizers.Tokenizer.from_file in other processes
    hf_dir: Path  # folder loadable by transformers.AutoTokenizer.from_pretrained
    eos_id: int
    vocab_size: int  # len(tokenizer), special tokens included
    identity: str  # sha256 hex of the tokenizer.json bytes

    def load(self) -> Tokenizer:
        return Tokenizer.from_file(str(self.json_path))


def _error(spec: str, problem: str) -> TokenizerError:
    problem = problem.rstrip(". \n")  # wrapped messages often end in a period already
    return TokenizerError(f"cannot resolve tokenizer {spec!r}: {problem}. Valid specs are {_VALID_FORMS}.")


def resolve_tokenizer(
    spec: str, cache_dir: str | os.PathLike[str], *, builtin_vocab_size: int = 8192
) -> TokenizerInfo:
    """Resolve ``spec`` ("builtin", a local path or a hub repo id); raises :class:`TokenizerError`."""
    cache = Path(cache_dir) / "tokenizers"
    if spec == BUILTIN_SPEC:
        return _resolve_builtin(spec, Path(cache_dir), builtin_vocab_size)
    path = Path(spec).expanduser()
    if path.exists():
        return _resolve_local(spec, path, cache)
    if not _HUB_ID.match(spec) or spec.endswith(".json"):
        raise _error(spec, f"no such file or folder: {path}")
    return _resolve_hub(spec, cache)


# --------------------------------------------------------------------------------------------------
# Training


def _jsonl_texts(files: list[Path]) -> Iterator[str]:
    for file in files:
        with open(file, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)["text"]


def train_bpe_tokenizer(files: list[Path], vocab_size: int, out_dir: Path) -> Path:
    """Train a byte-level BPE on the "text" field of JSONL ``files``; writes ``out_dir/tokenizer.json``.

    Byte-level means any UTF-8 text round-trips exactly and there is never an unknown token.
    ``EOS_TOKEN`` is the first special token, so its id is 0.
    """
    tokenizer = Tokenizer(models.BPE())
    # No prefix space: documents are concatenated for packing, so a leading space would be invented text.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        # All 256 bytes up front, so rare bytes absent from the corpus still encode.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    start = time.perf_counter()
    tokenizer.train_from_iterator(_jsonl_texts(files), trainer=trainer)
    logger.info("trained BPE (vocab %d) in %.1fs", tokenizer.get_vocab_size(), time.perf_counter() - start)

    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "tokenizer.json"
    tmp = _temp_sibling(out)
    try:
        tokenizer.save(str(tmp))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


# --------------------------------------------------------------------------------------------------
# The three kinds of spec


def _resolve_builtin(spec: str, cache_dir: Path, vocab_size: int) -> TokenizerInfo:
    # The key is computable without building the corpus, so a cache hit touches neither the corpus
    # nor transformers.
    key_fields = {"corpus": corpus_version(), "vocab_size": vocab_size, "recipe": BUILTIN_RECIPE_VERSION}
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_dir / "tokenizers" / f"builtin-{key}"
    if not (folder / DONE_MARKER).is_file():
        _build_builtin(folder, cache_dir, vocab_size)
    else:
        logger.debug("builtin tokenizer cache hit: %s", folder)
    return _make_info(spec, folder / "tokenizer.json", folder, EOS_TOKEN)


def _build_builtin(folder: Path, cache_dir: Path, vocab_size: int) -> None:
    """Train into a private folder, then rename it into place: readers never see half a tokenizer."""
    corpus = build_default_corpus(cache_dir)
    tmp = _temp_sibling(folder)
    try:
        json_path = train_bpe_tokenizer(list(corpus.values()), vocab_size, tmp)
        # save_pretrained rewrites tokenizer.json (it adds a no-op post-processor); json_path is that
        # rewritten file, so json_path and hf_dir hold the very same bytes.
        _save_hf_folder(Tokenizer.from_file(str(json_path)), EOS_TOKEN, tmp)
        (tmp / DONE_MARKER).write_text(BUILTIN_RECIPE_VERSION)
        _rename_folder_into_place(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _resolve_local(spec: str, path: Path, cache: Path) -> TokenizerInfo:
    json_path = path / "tokenizer.json" if path.is_dir() else path
    if not json_path.is_file():
        raise _error(spec, f"folder {path} has no tokenizer.json")
    if path.is_dir() and (path / "tokenizer_config.json").is_file():
        # A complete Hugging Face folder: it already says which token is EOS.
        hf = _load_auto_tokenizer(spec, str(path))
        return _make_info(spec, json_path, path, hf.eos_token)
    return _resolve_bare_json(spec, json_path, cache)


def _resolve_bare_json(spec: str, json_path: Path, cache: Path) -> TokenizerInfo:
    """A lone tokenizer.json: guess its EOS and build the HF folder it lacks in the cache."""
    data = json_path.read_bytes()
    try:
        tokenizer = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise _error(spec, f"{json_path} is not a tokenizers-format tokenizer.json ({e})") from e
    eos = next((t for t in _EOS_CANDIDATES if tokenizer.token_to_id(t) is not None), None)
    if eos is None:
        raise _error(spec, f"{json_path} has none of the EOS tokens {list(_EOS_CANDIDATES)}")
    folder = cache / f"local-{hashlib.sha256(data).hexdigest()[:16]}"
    if not (folder / DONE_MARKER).is_file():
        tmp = _temp_sibling(folder)
        try:
            _save_hf_folder(tokenizer, eos, tmp)
            (tmp / DONE_MARKER).write_text(eos)
            _rename_folder_into_place(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return _make_info(spec, folder / "tokenizer.json", folder, eos)


def _resolve_hub(spec: str, cache: Path) -> TokenizerInfo:
    hf = _load_auto_tokenizer(spec, spec)
    folder = cache / ("hub-" + re.sub(r"[^A-Za-z0-9._-]", "--", spec))
    # Saved on every resolve, not only the first: the hub copy may have changed since.
    _save_pretrained_atomic(hf, folder)
    return _make_info(spec, folder / "tokenizer.json", folder, hf.eos_token)


# --------------------------------------------------------------------------------------------------
# Helpers


def _load_auto_tokenizer(spec: str, name_or_path: str) -> PreTrainedTokenizerBase:
    """AutoTokenizer.from_pretrained, with every failure turned into a TokenizerError naming ``spec``."""
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(name_or_path)
    # Deliberately broad: transformers and huggingface_hub raise OSError, ValueError, HTTP and
    # validation errors (and more) for an unknown repo, no network or a broken folder.
    except Exception as e:
        where = "the local folder" if Path(name_or_path).exists() else "the Hugging Face hub (or its cache)"
        raise _error(spec, f"loading it from {where} failed with {type(e).__name__}: {e}") from e
    if not getattr(hf, "is_fast", False):
        slow = type(hf).__name__
        raise _error(spec, f"it loads as the slow tokenizer {slow}; a fast one (tokenizer.json) is needed")
    if hf.eos_token is None:
        raise _error(spec, "the tokenizer has no EOS token, which is needed to separate packed documents")
    return hf


def _save_hf_folder(tokenizer: Tokenizer, eos: str, out_dir: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos, bos_token=None, pad_token=eos)
    hf.save_pretrained(str(out_dir))


def _save_pretrained_atomic(hf: PreTrainedTokenizerBase, folder: Path) -> None:
    """save_pretrained into a private folder, then os.replace each file into ``folder``.

    Per-file replacement keeps every file whole for concurrent readers even when ``folder`` already
    exists (a folder rename cannot replace a non-empty folder).
    """
    folder.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(folder)
    try:
        hf.save_pretrained(str(tmp))
        for file in sorted(tmp.iterdir()):
            os.replace(file, folder / file.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _make_info(spec: str, json_path: Path, hf_dir: Path, eos_token: str) -> TokenizerInfo:
    data = json_path.read_bytes()
    tokenizer = Tokenizer.from_str(data.decode("utf-8"))
    eos_id = tokenizer.token_to_id(eos_token)
    if eos_id is None:
        raise _error(spec, f"its EOS token {eos_token!r} is not in {json_path}")
    return TokenizerInfo(
        spec=spec,
        json_path=json_path,
        hf_dir=hf_dir,
        eos_id=eos_id,
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
        identity=hashlib.sha256(data).hexdigest(),
    )


def _temp_sibling(path: Path) -> Path:
    # Same folder as the target (so os.replace/rename stay on one file system), unique per call.
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")


def _rename_folder_into_place(tmp: Path, folder: Path) -> None:
    try:
        os.rename(tmp, folder)
    except OSError:
        # Another process renamed its identical build into place first; use that one.
        if not (folder / DONE_MARKER).is_file():
            raise
        logger.debug("%s was built concurrently by another process", folder)


def tokenizer_for(cfg) -> TokenizerInfo:
    """The run's tokenizer (`cfg.tokenizer`), cached on this machine (under data.cache_dir unless that is object
    storage)."""
    from raysmol import storage

    d = cfg.data.cache_dir
    cache = os.path.expanduser("~/.cache/raysmol") if storage.is_remote(d) else os.path.expanduser(d)
    return resolve_tokenizer(cfg.tokenizer.name, cache, builtin_vocab_size=cfg.tokenizer.vocab_size)
