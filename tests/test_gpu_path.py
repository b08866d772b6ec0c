"""The GPU path on a CPU: packed-document attention per implementation, FLOPs by hand, activation checkpointing,
the Liger and attention switches, torch.compile, and benchmarks/gpu_throughput.py's dry run and profile."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from raysmol.config import ConfigError, apply_override, load_config
from raysmol.data.batches import Batch
from raysmol.model import (FUSED_LOSS, _cuda_varlen, attn_implementation, build_model, flops_per_token,
                           packed_attention_kwargs, prepare_for_training, varlen_attention)
from raysmol.train.objectives import DeviceBatch, causal_lm, model_inputs, to_device

ROOT = Path(__file__).resolve().parent.parent


def cfg_with(*overrides: str):
    cfg = load_config()
    for o in overrides:
        apply_override(cfg, o)
    return cfg


SMALL = ("model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
         "model.intermediate_size=96", "model.vocab_size=300", "train.seq_len=32", "train.global_batch_tokens=512",
         "train.micro_batch_size=2")


def packed_batch(seed: int = 0, rows: int = 2, length: int = 40, vocab: int = 300) -> tuple[Batch, list[list[tuple]]]:
    """Rows packed with documents of random lengths; the first document of each row starts mid-document
    (positions from an offset, like a window cut out of a stream). Also returns each row's (start, end, offset)."""
    g = np.random.default_rng(seed)
    pos = np.zeros((rows, length), dtype=np.int64)
    docs = []
    for r in range(rows):
        spans, filled, offset = [], 0, int(g.integers(1, 9))
        while filled < length:
            n = min(int(g.integers(1, 15)), length - filled)
            pos[r, filled:filled + n] = np.arange(offset, offset + n)
            spans.append((filled, filled + n, offset))
            filled, offset = filled + n, 0
        docs.append(spans)
    ids = torch.from_numpy(g.integers(1, vocab, (rows, length + 1)))
    return Batch(ids[:, :-1], ids[:, 1:], torch.from_numpy(pos), np.zeros(rows), np.zeros(rows)), docs


def reference_logits(model, batch: Batch, docs) -> torch.Tensor:
    """Every document run on its own, unpacked, with its own positions: what packed attention must reproduce."""
    out = torch.empty(*batch.input_ids.shape, model.config.vocab_size)
    for r, spans in enumerate(docs):
        for s, e, offset in spans:
            out[r, s:e] = model(input_ids=batch.input_ids[r:r + 1, s:e],
                                position_ids=torch.arange(offset, offset + e - s)[None]).logits[0]
    return out


# ---------------------------------------------------------------- FLOPs


def test_flops_per_token_matches_a_hand_count_and_the_models_own_matmuls():
    cfg = cfg_with("model.hidden_size=96", "model.num_layers=3", "model.num_heads=6", "model.num_kv_heads=2",
                   "model.intermediate_size=256", "model.vocab_size=700", "model.tie_embeddings=false",
                   "train.seq_len=64", "train.global_batch_tokens=1024", "train.micro_batch_size=8")
    # head dim 16: q and o are 96x96, k and v 96x32 (2 KV heads); SwiGLU gate/up/down 96x256; LM head 700x96.
    per_layer = 2 * 96 * 96 + 2 * 96 * 32 + 3 * 96 * 256
    matmul = 3 * per_layer + 700 * 96
    attention = 12 * 3 * 96 * 64  # QK^T and AV: 2 matmuls x 2 FLOPs x 3 (fwd + bwd) x layers x d x T
    assert flops_per_token(cfg) == 6 * matmul + attention
    # The same matmul parameters, counted from the built model's Linear layers (the embedding lookup excluded).
    model = build_model(cfg)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert linear == matmul


# ---------------------------------------------------------------- packed-document attention


