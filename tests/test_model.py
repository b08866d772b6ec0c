"""Model construction: parameter counts equal transformers' own, architecture switches, FLOPs, masking."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raysmol.config import apply_override, load_config
from raysmol.model import build_model, flops_per_token, hf_config, nope_layers, param_count

ROOT = Path(__file__).resolve().parent.parent


def cfg_with(**kv):
    cfg = load_config()
    for k, v in kv.items():
        apply_override(cfg, f"{k.replace('__', '.')}={v}")
    return cfg


def hf_count(cfg) -> int:
    with torch.device("meta"):
        import transformers

        model = transformers.AutoModelForCausalLM.from_config(hf_config(cfg))
    return sum(p.numel() for p in model.parameters())


def test_1b_baseline_parameter_count_matches_transformers_and_the_playbook():
    cfg = load_config(ROOT / "jobs" / "smollm3_1b_baseline.yaml")
    assert param_count(cfg) == hf_count(cfg) == 1_235_814_400


@pytest.mark.parametrize("kv", [
    {},                                                   # GQA, tied
    {"model__num_kv_heads": 4},                           # MHA
    {"model__num_kv_heads": 1},                           # MQA
    {"model__tie_embeddings": "false"},                   # untied
    {"model__arch": "smollm3", "model__nope_every": 2},   # SmolLM3 with NoPE layers
    {"model__arch": "smollm3", "model__num_layers": 4, "model__num_kv_heads": 1, "model__tie_embeddings": "false"},
])
def test_parameter_counts_match_transformers(kv):
    cfg = cfg_with(**kv)
    assert param_count(cfg) == hf_count(cfg)


def test_architecture_switches_reach_the_transformers_config():
    c = hf_config(cfg_with(model__num_kv_heads=1, model__rope_theta=50000.0, model__tie_embeddings="false"))
    assert c.num_key_value_heads == 1 and c.rope_parameters["rope_theta"] == 50000.0 and not c.tie_word_embeddings
    cfg = cfg_with(model__arch="smollm3", model__num_layers=8, model__nope_every=4)
    c = hf_config(cfg)
    assert type(c).__name__ == "SmolLM3Config"
    assert [i for i, use_rope in enumerate(c.no_rope_layers) if not use_rope] == nope_layers(cfg) == [3, 7]
    c = hf_config(cfg_with(model__arch="smollm3"))
    assert all(c.no_rope_layers)  # nope_every 0: RoPE everywhere


def test_tied_embeddings_share_storage():
    m = build_model(cfg_with())
    assert m.get_input_embeddings().weight.data_ptr() == m.get_output_embeddings().weight.data_ptr()
    m = build_model(cfg_with(model__tie_embeddings="false"))
    assert m.get_input_embeddings().weight.data_ptr() != m.get_output_embeddings().weight.data_ptr()


def test_flops_per_token_by_hand():
    cfg = cfg_with(model__hidden_size=64, model__num_layers=2, model__num_heads=4, model__num_kv_heads=2,
                   model__intermediate_size=256, model__vocab_size=1000, train__seq_len=128,
                   train__global_batch_tokens=2048, train__micro_batch_size=8)
    # per layer: q,o 64*64 each; k,v 64*32 each; MLP 3*64*256. LM head 1000*64.
    matmul = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 256) + 1000 * 64
    assert flops_per_token(cfg) == 6 * matmul + 12 * 2 * 64 * 128


def test_same_seed_same_weights():
    a, b = build_model(cfg_with(), seed=3), build_model(cfg_with(), seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("arch", ["llama", "smollm3"])
def test_intra_document_masking_makes_a_document_blind_to_what_is_packed_before_it(arch):
    """The honest test: doc B's logits are the same alone and packed after doc A; without masking they differ."""
    kv = {"model__arch": arch}
    if arch == "smollm3":
        kv["model__nope_every"] = 2  # NoPE layers see no positions at all: only the mask separates documents
    model = build_model(cfg_with(**kv), seed=0).eval()
    g = torch.Generator().manual_seed(0)
    doc_a = torch.randint(1, 8000, (1, 23), generator=g)
    doc_b = torch.randint(1, 8000, (1, 17), generator=g)
    packed = torch.cat([doc_a, doc_b], 1)
    with torch.no_grad():
        alone = model(input_ids=doc_b, position_ids=torch.arange(17)[None]).logits
        pos = torch.cat([torch.arange(23), torch.arange(17)])[None]
        masked = model(input_ids=packed, position_ids=pos).logits[:, 23:]
        unmasked = model(input_ids=packed, position_ids=torch.arange(40)[None]).logits[:, 23:]
    torch.testing.assert_close(masked, alone, atol=1e-5, rtol=1e-5)
    assert (unmasked - alone).abs().max() > 1e-3
