"""Engines and the engine pool: greedy output against a hand-written greedy loop, vLLM against transformers token
for token, weight updates with versions, timeouts on stuck engines, clear errors."""

from __future__ import annotations

import time

import pytest
import torch
import transformers

from raysmol.serve.engines import EngineError, Sampling, TransformersEngine, make_engine

PROMPTS = ["the cat sat on", "def f(x):", "3 + 4 =", "a"]


def reference_greedy(folder, prompt: str, max_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy decoding written out: full forward pass each step, argmax, log-softmax of the raw logits."""
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tok(prompt)["input_ids"]
    out, lps = [], []
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model(torch.tensor([ids + out])).logits[0, -1]
            nxt = int(logits.argmax())
            out.append(nxt)
            lps.append(float(logits.log_softmax(-1)[nxt]))
            if nxt == tok.eos_token_id:
                break
    return out, lps


def test_sampling_values_are_checked():
    with pytest.raises(EngineError, match="top_p=0"):
        Sampling(top_p=0)
    with pytest.raises(EngineError, match="n=4 with temperature=0"):
        Sampling(n=4)
    with pytest.raises(EngineError, match="min_tokens=9"):
        Sampling(max_tokens=8, min_tokens=9)
    with pytest.raises(EngineError, match="engine kind 'tgi'"):
        make_engine("tgi", "x")


def object_store_buckets(folder, n: int) -> list:
    """A model folder's weights as GRPO's object_store sync sends them: `n` buckets, one ray.put each."""
    import ray

    from raysmol.serve.sync import MIB, buckets, nbytes

    sd = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    parts = buckets(sd, sum(nbytes(t) for t in sd.values()) / n / MIB * 1.01)
    assert len(parts) >= n
    return [ray.put(b) for b in parts]


def test_transformers_engine_matches_a_hand_written_greedy_loop(hf_models):
    engine = TransformersEngine(str(hf_models["a"]))
    results = engine.generate(PROMPTS, Sampling(max_tokens=12))  # batched with left padding
    for prompt, (sample,) in zip(PROMPTS, results):
        ids, lps = reference_greedy(hf_models["a"], prompt, 12)
        assert sample.token_ids == ids
        assert sample.logprobs == pytest.approx(lps, abs=1e-4)
        assert sample.text == engine.tokenizer.decode(ids, skip_special_tokens=True)
        assert sample.finish_reason == ("stop" if ids[-1] == engine.tokenizer.eos_token_id else "length")
        assert sample.version == 0


def test_stop_strings_seeds_and_samples(hf_models):
    engine = TransformersEngine(str(hf_models["a"]))
    (full,), = engine.generate(["the"], Sampling(max_tokens=16))
    stop = full.text[len(full.text) // 2:][:2]  # a string the greedy output is known to contain
    (cut,), = engine.generate(["the"], Sampling(max_tokens=16, stop=(stop,)))
    assert cut.text == full.text[:full.text.find(stop)] and cut.finish_reason == "stop"
    assert cut.token_ids == full.token_ids[:len(cut.token_ids)] and len(cut.token_ids) < len(full.token_ids)
    assert stop in engine.tokenizer.decode(cut.token_ids)  # the tokens that made the stop string were generated
    hot = Sampling(n=3, temperature=1.0, top_p=0.95, max_tokens=10, seed=7)
    a, b = engine.generate(["the", "a"], hot), engine.generate(["the", "a"], hot)
    assert [[s.token_ids for s in g] for g in a] == [[s.token_ids for s in g] for g in b]  # seeded: reproducible
    assert len(a) == 2 and all(len(g) == 3 for g in a) and len({tuple(s.token_ids) for s in a[0]}) > 1


def test_loading_another_architecture_is_refused(hf_models, tmp_path):
    engine = TransformersEngine(str(hf_models["a"]))
    with pytest.raises(EngineError, match="intermediate_size: 256 -> 512"):
        engine.load(str(hf_models["wide"]), 1)
    with pytest.raises(EngineError, match="no config.json"):
        engine.load(str(tmp_path), 1)
    assert engine.version == 0 and engine.model_path == str(hf_models["a"])


def test_pool_splits_batches_updates_weights_and_replaces_a_stuck_engine(ray_local, hf_models):
    from raysmol.serve.pool import EnginePool, EngineTimeout

    greedy = Sampling(max_tokens=8)
    with EnginePool("transformers", str(hf_models["a"]), num_engines=2, timeout_s=60) as pool:
        assert pool.versions() == [0, 0]
        before = pool.generate(PROMPTS, greedy)
        assert [g[0].token_ids for g in before] == [reference_greedy(hf_models["a"], p, 8)[0] for p in PROMPTS]

        pool.load(str(hf_models["b"]), version=1)
        assert pool.versions() == [1, 1]
        after = pool.generate(PROMPTS, greedy)
        assert all(g[0].version == 1 for g in after)
        assert [g[0].token_ids for g in after] == [reference_greedy(hf_models["b"], p, 8)[0] for p in PROMPTS]

        t = time.perf_counter()
        with pytest.raises(EngineTimeout, match="timed out"):  # a generation that would run for many minutes
            pool.generate(["the"], Sampling(max_tokens=200_000, min_tokens=200_000), timeout_s=3)
        assert time.perf_counter() - t < 30 and pool.restarts == 1
        # The replacement serves the current weights and version.
        assert pool.versions(timeout_s=120) == [1, 1]
        assert [g[0].token_ids for g in pool.generate(PROMPTS[:2], greedy)] == [g[0].token_ids for g in after[:2]]

        # In-memory sync (GRPO's object_store): model a's weights in 3 buckets through the object store, as version
        # 2; a's greedy tokens come back. Engine 1's sync never completes: it times out, and its replacement
        # (started from the folder) catches up on the pool's refs before it serves.
        refs = object_store_buckets(hf_models["a"], n=3)
        with pytest.raises(EngineTimeout, match="weight sync of version 2 failed .*engine 1 timed out"):
            pool.sync(refs, version=2, timeout_s=5, hang=(1,))
        assert pool.restarts == 2 and pool.versions(timeout_s=120) == [2, 2]
        synced = pool.generate(PROMPTS, greedy)  # split over both engines: the replacement answers half
        assert [g[0].token_ids for g in synced] == [g[0].token_ids for g in before]
        assert all(g[0].version == 2 for g in synced)
        assert pool.sync(refs, version=3) == [3, 3]  # what GRPO's retry does: every engine checked


@pytest.mark.slow
def test_vllm_engine_agrees_with_transformers_and_follows_new_weights(ray_local, hf_models):
    from raysmol.serve.pool import EnginePool

    greedy = Sampling(max_tokens=12)
    reference = TransformersEngine(str(hf_models["a"])).generate(PROMPTS, greedy)
    with EnginePool("vllm", str(hf_models["a"]), num_engines=1, timeout_s=300, options={"dtype": "float32"}) as pool:
        got = pool.generate(PROMPTS, greedy)
        for r, g in zip(reference, got):
            assert g[0].token_ids == r[0].token_ids  # token for token
            assert g[0].text == r[0].text and g[0].finish_reason == r[0].finish_reason
            assert g[0].logprobs == pytest.approx(r[0].logprobs, abs=1e-3)
        pool.load(str(hf_models["b"]), version=3)
        assert pool.versions() == [3]
        got_b = pool.generate(PROMPTS, greedy)
        ref_b = TransformersEngine(str(hf_models["b"])).generate(PROMPTS, greedy)
        assert [g[0].token_ids for g in got_b] == [r[0].token_ids for r in ref_b]
        assert all(g[0].version == 3 for g in got_b)
        # In-memory sync (vLLM's layerwise reload, bucket by bucket, tied head repacked): a's tokens come back.
        t = time.perf_counter()
        assert pool.sync(object_store_buckets(hf_models["a"], n=3), version=4) == [4]
        synced_s = time.perf_counter() - t
        got_a = pool.generate(PROMPTS, greedy)
        assert [g[0].token_ids for g in got_a] == [r[0].token_ids for r in reference], synced_s
        assert all(g[0].version == 4 for g in got_a)
        hot = Sampling(n=4, temperature=1.0, max_tokens=8, seed=11)
        a, b = pool.generate(["the"], hot), pool.generate(["the"], hot)
        assert [s.token_ids for s in a[0]] == [s.token_ids for s in b[0]] and len(a[0]) == 4


def test_cpu_engines_fit_max_model_len_to_their_kv_cache():
    from raysmol.serve.engines import EngineError, cpu_max_model_len

    # SmolLM2-135M's shape: 30 layers x 3 KV heads x 64 dims x 2 (K and V) x 4 bytes = 46,080 bytes per token;
    # its 8,192-token context needs 360 MiB, more than the default 0.25 GiB: the engine serves 5,120 tokens.
    smol = {"num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576, "num_hidden_layers": 30,
            "max_position_embeddings": 8192}
    assert cpu_max_model_len(smol, 2**28, "float32") == int(0.9 * 2**28 / 46080) // 256 * 256 == 5120
    assert cpu_max_model_len(smol, 2**28, "bfloat16") == 8192  # half the bytes: the whole context fits
    assert cpu_max_model_len(smol, 2**30, "float32") == 8192
    with pytest.raises(EngineError, match="kv_cache_gib"):
        cpu_max_model_len(smol, 2**23, "float32")