@pytest.mark.parametrize("impl", ["sdpa", "eager", "varlen"])
@pytest.mark.parametrize("arch", ["llama", "smollm3"])
def test_packed_documents_give_the_logits_of_each_document_run_alone(impl, arch):
    extra = ("model.arch=smollm3", "model.nope_every=2") if arch == "smollm3" else ()
    cfg = cfg_with(*SMALL, f"model.attn_implementation={impl}", *extra)
    model = build_model(cfg, seed=0).eval()
    batch, docs = packed_batch()
    with torch.no_grad():
        packed = model(**model_inputs(model, to_device(batch, "cpu"))).logits
        ref = reference_logits(model, batch, docs)
        unmasked = model(input_ids=batch.input_ids).logits  # one causal sequence per row: crosses documents
    torch.testing.assert_close(packed, ref, atol=1e-5, rtol=1e-5)
    assert (unmasked - ref).abs().max() > 1e-3  # the inputs do tell the paths apart


def test_varlen_builds_no_mask_and_gets_the_boundaries_precomputed(monkeypatch):
    seen = []

    def spy(module, q, k, v, attention_mask, **kw):
        seen.append((attention_mask, kw.get("cu_seq_lens_q"), kw.get("max_length_q")))
        return varlen_attention(module, q, k, v, attention_mask, **kw)

    monkeypatch.setitem(transformers.AttentionInterface._global_mapping, "varlen", spy)
    model = build_model(cfg_with(*SMALL, "model.attn_implementation=varlen"), seed=0).eval()
    batch, docs = packed_batch(rows=3)
    on_device = to_device(batch, "cpu")
    assert isinstance(on_device, DeviceBatch)
    with torch.no_grad():
        model(**model_inputs(model, on_device))
    expected = [0] + [r * 40 + e for r, spans in enumerate(docs) for _, e, _ in spans]
    assert len(seen) == 2  # one call per layer
    for mask, cu, longest in seen:
        assert mask is None  # no [m, 1, L, L] mask anywhere
        assert cu.dtype == torch.int32 and cu.tolist() == expected
        assert longest == max(e - s for spans in docs for s, e, _ in spans) and isinstance(longest, int)


def test_boundaries_follow_transformers_packed_sequence_rule():
    pos = torch.tensor([[3, 4, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5], [7, 0, 1, 0, 0, 1]])
    kw = packed_attention_kwargs(pos)
    assert kw["cu_seq_lens_q"].tolist() == [0, 2, 5, 6, 12, 13, 15, 16, 18] and kw["max_length_q"] == 6
    # transformers' own detection (used to build SDPA's block-diagonal mask) splits the rows the same way.
    from transformers.masking_utils import find_packed_sequence_indices

    ids = find_packed_sequence_indices(pos)
    ours = np.zeros(pos.numel(), dtype=int)
    ours[kw["cu_seq_lens_q"][1:-1].numpy()] = 1
    ours = ours.reshape(pos.shape)
    ours[:, 0] = 0
    assert (np.cumsum(ours, 1) == ids.numpy()).all()


def _per_document(q, k, v, cu, scale, gqa):
    outs = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            q[s:e].transpose(0, 1).float(), k[s:e].transpose(0, 1).float(), v[s:e].transpose(0, 1).float(),
            is_causal=True, scale=scale, enable_gqa=gqa).transpose(0, 1).to(q.dtype))
    return torch.cat(outs)


def varlen_attn_new(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1),
                    enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    assert window_size == (-1, 0) and torch.equal(cu_q, cu_k) and max_q == max_k  # causal, self-attention
    assert enable_gqa or q.shape[1] == k.shape[1]
    return _per_document(q, k, v, cu_q, scale, enable_gqa)


def varlen_attn_old(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None):  # PyTorch 2.9
    assert is_causal and q.shape[1] == k.shape[1] and torch.equal(cu_q, cu_k) and max_q == max_k
    return _per_document(q, k, v, cu_q, None, False)


