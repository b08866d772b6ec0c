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

Budgets: a source is prepared up to a token budget (`token_budgets`: derived from the run's stages, a source's
`max_tokens`, or the whole source), not necessarily whole. What is prepared is always a prefix of the item list,
and the granularity is one work item: the prefix is the shortest one whose training tokens reach the budget, so
it holds at most one item's tokens more. Items are tokenized in rounds, each sized from the tokens per byte (or
per row group) seen so far; items a round tokenized past the budget are dropped. The budget is not part of the
folder's hash: the manifest records how many items are prepared, and a larger budget tokenizes only the items
after that prefix and appends their shards (the earlier shards, and so the stream read from them, are left as
they are). The split manifests are written before the source manifest, and readers trust the source manifest's
item count, so a crash in the middle of an extension leaves the previous preparation intact and usable.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import logging
import math
import os
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from raysmol import nodes, storage
from raysmol.config import Config, SourceConfig
from raysmol.data.store import MAX_BLOCK

log = logging.getLogger(__name__)

PREPARE_VERSION = 2  # 2: sources prepared up to a budget, as a prefix of the work items that can be extended
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
    tokenized: tuple[int, ...] = ()  # the work items this call tokenized (empty: all came from the cache)
    budget: int | None = None  # this call's budget in training tokens (None: the whole source)

    def split_dir(self, split: str) -> Path:
        """A local folder holding the split (object-store folders are copied to a node-local cache once per
        prepared prefix)."""
        return local_copy(storage.join(self.uri, split), self.manifest["items"]["prepared"])

    def describe(self) -> str:
        """One line for logs and the CLI: budget, tokens prepared, whether the whole source was read."""
        m = self.manifest
        sp, it = m["splits"], m["items"]
        budget = "whole source" if self.budget is None else f"budget {self.budget:,} tokens"
        read = "whole source read" if m["complete"] else f"{it['prepared']}/{it['total']} items read"
        return (f"{self.name}: {budget}; {sp['train']['docs']:,} docs, {sp['train']['tokens']:,} tokens "
                f"(+{sp['val']['tokens']:,} validation), {read}, skipped {m['skipped']} -> {self.uri}")


# ---------------------------------------------------------------- locating files


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    return storage.filesystem(uri)


def _source_fs(prefix: str, path: str) -> tuple[pafs.FileSystem, str]:
    """Filesystem and path of one file of a source (`prefix` is its scheme, e.g. "s3://"; "" for local)."""
    return _filesystem(prefix + path) if prefix else (pafs.LocalFileSystem(), path)


def resolve_files(src: SourceConfig, cache_dir: str) -> tuple[list[str], str, str]:
    """(files, format, filesystem URI prefix) of a source; a missing or empty path is a DataError."""
    if src.path.startswith("builtin:"):
        from raysmol.data.corpus import DONE_MARKER, build_default_corpus

        which = src.path.split(":", 1)[1]
        remote = storage.is_remote(cache_dir)
        corpus = build_default_corpus(os.path.expanduser("~/.cache/raysmol") if remote else os.path.expanduser(cache_dir))
        if which not in corpus:
            raise DataError(f"source {src.name!r}: unknown built-in corpus {src.path!r}; valid: "
                            + ", ".join(f"builtin:{k}" for k in corpus))
        if not remote:
            return [str(corpus[which])], "jsonl", ""
        # The corpus is generated on the driver's disk; the tokenize tasks may run on any node, so with the cache
        # on object storage the corpus goes there too (once: a few MB) and is read by URI like any other source.
        folder = corpus[which].parent
        uri = storage.join(cache_dir, "corpus", folder.name)
        if not storage.exists(storage.join(uri, DONE_MARKER)):
            for f in sorted(folder.iterdir()):
                if f.name != DONE_MARKER and not f.name.startswith("."):
                    storage.upload_file(f, storage.join(uri, f.name))
            storage.upload_file(folder / DONE_MARKER, storage.join(uri, DONE_MARKER))  # last: marks completion
        fs, path = _filesystem(storage.join(uri, corpus[which].name))
        return [path], "jsonl", uri.split("://", 1)[0] + "://"
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


# ---------------------------------------------------------------- budgets


