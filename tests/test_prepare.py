"""Ray Data preparation: every token kept, bad lines counted, content-addressed caching, clear errors."""

from __future__ import annotations

import json
import os
import time
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support import make_docs, small_config, write_docs
from tokenizers import Tokenizer

from raysmol.data import prepare as prep
from raysmol.data.store import TokenStream
from raysmol.data.tokenizer import TokenizerError, resolve_tokenizer


@pytest.fixture
def tok(small_data, tmp_path):
    return resolve_tokenizer(str(small_data["tokenizer"]), tmp_path / "tokcache")


def config_for(tmp_path, small_data, sources, val_fraction=0.1):
    cfg = small_config(tmp_path, small_data)
    cfg.data.sources = []
    from raysmol.config import SourceConfig

    for name, path, fmt in sources:
        cfg.data.sources.append(SourceConfig(name=name, path=str(path), weight=1.0, format=fmt))
    cfg.data.cache_dir = str(tmp_path / "cache")
    cfg.data.val_fraction = val_fraction
    cfg.data.budget = "all"  # these tests check whole sources; budgets are tested in test_prepare_budget.py
    return cfg


def expected_tokens(tok, docs, val_fraction, split):
    t = Tokenizer.from_file(str(tok.json_path))
    cut = int(val_fraction * 2**32)
    out = []
    for d in docs:
        if (zlib.crc32(d.encode()) < cut) == (split == "val"):
            out += t.encode(d, add_special_tokens=False).ids + [tok.eos_id]
    return out


def stream_tokens(source, split) -> list[int]:
    s = TokenStream(source.split_dir(split))
    return s.read(0, s.total)[0].tolist()


def test_no_token_lost_or_duplicated_across_many_byte_ranges(ray_local, small_data, tok, tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "_ITEM_BYTES", 3000)  # dozens of work items over one file, cut mid-line
    docs = make_docs(11, 700, "prose")
    path = write_docs(tmp_path / "p.jsonl", docs)
    cfg = config_for(tmp_path, small_data, [("p", path, "auto")])
    (src,) = prep.prepare(cfg, tok, show_progress=False)
    assert len(prep.work_items([str(path)], "jsonl", "")) > 20
    for split in ("train", "val"):
        assert stream_tokens(src, split) == expected_tokens(tok, docs, 0.1, split)
    m = src.manifest
    assert m["splits"]["train"]["docs"] + m["splits"]["val"]["docs"] == 700
    assert 0 < m["splits"]["val"]["docs"] < 140
    assert m["tokenizer"]["identity"] == tok.identity


def test_invalid_utf8_empty_and_broken_lines_are_skipped_and_counted(ray_local, small_data, tok, tmp_path):
    good = make_docs(5, 50)
    lines = [json.dumps({"text": d}).encode() for d in good[:25]]
    lines += [b'{"text": "caf\xe9 au lait"}', json.dumps({"text": "   "}).encode(), b"", b"{not json",
              json.dumps({"other": "x"}).encode(), b'{"text": "\xff\xfe broken"}']
    lines += [json.dumps({"text": d}).encode() for d in good[25:]]
    path = tmp_path / "dirty.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    cfg = config_for(tmp_path, small_data, [("dirty", path, "jsonl")], val_fraction=0.0)
    (src,) = prep.prepare(cfg, tok, show_progress=False)
    assert src.manifest["skipped"] == {"empty": 2, "invalid_utf8": 2, "invalid_json": 1}
    assert stream_tokens(src, "train") == expected_tokens(tok, good, 0.0, "train")


def test_text_and_parquet_sources(ray_local, small_data, tok, tmp_path):
    docs = make_docs(7, 120, "code")
    flat = [d.replace("\n", " ") for d in docs]
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_text("\n".join(flat[:60]) + "\n\n")
    (tmp_path / "t" / "b.txt").write_text("\n".join(flat[60:]) + "\n")
    pq.write_table(pa.table({"text": docs, "id": list(range(120))}), tmp_path / "d.parquet", row_group_size=25)
    cfg = config_for(tmp_path, small_data, [("txt", tmp_path / "t", "auto"), ("pq", tmp_path / "d.parquet", "auto")],
                     val_fraction=0.0)
    txt, par = prep.prepare(cfg, tok, show_progress=False)
    assert stream_tokens(txt, "train") == expected_tokens(tok, flat, 0.0, "train")
    assert txt.manifest["skipped"]["empty"] == 1  # the blank line
    assert stream_tokens(par, "train") == expected_tokens(tok, docs, 0.0, "train")
    assert len(prep.work_items([str(tmp_path / "d.parquet")], "parquet", "")) == 5  # one item per row group


def test_preparing_twice_does_nothing_the_second_time(ray_local, small_data, tok, tmp_path):
    path = write_docs(tmp_path / "c.jsonl", make_docs(9, 200))
    cfg = config_for(tmp_path, small_data, [("c", path, "auto")])
    (first,) = prep.prepare(cfg, tok, show_progress=False)
    manifest = os.path.join(first.uri, "manifest.json")
    mtime = os.stat(manifest).st_mtime_ns
    t0 = time.perf_counter()
    (second,) = prep.prepare(cfg, tok, show_progress=False)
    assert time.perf_counter() - t0 < 1.0
    assert second.uri == first.uri and os.stat(manifest).st_mtime_ns == mtime
    write_docs(path, make_docs(10, 200))  # new content: a new folder
    (third,) = prep.prepare(cfg, tok, show_progress=False)
    assert third.uri != first.uri


def test_missing_path_is_an_error_naming_source_and_path(small_data, tok, tmp_path):
    cfg = config_for(tmp_path, small_data, [("web", tmp_path / "nowhere" / "*.jsonl", "auto")])
    with pytest.raises(prep.DataError, match=r"source 'web'.*nowhere"):
        prep.prepare(cfg, tok, show_progress=False)
    cfg = config_for(tmp_path, small_data, [("web2", tmp_path / "missing.jsonl", "auto")])
    with pytest.raises(prep.DataError, match=r"source 'web2': cannot read .*missing.jsonl"):
        prep.prepare(cfg, tok, show_progress=False)


def test_empty_corpus_is_an_error(ray_local, small_data, tok, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text('{"text": ""}\n{"text": "  "}\n')
    cfg = config_for(tmp_path, small_data, [("nothing", path, "auto")])
    with pytest.raises(prep.DataError, match=r"source 'nothing': no text"):
        prep.prepare(cfg, tok, show_progress=False)


def test_unknown_format_is_an_error(small_data, tok, tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    cfg = config_for(tmp_path, small_data, [("csv", tmp_path / "x.csv", "auto")])
    with pytest.raises(prep.DataError, match="cannot infer the format .*x.csv.*set format"):
        prep.prepare(cfg, tok, show_progress=False)


def test_a_tokenizer_that_cannot_be_loaded_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(TokenizerError, match="/no/such/tokenizer"):
        resolve_tokenizer("/no/such/tokenizer", tmp_path)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(TokenizerError, match="empty_dir"):
        resolve_tokenizer(str(tmp_path / "empty_dir"), tmp_path)
