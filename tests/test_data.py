"""Mixture cursor and packing: pure, property-tested (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raysmol.data.batches import Batches
from raysmol.data.mixture import Mixture, StagedMixture
from raysmol.data.store import TokenStream, permute


def write_store(folder: Path, docs: list[list[int]], per_shard: int = 7) -> Path:
    """A split in the prepared format: shards of back-to-back documents plus their lengths."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for i in range(0, len(docs), per_shard):
        part = docs[i : i + per_shard]
        np.save(folder / f"{i:06d}.tokens.npy", np.array([t for d in part for t in d], dtype=np.uint16))
        np.save(folder / f"{i:06d}.lens.npy", np.array([len(d) for d in part], dtype=np.int32))
        shards.append({"tokens": f"{i:06d}.tokens.npy", "lens": f"{i:06d}.lens.npy", "docs": len(part)})
    (folder / "manifest.json").write_text(json.dumps({"shards": shards}))
    return folder


# ---------------------------------------------------------------- mixture


def max_share_error(weights, seed, n=20_000, from_prefix=1000) -> float:
    w = np.asarray(weights) / np.sum(weights)
    src = Mixture(weights, seed).sources(np.arange(n))
    counts = np.stack([np.cumsum(src == i) for i in range(len(w))], 1)
    shares = counts / np.arange(1, n + 1)[:, None]
    return float(np.abs(shares - w)[from_prefix - 1 :].max())


@pytest.mark.parametrize("weights", [[0.7, 0.2, 0.1], [0.9, 0.1], [0.5, 0.5], [0.98, 0.01, 0.01]])
def test_realised_shares_within_one_percent_at_every_prefix(weights):
    for seed in range(3):
        assert max_share_error(weights, seed) < 0.01


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0.01, 10), min_size=1, max_size=6), st.integers(0, 2**32))
def test_realised_shares_property(weights, seed):
    assert max_share_error(weights, seed, n=5000) < 0.01


def test_zero_weight_source_is_never_drawn():
    assert 1 not in set(Mixture([0.5, 0.0, 0.5], 0).sources(np.arange(10_000)).tolist())


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**20), st.integers(0, 5))
def test_locate_counts_draws_per_source(start, seed):
    m = Mixture([0.7, 0.2, 0.1], seed, chunk=1024)
    g = np.arange(start, start + 300)
    src, k = m.locate(g)
    before = m.counts(start)
    for s in range(3):
        ks = k[src == s]
        assert ks.tolist() == list(range(before[s], before[s] + len(ks)))  # k-th draw of its source, in order
    assert (m.sources(g) == src).all()


def test_mixture_is_deterministic_and_seeded():
    a, b, c = Mixture([0.7, 0.3], 5), Mixture([0.7, 0.3], 5), Mixture([0.7, 0.3], 6)
    g = np.arange(1000)
    assert (a.sources(g) == b.sources(g)).all() and (a.sources(g) != c.sources(g)).any()


# ---------------------------------------------------------------- packing

docs_strategy = st.lists(st.lists(st.integers(1, 60000), min_size=1, max_size=40), min_size=1, max_size=30)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(docs_strategy, st.integers(1, 50), st.integers(1, 9))
def test_windows_cover_the_stream_without_loss_or_duplication(tmp_path, docs, seq_len, per_shard):
    folder = write_store(tmp_path / f"s{abs(hash((str(docs), seq_len, per_shard)))}", docs, per_shard)
    stream = TokenStream(folder, seed=0)
    concat = [t for d in docs for t in d]
    n = len(concat) // seq_len  # windows whose inputs lie inside epoch 0
    inputs = [t for k in range(n) for t in stream.window(k, seq_len).tokens[:-1].tolist()]
    assert inputs == concat[: n * seq_len]
    for k in range(n):
        if (k + 1) * seq_len < len(concat):  # the last label still lies in epoch 0
            assert stream.window(k, seq_len).tokens[1:].tolist() == concat[k * seq_len + 1 : (k + 1) * seq_len + 1]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(docs_strategy, st.integers(1, 50))
def test_positions_restart_at_each_document(tmp_path, docs, seq_len):
    folder = write_store(tmp_path / f"p{abs(hash((str(docs), seq_len)))}", docs)
    stream = TokenStream(folder)
    # document id and in-document offset of every stream position (epoch 0)
    offsets = [i for d in docs for i in range(len(d))]
    n = len(offsets) // seq_len
    for k in range(n):
        assert stream.window(k, seq_len).positions.tolist() == offsets[k * seq_len : (k + 1) * seq_len]


