"""`raysmol prepare`: Ray Data reads, cleans, tokenizes and writes token shards, content-addressed.

Each source is cut into work items (byte ranges of jsonl/text files, row groups of parquet files) so that
even one large file spreads over the cluster. One Ray Data pipeline streams the items of every source that
needs preparing through tokenizer tasks (start-up is paid once; small sources leave no CPU idle); each task
reads its item straight from storage, drops empty documents and invalid lines (counted, never
fatal), tokenizes, appends EOS, routes a content-hashed share of documents to the validation split and writes
its shard straight back to storage, so tokens never pass through the driver. The driver only collects the
per-item counts, sorts them into item order (the stream order) and writes the manifests; `manifest.json` at the source root is written last
and marks the preparation complete.

The output folder is `<cache_dir>/prepared/<source>-<hash of inputs>/`, the hash covering the files
(path, size, mtime), the reading options, the tokenizer identity and this module's version: preparing again
with the same inputs finds the manifest and does nothing.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from raysmol import storage
from raysmol.config import Config, SourceConfig

log = logging.getLogger(__name__)

PREPARE_VERSION = 1
_EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".txt": "text", ".md": "text"}
_ITEM_BYTES = 4 << 20  # the largest work item (bytes of jsonl/text)
_MIN_ITEM_BYTES = 1 << 20
_ITEMS_PER_CPU = 8


class DataError(ValueError):
    """A data source cannot be read or holds nothing; the message names the source and the path."""


@dataclass
class PreparedSource:
    name: str
    uri: str  # the content-addressed folder (local path or object-store URI)
    manifest: dict[str, Any]

    def split_dir(self, split: str) -> Path:
        """A local folder holding the split (object-store folders are copied to a node-local cache once)."""
        return local_copy(storage.join(self.uri, split))


# ---------------------------------------------------------------- locating files


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    return storage.filesystem(uri)


def _source_fs(prefix: str, path: str) -> tuple[pafs.FileSystem, str]:
    """Filesystem and path of one file of a source (`prefix` is its scheme, e.g. "s3://"; "" for local)."""
    return _filesystem(prefix + path) if prefix else (pafs.LocalFileSystem(), path)


def resolve_files(src: SourceConfig, cache_dir: str) -> tuple[list[str], str, str]:
    """(files, format, filesystem URI prefix) of a source; a missing or empty path is a DataError."""
    if src.path.startswith("builtin:"):
        from raysmol.data.corpus import build_default_corpus

        which = src.path.split(":", 1)[1]
        corpus = build_default_corpus(os.path.expanduser(cache_dir) if not storage.is_remote(cache_dir) else
                                      os.path.expanduser("~/.cache/raysmol"))
        if which not in corpus:
            raise DataError(f"source {src.name!r}: unknown built-in corpus {src.path!r}; valid: "
                            + ", ".join(f"builtin:{k}" for k in corpus))
        return [str(corpus[which])], "jsonl", ""
    path = src.path if (storage.is_remote(src.path) or src.path.startswith("hf://")) else os.path.expanduser(src.path)
    prefix = path.split("://", 1)[0] + "://" if "://" in path else ""
    try:
        fs, base = _filesystem(path)
        files = _list_files(fs, base)
    except (OSError, ValueError) as e:
        raise DataError(f"source {src.name!r}: cannot read {src.path!r}: {e}") from e
    if not files:
        raise DataError(f"source {src.name!r}: no data files at {src.path!r} "
                        f"(expected a file, folder or glob of {', '.join(sorted(_EXTENSIONS))} files)")
    fmt = src.format
    if fmt == "auto":
        kinds = {_EXTENSIONS.get(Path(f).suffix) for f in files}
        if None in kinds or len(kinds) != 1:
            raise DataError(f"source {src.name!r}: cannot infer the format of {src.path!r} from file names "
                            f"({sorted(set(Path(f).suffix for f in files))}); set format: jsonl, parquet or text")
        fmt = kinds.pop()
    return files, fmt, prefix


def _list_files(fs: pafs.FileSystem, base: str) -> list[str]:
    if any(c in base for c in "*?["):
        root = base[: min(base.index(c) for c in "*?[" if c in base)].rsplit("/", 1)[0]
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        return sorted(i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, base))
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{base} does not exist")
    if info.type == pafs.FileType.File:
        return [base]
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and Path(i.path).suffix in _EXTENSIONS)


# ---------------------------------------------------------------- work items


def work_items(files: list[str], fmt: str, prefix: str, size: int | None = None) -> list[dict[str, Any]]:
    """Byte ranges of `size` bytes (jsonl, text; default _ITEM_BYTES) or row groups (parquet), in a fixed order."""
    size = size or _ITEM_BYTES
    fs, _ = _source_fs(prefix, files[0])
    items: list[dict[str, Any]] = []
    for f in files:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            with fs.open_input_file(f) as fh:
                n = pq.ParquetFile(fh).num_row_groups
            items += [{"file": f, "start": g, "end": g + 1} for g in range(n)]
        else:
            n = fs.get_file_info(f).size
            items += [{"file": f, "start": s, "end": min(s + size, n)} for s in range(0, max(n, 1), size)]
    for i, it in enumerate(items):
        it["index"] = i
    return items


def _fingerprint(src: SourceConfig, files: list[str], fmt: str, prefix: str, tokenizer_id: str, val_fraction: float) -> str:
    fs, _ = _source_fs(prefix, files[0])
    stats = [(f, i.size, i.mtime_ns) for f, i in zip(files, fs.get_file_info(files))]
    key = json.dumps([PREPARE_VERSION, src.path, fmt, src.text_field, stats, tokenizer_id, val_fraction], default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- the per-item work (runs in Ray Data actors)


def read_documents(fs: pafs.FileSystem, item: dict[str, Any], fmt: str, text_field: str) -> tuple[list[str], dict[str, int]]:
    """The documents of one work item, and counts of what was skipped."""
    skipped = {"empty": 0, "invalid_utf8": 0, "invalid_json": 0}
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with fs.open_input_file(item["file"]) as fh:
            col = pq.ParquetFile(fh).read_row_group(item["start"], columns=[text_field]).column(0).to_pylist()
        docs = []
        for t in col:
            if not isinstance(t, str) or not t.strip():
                skipped["empty"] += 1
            else:
                docs.append(t)
        return docs, skipped
    docs = []
    for raw in _lines(fs, item):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            skipped["invalid_utf8"] += 1
            continue
        if fmt == "jsonl":
            if not line.strip():
                continue  # blank separator lines are not documents
            try:
                text = json.loads(line).get(text_field)
            except (json.JSONDecodeError, AttributeError):
                skipped["invalid_json"] += 1
                continue
        else:
            text = line
        if not isinstance(text, str) or not text.strip():
            skipped["empty"] += 1
        else:
            docs.append(text)
    return docs, skipped


def _lines(fs: pafs.FileSystem, item: dict[str, Any]) -> list[bytes]:
    """Lines whose first byte lies in [start, end): each line belongs to exactly one byte range."""
    start, end = item["start"], item["end"]
    with fs.open_input_file(item["file"]) as fh:
        size = fh.size()
        lo = max(start - 1, 0)
        fh.seek(lo)
        data = fh.read(end - lo)
        while not data.endswith(b"\n") and fh.tell() < size:
            more = fh.read(1 << 16)
            cut = more.find(b"\n")
            data += more if cut < 0 else more[: cut + 1]
            if cut >= 0:
                break
    if start > 0:
        # The previous range owns the line that straddles `start` (unless `start` begins a line).
        nl = data.find(b"\n")
        data = data[nl + 1 :] if nl >= 0 else b""
    return data.splitlines()


_TOKENIZERS: dict[str, Any] = {}  # per worker process: Ray reuses workers, so each parses a tokenizer once


def _tokenize_batch(batch: dict[str, np.ndarray], setup: dict[str, Any]) -> dict[str, list]:
    """Ray Data task body: each row is a work item; returns one row of counts per item."""
    # One task per CPU: the tokenizer's own thread pool would fight the other tasks for the same cores.
    # tokenizers reads this at every batch call, so setting it here is enough (a runtime_env would make Ray
    # start dedicated worker processes instead of reusing idle ones, ~1 s each).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = _TOKENIZERS.get(setup["identity"])
    if tok is None:
        from tokenizers import Tokenizer

        tok = _TOKENIZERS[setup["identity"]] = Tokenizer.from_str(setup["tokenizer_json"])
    rows: dict[str, list] = {}
    for i in range(len(batch["index"])):
        item = {k: (v[i].item() if hasattr(v[i], "item") else v[i]) for k, v in batch.items()}
        for k, v in tokenize_item(tok, item, setup).items():
            rows.setdefault(k, []).append(v)
    return rows


def tokenize_item(tok, item: dict[str, Any], setup: dict[str, Any]) -> dict[str, int]:
    """One work item in, one train shard and one validation shard out (plus counts)."""
    src = setup["sources"][item["source"]]
    fs, path = _source_fs(src["prefix"], item["file"])
    docs, skipped = read_documents(fs, {**item, "file": path}, src["fmt"], src["text_field"])
    encoded = tok.encode_batch_fast(docs, add_special_tokens=False) if docs else []
    val_cut = int(setup["val_fraction"] * 2**32)
    splits: dict[str, tuple[list[int], list[int]]] = {"train": ([], []), "val": ([], [])}
    for text, enc in zip(docs, encoded):
        flat, lens = splits["val" if zlib.crc32(text.encode("utf-8")) < val_cut else "train"]
        flat.extend(enc.ids)
        flat.append(setup["eos_id"])
        lens.append(len(enc.ids) + 1)
    out = {"source": item["source"], "index": item["index"], **skipped}
    for split, (flat, lens) in splits.items():
        if lens:
            name = f"{item['index']:06d}"
            _save_npy(storage.join(src["out_uri"], split, f"{name}.tokens.npy"), np.array(flat, dtype=setup["dtype"]))
            _save_npy(storage.join(src["out_uri"], split, f"{name}.lens.npy"), np.array(lens, dtype=np.int32))
        out[f"{split}_docs"], out[f"{split}_tokens"] = len(lens), len(flat)
    return out


def _save_npy(uri: str, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, arr)
    storage.write_bytes(uri, buf.getvalue())


# ---------------------------------------------------------------- the driver


def prepare(cfg: Config, tokenizer, *, show_progress: bool = True) -> list[PreparedSource]:
    """Prepare every source of `cfg` that is not prepared yet, all in one Ray Data pipeline (start-up is paid
    once and small sources do not leave CPUs idle); returns every source, in config order."""
    cache = cfg.data.cache_dir if storage.is_remote(cfg.data.cache_dir) else os.path.expanduser(cfg.data.cache_dir)
    done: dict[int, PreparedSource] = {}
    pending = []
    for i, src in enumerate(cfg.data.sources):
        files, fmt, prefix = resolve_files(src, cfg.data.cache_dir)
        key = _fingerprint(src, files, fmt, prefix, tokenizer.identity, cfg.data.val_fraction)
        uri = storage.join(cache, "prepared", f"{src.name}-{key}")
        manifest_uri = storage.join(uri, "manifest.json")
        if storage.exists(manifest_uri):
            log.info("source %s: already prepared at %s", src.name, uri)
            done[i] = PreparedSource(src.name, uri, json.loads(storage.read_text(manifest_uri)))
        else:
            pending.append((i, src, files, fmt, prefix, uri))
    if pending:
        done.update(_run(pending, cfg, tokenizer, show_progress))
    return [done[i] for i in range(len(cfg.data.sources))]


def item_bytes(total_bytes: int, cpus: int) -> int:
    """Byte-range size: _ITEM_BYTES, or smaller (down to _MIN_ITEM_BYTES) so that every CPU gets a few items."""
    return min(_ITEM_BYTES, max(_MIN_ITEM_BYTES, total_bytes // max(1, _ITEMS_PER_CPU * cpus)))


def _run(pending: list, cfg: Config, tokenizer, show_progress: bool) -> dict[int, PreparedSource]:
    import ray

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    total = sum(_total_bytes(files, prefix) for _, _, files, fmt, prefix, _ in pending if fmt != "parquet")
    size = item_bytes(total, cpus)
    items, sources = [], {}
    for i, src, files, fmt, prefix, uri in pending:
        items += [{**it, "source": i} for it in work_items(files, fmt, prefix, size)]
        sources[i] = {"fmt": fmt, "text_field": src.text_field, "prefix": prefix, "out_uri": uri}
    setup = {"identity": tokenizer.identity, "tokenizer_json": tokenizer.json_path.read_text(),
             "eos_id": tokenizer.eos_id, "val_fraction": cfg.data.val_fraction, "sources": sources,
             "dtype": "uint16" if tokenizer.vocab_size <= 2**16 else "uint32"}
    ray.data.DataContext.get_current().enable_progress_bars = show_progress
    rows = (ray.data.from_items(items, override_num_blocks=len(items))
            .map_batches(_tokenize_batch, batch_size=1, fn_kwargs={"setup": setup}, num_cpus=1)
            .take_all())
    out = {}
    for i, src, files, fmt, _, uri in pending:
        mine = sorted((r for r in rows if r["source"] == i), key=lambda r: r["index"])  # item order = stream order
        manifest = _write_manifests(uri, src, files, fmt, tokenizer, mine, setup["dtype"])
        if manifest["splits"]["train"]["tokens"] == 0:
            raise DataError(f"source {src.name!r}: no text in {src.path!r} ({manifest['skipped']}); "
                            f"check the path, the format ({fmt}) and the text field ({src.text_field!r})")
        out[i] = PreparedSource(src.name, uri, manifest)
    return out


def _total_bytes(files: list[str], prefix: str) -> int:
    fs, _ = _source_fs(prefix, files[0])
    return sum(i.size or 0 for i in fs.get_file_info(files))


def _write_manifests(uri: str, src: SourceConfig, files: list[str], fmt: str, tokenizer, rows: list[dict], dtype: str) -> dict:
    splits = {}
    for split in ("train", "val"):
        shards = [{"tokens": f"{r['index']:06d}.tokens.npy", "lens": f"{r['index']:06d}.lens.npy",
                   "docs": r[f"{split}_docs"], "num_tokens": r[f"{split}_tokens"]} for r in rows if r[f"{split}_docs"]]
        summary = {"docs": sum(s["docs"] for s in shards), "tokens": sum(s["num_tokens"] for s in shards)}
        storage.write_text(storage.join(uri, split, "manifest.json"), json.dumps({**summary, "dtype": dtype, "shards": shards}))
        splits[split] = summary
    manifest = {
        "version": PREPARE_VERSION,
        "source": src.name,
        "inputs": {"path": src.path, "files": files, "format": fmt, "text_field": src.text_field},
        "tokenizer": {"spec": tokenizer.spec, "identity": tokenizer.identity, "eos_id": tokenizer.eos_id,
                      "vocab_size": tokenizer.vocab_size},
        "splits": splits,
        "skipped": {k: sum(r[k] for r in rows) for k in ("empty", "invalid_utf8", "invalid_json")},
    }
    if splits["train"]["tokens"]:
        storage.write_text(storage.join(uri, "manifest.json"), json.dumps(manifest, indent=1))  # last: marks completion
    return manifest


def local_copy(uri: str) -> Path:
    """A local folder with the contents of `uri`; object-store folders are downloaded once per node."""
    return storage.local_copy(uri, "manifest.json")
