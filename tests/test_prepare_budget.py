"""Budgets: preparation stops at a source's token budget, and a larger budget prepares only the difference."""

from __future__ import annotations

import json
import math
import os

import pytest
from support import make_docs, small_config, write_docs
from test_prepare import config_for, expected_tokens, stream_tokens

from raysmol import storage
from raysmol.config import StageConfig
from raysmol.data import prepare as prep
from raysmol.data.tokenizer import resolve_tokenizer


@pytest.fixture
def tok(small_data, tmp_path):
    return resolve_tokenizer(str(small_data["tokenizer"]), tmp_path / "tokcache")


def budget_config(tmp_path, small_data, path, max_tokens):
    cfg = config_for(tmp_path, small_data, [("p", path, "auto")])
    cfg.data.budget = "run"
    cfg.data.sources[0].max_tokens = max_tokens
    return cfg


def prefix_docs(path, docs, end_byte):
    """The documents whose line starts before `end_byte` (what a prefix of byte-range items holds)."""
    out, pos = [], 0
    for d, line in zip(docs, path.read_bytes().splitlines(keepends=True)):
        if pos < end_byte:
            out.append(d)
        pos += len(line)
    return out


def shard_files(src, split):
    d = src.split_dir(split)
    return {f: ((d / f).read_bytes(), os.stat(d / f).st_mtime_ns) for f in sorted(os.listdir(d)) if f.endswith(".npy")}