@pytest.mark.parametrize("api", [varlen_attn_new, varlen_attn_old])
def test_the_cuda_kernel_call_follows_the_varlen_attn_contract(monkeypatch, api):
    """torch.nn.attention.varlen.varlen_attn only runs on CUDA: check what we hand it against its documented
    contract ([tokens, heads, dim]; causal; GQA; this release's and an older one's signature) with CPU stand-ins."""
    import torch.nn.attention.varlen as varlen_mod

    monkeypatch.setattr(varlen_mod, "varlen_attn", api)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 10, 8, generator=g)  # [b, Hq, L, D]
    k, v = torch.randn(2, 2, 10, 8, generator=g), torch.randn(2, 2, 10, 8, generator=g)
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 0, 1], [5, 6, 7, 8, 9, 0, 1, 2, 3, 4]])
    kw = packed_attention_kwargs(pos)
    ref, _ = varlen_attention(None, q, k, v, None, scaling=0.3, **kw)  # the CPU per-document path
    flat = [x.transpose(1, 2).reshape(20, x.shape[1], 8).bfloat16() for x in (q, k, v)]
    out = _cuda_varlen(*flat, kw["cu_seq_lens_q"], kw["max_length_q"], 0.3).reshape(2, 10, 4, 8)
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    with pytest.raises(ValueError, match="bf16"):
        _cuda_varlen(*(x.float() for x in flat), kw["cu_seq_lens_q"], kw["max_length_q"], 0.3)


def test_varlen_without_precomputed_boundaries_derives_them_from_position_ids():
    model = build_model(cfg_with(*SMALL, "model.attn_implementation=varlen"), seed=0).eval()
    batch, docs = packed_batch(seed=1)
    with torch.no_grad():
        direct = model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits
        torch.testing.assert_close(direct, reference_logits(model, batch, docs), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- switches


def test_attn_implementation_auto_resolves_by_device_precision_and_installed_kernels(monkeypatch):
    assert attn_implementation(cfg_with()) == "sdpa"  # CPU
    gpu = cfg_with("train.use_gpu=true")
    assert attn_implementation(gpu) == "varlen"  # flash-attn is not installed here
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else real(name, *a))
    assert attn_implementation(gpu) == "flash_attention_2"
    assert attn_implementation(cfg_with("train.use_gpu=true", "train.precision=fp32")) == "sdpa"
    assert attn_implementation(cfg_with("model.attn_implementation=eager")) == "eager"
    assert build_model(cfg_with(*SMALL)).config._attn_implementation == "sdpa"


@pytest.mark.parametrize("overrides, key", [
    (("model.attn_implementation=flash_attention_2",), "model.attn_implementation"),
    (("train.use_gpu=true", "train.precision=fp32", "model.attn_implementation=varlen"), "model.attn_implementation"),
    (("train.liger=true",), "train.liger"),
])
def test_gpu_only_switches_are_config_errors_where_they_cannot_run(tmp_path, overrides, key):
    path = tmp_path / "c.yaml"
    path.write_text((ROOT / "jobs" / "tiny.yaml").read_text())
    with pytest.raises(ConfigError, match=f"c.yaml: {key}"):
        load_config(path, overrides)