def token_budgets(cfg: Config) -> list[int | None]:
    """Training-split tokens to prepare for each data.sources entry; None = the whole source.

    A source's max_tokens wins; otherwise data.budget "all" is the whole source and "run" is what this run reads
    from the source: over the stages, (end - start) steps x train.global_batch_tokens x the source's normalised
    weight, times 1 + data.budget_margin (at least 1 token, so a source at weight 0 still has a stream), plus one
    shuffle block where reads go through fixed-size blocks."""
    plan = cfg.data.stage_plan(cfg.train) if cfg.data.budget == "run" else []
    out: list[int | None] = []
    for i, src in enumerate(cfg.data.sources):
        if src.max_tokens is not None:
            out.append(src.max_tokens)
        elif cfg.data.budget == "all":
            out.append(None)
        else:
            need = sum((st.end - st.start) * cfg.train.global_batch_tokens * st.weights[i] for st in plan)
            budget = need * (1 + cfg.data.budget_margin)
            block = MAX_BLOCK * cfg.train.seq_len
            if cfg.data.shuffle and budget >= block:
                # Shuffled reads of a source this long go through fixed blocks of MAX_BLOCK windows in random
                # order (data/store.py): the block being read must lie wholly inside what is prepared.
                budget += block
            out.append(max(1, math.ceil(budget)))
    return out


def _covers(manifest: dict[str, Any], budget: int | None) -> bool:
    return manifest["complete"] or (budget is not None and manifest["splits"]["train"]["tokens"] >= budget)


def prefix_manifest(split_manifest: dict[str, Any], items: int) -> dict[str, Any]:
    """A split manifest cut back to the shards of the first `items` work items."""
    shards = [s for s in split_manifest["shards"] if s["item"] < items]
    return {**split_manifest, "items": items, "docs": sum(s["docs"] for s in shards),
            "tokens": sum(s["num_tokens"] for s in shards), "shards": shards}


def _load_manifest(uri: str) -> dict[str, Any] | None:
    """The source manifest of a prepared folder (None: nothing prepared), with its split manifests made to agree.

    The split manifests of an extension are written before the source manifest, so a crash in between leaves
    split manifests listing more items than the source manifest: they are cut back to its prefix (the extra
    shards are complete but unread; the next extension writes the same bytes again)."""
    manifest_uri = storage.join(uri, "manifest.json")
    if not storage.exists(manifest_uri):
        return None
    manifest = json.loads(storage.read_text(manifest_uri))
    n = manifest["items"]["prepared"]
    for split in ("train", "val"):
        split_uri = storage.join(uri, split, "manifest.json")
        data = json.loads(storage.read_text(split_uri))
        if data["items"] < n:
            raise DataError(f"{split_uri} lists {data['items']} work items but {manifest_uri} lists {n}: two "
                            f"preparations of source {manifest['source']!r} overlapped; delete {uri} and prepare again")
        if data["items"] > n:
            log.warning("source %s: an extension of %s did not finish; keeping its first %d work items",
                        manifest["source"], uri, n)
            storage.write_text(split_uri, json.dumps(prefix_manifest(data, n)))
    return manifest


# ---------------------------------------------------------------- the driver


def prepare(cfg: Config, tokenizer, *, show_progress: bool = True) -> list[PreparedSource]:
    """Prepare every source of `cfg` up to its budget (`token_budgets`), all in one Ray Data pipeline per round
    (start-up is paid once per round and small sources do not leave CPUs idle); returns every source, in config
    order. A source already prepared up to its budget costs nothing; one prepared to a smaller budget is
    extended."""
    cache = cfg.data.cache_dir if storage.is_remote(cfg.data.cache_dir) else os.path.expanduser(cfg.data.cache_dir)
    budgets = token_budgets(cfg)
    done: dict[int, PreparedSource] = {}
    pending = []
    for i, src in enumerate(cfg.data.sources):
        files, fmt, prefix = resolve_files(src, cfg.data.cache_dir)
        key = _fingerprint(src, files, fmt, prefix, tokenizer.identity, cfg.data.val_fraction)
        uri = storage.join(cache, "prepared", f"{src.name}-{key}")
        manifest = _load_manifest(uri)
        if manifest is not None and _covers(manifest, budgets[i]):
            done[i] = PreparedSource(src.name, uri, manifest, budget=budgets[i])
        else:
            pending.append(_Job(i, src, files, fmt, prefix, uri, budgets[i], manifest))
    if pending:
        done.update(_run(pending, cfg, tokenizer, show_progress))
    for i in sorted(done):
        s = done[i]
        log.info("%s%s", s.describe(), f" ({len(s.tokenized)} work items tokenized now)" if s.tokenized else
                 " (already prepared)")
    return [done[i] for i in range(len(cfg.data.sources))]