def test_a_budget_stops_preparation_at_the_first_work_item_that_reaches_it(ray_local, small_data, tok, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setattr(prep, "_ITEM_BYTES", 3000)  # ~50 items
    docs = make_docs(11, 700)
    path = write_docs(tmp_path / "p.jsonl", docs)
    (src,) = prep.prepare(budget_config(tmp_path, small_data, path, 6000), tok, show_progress=False)
    m, items = src.manifest, prep.work_items([str(path)], "jsonl", "", 3000)
    n = m["items"]["prepared"]
    assert 0 < n < len(items) == m["items"]["total"] and not m["complete"]
    # Granularity: the shortest prefix of items whose training tokens reach the budget.
    train = json.loads((src.split_dir("train") / "manifest.json").read_text())
    assert m["splits"]["train"]["tokens"] >= 6000 > m["splits"]["train"]["tokens"] - train["shards"][-1]["num_tokens"]
    assert train["shards"][-1]["item"] == n - 1
    # Exactly the documents of those items, in order; nothing of later items left on disk.
    kept = prefix_docs(path, docs, items[n - 1]["end"])
    for split in ("train", "val"):
        assert stream_tokens(src, split) == expected_tokens(tok, kept, 0.1, split)
        listed = {s[k] for s in json.loads((src.split_dir(split) / "manifest.json").read_text())["shards"]
                  for k in ("tokens", "lens")}
        assert set(shard_files(src, split)) == listed
    assert "budget 6,000 tokens" in src.describe() and f"{n}/{len(items)} items read" in src.describe()


def test_a_larger_budget_prepares_only_the_difference_and_appends(ray_local, small_data, tok, tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "_ITEM_BYTES", 3000)
    docs = make_docs(12, 700)
    path = write_docs(tmp_path / "p.jsonl", docs)
    (first,) = prep.prepare(budget_config(tmp_path, small_data, path, 5000), tok, show_progress=False)
    n1 = first.manifest["items"]["prepared"]
    assert first.tokenized[:n1] == tuple(range(n1))
    before = {split: shard_files(first, split) for split in ("train", "val")}
    old_shards = {split: json.loads((first.split_dir(split) / "manifest.json").read_text())["shards"]
                  for split in ("train", "val")}

    (second,) = prep.prepare(budget_config(tmp_path, small_data, path, 15000), tok, show_progress=False)
    n2 = second.manifest["items"]["prepared"]
    assert second.uri == first.uri and n1 < n2 < second.manifest["items"]["total"]
    assert second.tokenized[0] == n1 and second.tokenized[: n2 - n1] == tuple(range(n1, n2))  # only new items
    for split in ("train", "val"):
        after = shard_files(second, split)
        assert {f: after[f] for f in before[split]} == before[split]  # same bytes, never rewritten
        shards = json.loads((second.split_dir(split) / "manifest.json").read_text())["shards"]
        assert shards[: len(old_shards[split])] == old_shards[split]  # same index and order, new ones after
        assert stream_tokens(second, split)[: len(stream_tokens(first, split))] == stream_tokens(first, split)
    assert second.manifest["splits"]["train"]["tokens"] >= 15000

    # A smaller budget is covered by what is prepared; "the whole source" completes it, again appending.
    (third,) = prep.prepare(budget_config(tmp_path, small_data, path, 5000), tok, show_progress=False)
    assert third.tokenized == () and third.manifest == second.manifest
    cfg = budget_config(tmp_path, small_data, path, None)
    cfg.data.budget = "all"
    (whole,) = prep.prepare(cfg, tok, show_progress=False)
    assert whole.manifest["complete"] and min(whole.tokenized) == n2
    assert stream_tokens(whole, "train") == expected_tokens(tok, docs, 0.1, "train")
    assert "whole source read" in whole.describe()


def test_a_crash_before_the_source_manifest_leaves_the_previous_preparation(ray_local, small_data, tok, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setattr(prep, "_ITEM_BYTES", 3000)
    path = write_docs(tmp_path / "p.jsonl", make_docs(13, 500))
    (first,) = prep.prepare(budget_config(tmp_path, small_data, path, 4000), tok, show_progress=False)
    train_before = stream_tokens(first, "train")
    write_text = storage.write_text

    def crash_on_source_manifest(uri, text, *a, **k):
        if uri == storage.join(first.uri, "manifest.json"):
            raise OSError("simulated crash")
        return write_text(uri, text, *a, **k)

    monkeypatch.setattr(storage, "write_text", crash_on_source_manifest)
    with pytest.raises(OSError, match="simulated crash"):
        prep.prepare(budget_config(tmp_path, small_data, path, 12000), tok, show_progress=False)
    monkeypatch.setattr(storage, "write_text", write_text)
    (again,) = prep.prepare(budget_config(tmp_path, small_data, path, 4000), tok, show_progress=False)
    assert again.tokenized == () and again.manifest == first.manifest
    assert stream_tokens(again, "train") == train_before  # the split manifests were cut back to the prefix


def test_the_derived_budget_of_a_staged_run_is_the_hand_computation(small_data, tmp_path):
    cfg = small_config(tmp_path, small_data)
    for s in cfg.data.sources:
        s.weight = 0.0
    cfg.data.stages = [StageConfig(weights={"prose": 3, "code": 1}, until_step=4),
                       StageConfig(weights={"prose": 1, "code": 1, "math": 2})]
    cfg.train.steps, cfg.train.global_batch_tokens, cfg.data.budget_margin = 10, 256, 0.1
    g = 256
    assert prep.token_budgets(cfg) == [math.ceil((4 * g * 3 / 4 + 6 * g * 1 / 4) * 1.1),
                                       math.ceil((4 * g * 1 / 4 + 6 * g * 1 / 4) * 1.1),
                                       math.ceil((6 * g * 2 / 4) * 1.1)]
    cfg.data.sources[1].max_tokens = 777  # explicit wins, in either mode
    cfg.data.budget = "all"
    assert prep.token_budgets(cfg) == [None, 777, None]


def test_a_parquet_budget_stops_at_a_row_group(ray_local, small_data, tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = make_docs(14, 400)
    pq.write_table(pa.table({"text": docs}), tmp_path / "d.parquet", row_group_size=20)  # 20 row groups
    cfg = config_for(tmp_path, small_data, [("pq", tmp_path / "d.parquet", "parquet")], val_fraction=0.0)
    cfg.data.budget, cfg.data.sources[0].max_tokens = "run", 5000
    (src,) = prep.prepare(cfg, tok, show_progress=False)
    n = src.manifest["items"]["prepared"]
    assert 0 < n < 20
    assert stream_tokens(src, "train") == expected_tokens(tok, docs[: 20 * n], 0.0, "train")
    assert len(expected_tokens(tok, docs[: 20 * (n - 1)], 0.0, "train")) < 5000 <= src.manifest["splits"]["train"]["tokens"]


def test_budget_keys_are_checked(small_data, tmp_path):
    from raysmol.config import ConfigError

    with pytest.raises(ConfigError, match=r"sources\.0\.max_tokens.*positive"):
        small_config(tmp_path, small_data, {"data.sources.0.max_tokens": 0})
    with pytest.raises(ConfigError, match=r"budget_margin.*\[0, 10\]"):
        small_config(tmp_path, small_data, {"data.budget_margin": -0.5})
    with pytest.raises(ConfigError, match=r"data\.budget"):
        small_config(tmp_path, small_data, {"data.budget": "some"})