def test_a_source_that_runs_out_wraps_with_a_new_seeded_order(tmp_path):
    docs = [[i] * (i % 5 + 2) for i in range(1, 40)]
    stream = TokenStream(write_store(tmp_path / "w", docs), seed=7)
    total = stream.total
    epoch1 = stream.read(total, total)[0].tolist()
    epoch2 = stream.read(2 * total, total)[0].tolist()
    first = [t for d in docs for t in d]
    assert sorted(epoch1) == sorted(first) and epoch1 != first  # same documents, another order
    assert epoch2 != epoch1
    assert TokenStream(write_store(tmp_path / "w2", docs), seed=7).read(total, total)[0].tolist() == epoch1
    assert stream.window(total // 4 + 1, 4).epoch >= 1


# ---------------------------------------------------------------- global batches


def test_global_batch_is_the_same_at_any_world_size(tmp_path):
    rng = np.random.default_rng(0)
    streams = [TokenStream(write_store(tmp_path / str(i), [rng.integers(1, 999, rng.integers(3, 50)).tolist()
                                                          for _ in range(60)])) for i in range(3)]
    batches = Batches(streams, [0.7, 0.2, 0.1], seed=1, seq_len=16, samples_per_step=8)

    def global_rows(world, micro, step):
        rows = []
        for r in range(world):
            for mb in batches.micro_batches(step, r, world, micro):
                rows += [tuple(x) for x in mb.input_ids.tolist()]
        return sorted(rows)

    for step in (0, 3):
        ref = global_rows(1, 8, step)
        assert ref == global_rows(2, 2, step) == global_rows(4, 1, step) == global_rows(2, 4, step)
    assert global_rows(1, 8, 0) != global_rows(1, 8, 1)


def test_labels_are_inputs_shifted_by_one(tmp_path):
    stream = TokenStream(write_store(tmp_path / "l", [list(range(1, 200))]))
    b = Batches([stream], [1.0], seed=0, seq_len=10, samples_per_step=2).samples(np.array([0, 1]))
    assert b.labels[:, :-1].tolist() == b.input_ids[:, 1:].tolist()
    assert b.labels[0, -1] == b.input_ids[1, 0]  # the last label is the next window's first token


# ---------------------------------------------------------------- shuffling


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5000), st.integers(0, 2**40))
def test_feistel_permutation_is_a_bijection(n, key):
    assert sorted(permute(j, n, key) for j in range(n)) == list(range(n))


def random_docs(seed: int, n: int = 120) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 999, rng.integers(3, 40)).tolist() for _ in range(n)]


def test_shuffled_epoch_zero_permutes_documents_inside_each_shard(tmp_path):
    docs = random_docs(0)
    plain, mixed = TokenStream(write_store(tmp_path / "a", docs), seed=3), TokenStream(write_store(tmp_path / "a", docs), seed=3, shuffle=True)
    total = plain.total
    order, _ = mixed._order(0)
    assert sorted(order.tolist()) == list(range(len(docs))) and order.tolist() != list(range(len(docs)))
    # shards keep their place (7 documents each): an appended shard leaves the stream before it unchanged
    assert all(sorted(order[i:i + 7].tolist()) == list(range(i, min(i + 7, len(docs)))) for i in range(0, len(docs), 7))
    assert sorted(mixed.read(0, total)[0].tolist()) == sorted(plain.read(0, total)[0].tolist())
    for epoch in (1, 2):  # later epochs: a permutation of all documents, another one each epoch
        o, _ = mixed._order(epoch)
        assert sorted(o.tolist()) == list(range(len(docs))) and o.tolist() != order.tolist()


@pytest.mark.parametrize("seq_len", [5, 16])
def test_shuffled_reads_cover_each_block_once_and_come_from_far_apart(tmp_path, seq_len):
    stream = TokenStream(write_store(tmp_path / "s", random_docs(1, 200)), seed=9, shuffle=True)
    block = stream.total // seq_len
    slots = [stream.slot(k, seq_len) for k in range(3 * block)]
    for b in range(3):  # every slot of a block read exactly once, blocks in order
        assert sorted(slots[b * block:(b + 1) * block]) == list(range(b * block, (b + 1) * block))
    assert slots[:block] != list(range(block))
    gaps = np.abs(np.diff(slots[:block]))
    assert gaps.mean() > block / 5  # consecutive reads are far apart (in order they would be 1 apart)
    # a window's tokens are those of its slot in the unshuffled stream
    plain = TokenStream(write_store(tmp_path / "s", random_docs(1, 200)), seed=9, shuffle=True)
    plain.slot = lambda k, L: k  # noqa: E731  (the same document order, slots read in order)
    for k in (0, 7, block + 3):
        assert stream.window(k, seq_len).tokens.tolist() == plain.window(slots[k], seq_len).tokens.tolist()