def test_liger_switch_errors_clearly_without_the_package_and_applies_it_when_present(monkeypatch):
    cfg = cfg_with(*SMALL, "train.use_gpu=true", "train.liger=true")
    model = build_model(cfg)
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # not importable, as on this machine
    with pytest.raises(ConfigError, match=r"train\.liger: needs the liger-kernel package.*set train\.liger: false"):
        prepare_for_training(model, cfg)
    assert not getattr(model, FUSED_LOSS, False)

    calls = []
    fake = types.ModuleType("liger_kernel.transformers")
    fake.apply_liger_kernel_to_llama = lambda **kw: calls.append(kw)
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    prepare_for_training(model, cfg)
    assert calls == [{"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                      "fused_linear_cross_entropy": True, "model": model}]
    assert getattr(model, FUSED_LOSS)
    smol = cfg_with(*SMALL, "train.use_gpu=true", "train.liger=true", "model.arch=smollm3")
    with pytest.raises(ConfigError, match="no kernels for model type 'smollm3'"):
        prepare_for_training(build_model(smol), smol)


def test_fused_loss_path_passes_already_shifted_labels_and_uses_the_models_loss():
    """With Liger's fused linear cross-entropy the model returns the loss; labels must not be shifted again."""
    model = build_model(cfg_with(*SMALL), seed=0)
    batch, _ = packed_batch()
    expected, _ = causal_lm(model, batch)
    got = {}
    real_forward = model.forward

    def fused_forward(**kw):  # what Liger's forward computes, without its kernels: mean CE vs shift_labels
        labels = kw.pop("shift_labels")
        got["labels"] = labels
        logits = real_forward(**kw).logits
        return types.SimpleNamespace(loss=torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()))

    model.forward = fused_forward
    setattr(model, FUSED_LOSS, True)
    loss, _ = causal_lm(model, batch)
    assert got["labels"] is batch.labels
    torch.testing.assert_close(loss, expected)


def test_activation_checkpointing_recomputes_layers_and_keeps_the_gradients():
    batch, _ = packed_batch()

    def grads(*overrides):
        cfg = cfg_with(*SMALL, *overrides)
        model = prepare_for_training(build_model(cfg, seed=0), cfg).train()
        calls = []
        # A pre-hook: the non-reentrant recompute stops early, once the saved tensors it needs are rebuilt.
        model.model.layers[0].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
        loss, _ = causal_lm(model, to_device(batch, "cpu"))
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls), model.is_gradient_checkpointing

    plain, plain_calls, off = grads()
    ckpt, ckpt_calls, on = grads("train.activation_checkpointing=true")
    assert (off, on) == (False, True)
    assert (plain_calls, ckpt_calls) == (1, 2)  # the layer ran again in the backward pass
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.slow
def test_compiled_model_trains_a_step_with_the_same_loss_and_keeps_state_dict_keys():
    batch, _ = packed_batch()
    cfg = cfg_with(*SMALL, "train.compile=true")
    eager = build_model(cfg, seed=0)
    compiled = prepare_for_training(build_model(cfg, seed=0), cfg)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints and export unaffected
    for model in (eager, compiled):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        loss, _ = causal_lm(model, to_device(batch, "cpu"))
        loss.backward()
        opt.step()
        model.loss = float(loss.detach())
    assert compiled.loss == pytest.approx(eager.loss, abs=1e-5)
    torch.testing.assert_close(compiled.lm_head.weight, eager.lm_head.weight, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- the benchmark script


@pytest.mark.slow
def test_gpu_throughput_dry_run_reports_both_loops_and_writes_a_profile(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_throughput.py"), "--dry-run", "--json",
                           "--profile", str(tmp_path / "prof"), "train.peak_flops=1e9"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    cfg = cfg_with("model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
                   "model.intermediate_size=128", "model.vocab_size=512", "train.seq_len=64")
    assert res["device"] == "cpu" and res["world_size"] == 1 and res["dry_run"]
    assert res["flops_per_token"] == flops_per_token(cfg) and res["peak_flops"] == 1e9
    for name in ("raysmol", "plain"):
        r = res[name]
        assert r["tokens_per_s_per_gpu"] > 0 and r["step_time_s"] > 0
        assert r["mfu"] == pytest.approx(r["tokens_per_s_per_gpu"] * res["flops_per_token"] / 1e9)
        assert r["peak_memory_gib"] is None  # CUDA only
    # Same weights, same first batch: both loops see the same model and data.
    assert res["raysmol"]["first_loss"] == pytest.approx(res["plain"]["first_loss"], abs=1e-4)
    assert res["ratio"] == pytest.approx(res["raysmol"]["tokens_per_s_per_gpu"] / res["plain"]["tokens_per_s_per_gpu"])
    assert res["ratio"] > 0 and res["meets_goal"] in (True, False)
    assert res["shape"]["attn_implementation"] == "sdpa" and res["shape"]["seq_len"] == 64
    check = res["attention_check"]  # the configured attention against eager on packed documents, on the device
    assert check["implementation"] == "sdpa" and check["reference"] == "eager"
    assert 0 <= check["max_abs_logit_diff"] < 1e-4
    trace = json.loads((tmp_path / "prof" / "raysmol_rank0.json").read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert any("aten::" in n for n in names)  # real operator events from the profiled steps