def item_bytes(total_bytes: int, cpus: int) -> int:
    """Byte-range size: _ITEM_BYTES, or smaller (down to _MIN_ITEM_BYTES) so that every CPU gets a few items."""
    return min(_ITEM_BYTES, max(_MIN_ITEM_BYTES, total_bytes // max(1, _ITEMS_PER_CPU * cpus)))


@dataclass
class _Job:
    """One source that `_run` prepares or extends: its items, the prefix prepared before, the rows tokenized now."""

    index: int
    src: SourceConfig
    files: list[str]
    fmt: str
    prefix: str
    uri: str
    budget: int | None
    manifest: dict[str, Any] | None  # the preparation being extended (None: nothing prepared yet)
    items: list[dict[str, Any]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)  # counts of the items tokenized now, in item order

    @property
    def start(self) -> int:
        return self.manifest["items"]["prepared"] if self.manifest else 0

    def tokens(self) -> int:
        """Training tokens of the prepared prefix and of the items tokenized so far."""
        before = self.manifest["splits"]["train"]["tokens"] if self.manifest else 0
        return before + sum(r["train_tokens"] for r in self.rows)

    def _size(self, item: dict[str, Any]) -> int:
        return 1 if self.fmt == "parquet" else item["end"] - item["start"]  # a row group's rows: unknown, count 1

    def next_round(self, wave: int) -> list[dict[str, Any]]:
        """The items to tokenize next: none once the budget is reached or the items run out; else as many as the
        tokens per byte (row group) seen so far say reach the budget, plus a tenth so that a third round is
        rare. Before any estimate: a byte range holds at most about as many tokens as bytes, so the
        items covering `budget` bytes are needed anyway; and at least `wave` items (this source's share of one wave
        of work: a wave costs no more wall time than one item, a round more costs a pipeline start-up)."""
        have, nxt = self.tokens(), self.start + len(self.rows)
        left = self.items[nxt:]
        if not left or (self.budget is not None and have >= self.budget):
            return []
        if self.budget is None:
            return left
        need = self.budget - have
        seen = sum(self._size(it) for it in self.items[:nxt])
        if have > 0:
            target, floor = need / (have / max(seen, 1)) * 1.1, 1
        else:
            target, floor = (0 if self.fmt == "parquet" else need), wave
        n, acc = 0, 0
        while n < len(left) and acc < target:
            acc += self._size(left[n])
            n += 1
        return left[: max(n, floor)]


def _run(pending: list[_Job], cfg: Config, tokenizer, show_progress: bool) -> dict[int, PreparedSource]:
    import ray

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    fresh = sum(_total_bytes(j.files, j.prefix) for j in pending if j.manifest is None and j.fmt != "parquet")
    size = item_bytes(fresh, cpus)
    sizes, sources = {}, {}
    for j in pending:
        # An extension keeps the item size its prefix was cut with: the prefix must stay a prefix of the list.
        sizes[j.index] = j.manifest["inputs"]["item_bytes"] if j.manifest else size
        j.items = [{**it, "source": j.index} for it in work_items(j.files, j.fmt, j.prefix, sizes[j.index])]
        sources[j.index] = {"fmt": j.fmt, "text_field": j.src.text_field, "prefix": j.prefix, "out_uri": j.uri}
    setup = {"identity": tokenizer.identity, "tokenizer_json": tokenizer.json_path.read_text(),
             "eos_id": tokenizer.eos_id, "val_fraction": cfg.data.val_fraction, "sources": sources,
             "dtype": "uint16" if tokenizer.vocab_size <= 2**16 else "uint32"}
    ray.data.DataContext.get_current().enable_progress_bars = show_progress
    # Local inputs or a local cache that another node does not see (its own disk): tokenize on the driver's node.
    local = [f for j in pending if not j.prefix for f in j.files]
    if not storage.is_remote(cfg.data.cache_dir):
        os.makedirs(os.path.expanduser(cfg.data.cache_dir), exist_ok=True)
        local.append(cfg.data.cache_dir)
    where = nodes.driver_pin() if nodes.unseen(local) else {"num_cpus": 1}
    share = max(1, cpus // len(pending))  # the first round of all sources together is one wave
    while True:
        todo = {j.index: j.next_round(share) for j in pending}
        batch = [it for items in todo.values() for it in items]
        if not batch:
            break
        log.info("tokenizing %s", ", ".join(f"{j.src.name}: items {todo[j.index][0]['index']}-"
                                           f"{todo[j.index][-1]['index']} of {len(j.items)}"
                                           for j in pending if todo[j.index]))
        rows = (ray.data.from_items(batch, override_num_blocks=len(batch))
                .map_batches(_tokenize_batch, batch_size=1, fn_kwargs={"setup": setup}, **where)
                .take_all())
        for j in pending:
            j.rows += sorted((r for r in rows if r["source"] == j.index), key=lambda r: r["index"])  # stream order
    out = {}
    for j in pending:
        # The shortest prefix that reaches the budget: items a round tokenized past it are dropped.
        kept, have = [], j.tokens() - sum(r["train_tokens"] for r in j.rows)
        for r in j.rows:
            if j.budget is not None and have >= j.budget:
                break
            kept.append(r)
            have += r["train_tokens"]
        for r in j.rows[len(kept):]:
            for split in ("train", "val"):
                for kind in ("tokens", "lens"):
                    storage.remove_tree(storage.join(j.uri, split, f"{r['index']:06d}.{kind}.npy"))
        manifest = _write_manifests(j, kept, tokenizer, setup["dtype"], sizes[j.index])
        if manifest["splits"]["train"]["tokens"] == 0:
            raise DataError(f"source {j.src.name!r}: no text in {j.src.path!r} ({manifest['skipped']}); "
                            f"check the path, the format ({j.fmt}) and the text field ({j.src.text_field!r})")
        out[j.index] = PreparedSource(j.src.name, j.uri, manifest, tuple(r["index"] for r in j.rows), j.budget)
    return out


def _total_bytes(files: list[str], prefix: str) -> int:
    fs, _ = _source_fs(prefix, files[0])
    return sum(i.size or 0 for i in fs.get_file_info(files))


def _write_manifests(job: _Job, rows: list[dict], tokenizer, dtype: str, item_size: int) -> dict:
    """Append the shards of `rows` (the items after the job's prefix) to the split manifests, then write the
    source manifest: last, since it marks completion and its item count is what readers trust."""
    uri, src, old = job.uri, job.src, job.manifest
    n = job.start + len(rows)
    splits = {}
    for split in ("train", "val"):
        split_uri = storage.join(uri, split, "manifest.json")
        shards = json.loads(storage.read_text(split_uri))["shards"] if old else []  # already cut to the prefix
        shards += [{"item": r["index"], "tokens": f"{r['index']:06d}.tokens.npy", "lens": f"{r['index']:06d}.lens.npy",
                    "docs": r[f"{split}_docs"], "num_tokens": r[f"{split}_tokens"]} for r in rows if r[f"{split}_docs"]]
        summary = {"docs": sum(s["docs"] for s in shards), "tokens": sum(s["num_tokens"] for s in shards)}
        storage.write_text(split_uri, json.dumps({**summary, "dtype": dtype, "items": n, "shards": shards}))
        splits[split] = summary
    manifest = {
        "version": PREPARE_VERSION,
        "source": src.name,
        "inputs": {"path": src.path, "files": job.files, "format": job.fmt, "text_field": src.text_field,
                   "item_bytes": item_size},
        "tokenizer": {"spec": tokenizer.spec, "identity": tokenizer.identity, "eos_id": tokenizer.eos_id,
                      "vocab_size": tokenizer.vocab_size},
        "items": {"prepared": n, "total": len(job.items)},
        "budget": job.budget,  # the budget this prefix was prepared for (None: the whole source)
        "complete": n == len(job.items),
        "splits": splits,
        "skipped": {k: (old["skipped"][k] if old else 0) + sum(r[k] for r in rows)
                    for k in ("empty", "invalid_utf8", "invalid_json")},
    }
    if splits["train"]["tokens"]:
        storage.write_text(storage.join(uri, "manifest.json"), json.dumps(manifest, indent=1))  # last: marks completion
    return manifest


def local_copy(uri: str, items: int) -> Path:
    """A local folder holding the split at `uri` as its first `items` work items make it. Object-store folders are
    downloaded once per node and prepared prefix: an extension appends shards, so a copy of a shorter prefix is
    stale, and one taken during an extension may list items the caller's manifest does not (they are cut off)."""
    if not storage.is_remote(uri):
        return Path(uri)
    name = hashlib.sha256(uri.encode()).hexdigest()[:16]
    dest = Path(os.path.expanduser("~/.cache/raysmol/remote")) / f"{name}-{items}"
    if not (dest / "manifest.json").exists():
        tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
        storage.download_dir(uri, tmp)
        split_manifest = tmp / "manifest.json"
        split_manifest.write_text(json.dumps(prefix_manifest(json.loads(split_manifest.read_text()), items)))
        os.replace(tmp, dest) if not dest.exists() else shutil.rmtree(tmp)
    return dest