def test_shuffled_global_batch_is_the_same_at_world_sizes_1_and_2(tmp_path):
    streams = [TokenStream(write_store(tmp_path / str(i), random_docs(i, 60)), seed=4, shuffle=True) for i in range(3)]
    batches = Batches(streams, [0.6, 0.3, 0.1], seed=1, seq_len=16, samples_per_step=8)

    def global_rows(world, micro, step):
        return sorted(tuple(x) for r in range(world) for mb in batches.micro_batches(step, r, world, micro)
                      for x in mb.input_ids.tolist())

    for step in (0, 5):
        assert global_rows(1, 8, step) == global_rows(2, 4, step) == global_rows(2, 1, step)


# ---------------------------------------------------------------- stages

STAGES = [(0, [0.85, 0.12, 0.03, 0.0]), (3000, [0.75, 0.15, 0.10, 0.0]), (8000, [0.63, 0.24, 0.0, 0.13])]


def test_unstaged_mixture_is_the_plain_mixture():
    g = np.arange(20_000)
    a, b = StagedMixture([(0, [0.7, 0.2, 0.1])], 5).locate(g), Mixture([0.7, 0.2, 0.1], 5).locate(g)
    assert (a[0] == b[0]).all() and (a[1] == b[1]).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stage_shares_within_one_percent_at_every_prefix_of_1000(seed):
    m, end = StagedMixture(STAGES, seed), 14_000
    src, _ = m.locate(np.arange(end))
    for i, (start, w) in enumerate(STAGES):
        stop = STAGES[i + 1][0] if i + 1 < len(STAGES) else end
        s = src[start:stop]
        counts = np.stack([np.cumsum(s == j) for j in range(len(w))], 1)
        shares = counts / np.arange(1, len(s) + 1)[:, None]
        assert np.abs(shares - np.asarray(w))[999:].max() < 0.01, i


def test_each_source_continues_across_stages_without_repeats_or_gaps():
    m = StagedMixture(STAGES, 7)
    src, k = m.locate(np.arange(14_000))
    for j in range(4):  # the k-th draw of each source over the whole run: 0, 1, 2, ... contiguous in its stream
        assert k[src == j].tolist() == list(range(int((src == j).sum())))
    assert not (src[:8000] == 3).any() and not (src[8000:] == 2).any()  # a source enters, another leaves
    assert (m.counts(14_000) == np.bincount(src, minlength=4)).all()
    assert (m.counts(8000) == m.offsets[2]).all()


def test_stage_plan_resolves_steps_tokens_and_the_open_last_stage():
    from raysmol.config import ConfigError, from_dict

    raw = {"data": {"sources": [{"name": "web", "path": "builtin:prose"}, {"name": "code", "path": "builtin:code"}],
                    "stages": [{"until_step": 100, "weights": {"web": 1}},
                               {"until_tokens": 2048 * 250 + 1, "weights": {"web": 3, "code": 1}, "name": "mid"},
                               {"weights": {"code": 1}}]},
           "train": {"steps": 300}}
    plan = from_dict(raw).data.stage_plan(from_dict(raw).train)
    assert [(s.name, s.start, s.end, s.weights) for s in plan] == [
        ("stage0", 0, 100, (1.0, 0.0)), ("mid", 100, 251, (0.75, 0.25)), ("stage2", 251, 300, (0.0, 1.0))]
    short = {**raw, "train": {"steps": 50}}
    assert [(s.start, s.end) for s in from_dict(short).data.stage_plan(from_dict(short).train)] == [(0, 50)]
    bad = [({"stages": [{"until_step": 10, "weights": {"web": 1}}]}, "data.stages"),
           ({"stages": [{"weights": {"wev": 1}}]}, "data.stages.0.weights: unknown source"),
           ({"stages": [{"until_step": 10, "weights": {"web": 1}}, {"until_step": 5, "weights": {"web": 1}}, {"weights": {"web": 1}}]},
            "data.stages.1: ends at step 5"),
           ({"stages": [{"weights": {"web": 0}}]}, "weights sum to zero")]
    for data, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            from_dict({"data": {**raw["data"], **data}, "train": {"steps": 300}})
    with pytest.raises(ConfigError, match="data.sources.*weight.*stages"):
        from_dict({"data": {**raw["data"], "sources": [{"name": "web", "path": "builtin:prose", "weight": 1.0},
                                                      {"name": "code", "path": "builtin:code"}]}, "train": {"steps": 300}})
