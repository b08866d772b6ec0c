"""Post-training takes the model's shape from init_from: Config.adopt_model and the explicit keys it checks."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest

from raysmol.config import Config, ConfigError, from_dict, hf_model_shape, load_config

ROOT = Path(__file__).resolve().parent.parent

# A base model's config.json as a small Llama run exports it (transformers 5: rope_theta under rope_parameters).
LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 3,
    "num_attention_heads": 4, "num_key_value_heads": 1, "intermediate_size": 96, "max_position_embeddings": 256,
    "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0}, "tie_word_embeddings": False,
    "vocab_size": 300, "rms_norm_eps": 1e-6, "initializer_range": 0.02, "eos_token_id": 0,
}


def sft(*overrides: str) -> Config:
    return load_config(ROOT / "jobs" / "sft_tiny.yaml", list(overrides))


def test_post_training_jobs_load_without_a_model_section():
    for job in ("sft_tiny", "dpo_tiny", "grpo_tiny", "sft_1b", "dpo_1b", "grpo_gsm8k"):
        cfg = load_config(ROOT / "jobs" / f"{job}.yaml")
        assert cfg.post_training() and not any(k.startswith("model") for k in cfg.explicit), job
        assert cfg.model_from is None


def test_adoption_fills_the_shape_from_the_base_models_config():
    cfg = sft()
    cfg.adopt_model(LLAMA, "sft.init_from")
    m = cfg.model
    assert (m.arch, m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads) == ("llama", 64, 3, 4, 1)
    assert (m.intermediate_size, m.max_position_embeddings, m.rope_theta) == (96, 256, 5000.0)
    assert (m.tie_embeddings, m.vocab_size, m.rms_norm_eps, m.nope_every) == (False, 300, 1e-6, 0)
    assert cfg.vocab_size() == 300 and cfg.model_from == "sft.init_from='runs/tiny'"
    assert m.attn_implementation == "auto"  # a runtime choice, not part of the shape


def test_rope_theta_at_the_top_level_and_left_out_keys_take_the_model_types_defaults():
    old = {k: v for k, v in LLAMA.items() if k not in ("rope_parameters", "rms_norm_eps", "max_position_embeddings")}
    shape = hf_model_shape({**old, "rope_theta": 500000.0})
    assert shape["rope_theta"] == 500000.0
    assert shape["max_position_embeddings"] == 2048 and shape["rms_norm_eps"] == 1e-6  # LlamaConfig's defaults


def test_an_explicit_key_that_disagrees_is_an_error_naming_key_values_origin_and_source(tmp_path):
    with pytest.raises(ConfigError) as e:
        sft("model.hidden_size=128").adopt_model(LLAMA, "sft.init_from")
    msg = str(e.value)
    assert "sft_tiny.yaml" in msg and "model.hidden_size: config 128 vs model 64" in msg
    assert "sft.init_from='runs/tiny' does not have the config's model shape" in msg
    assert "remove the model section" in msg

    path = tmp_path / "job.yaml"
    path.write_text((ROOT / "jobs" / "dpo_tiny.yaml").read_text() + "model:\n  num_layers: 2\n  tie_embeddings: true\n")
    with pytest.raises(ConfigError) as e:
        load_config(path).adopt_model(LLAMA, "dpo.init_from")
    msg = str(e.value)
    assert str(path) in msg and "model.num_layers: config 2 vs model 3" in msg and "model.tie_embeddings: config True" in msg
    assert "dpo.init_from='runs/sft_tiny' does not" in msg


def test_explicit_keys_that_agree_are_fine_and_unset_keys_are_not_checked():
    cfg = sft("model.hidden_size=64", "model.rope_theta=5000", "model.attn_implementation=sdpa")
    cfg.adopt_model(LLAMA, "sft.init_from")
    assert cfg.model.hidden_size == 64 and cfg.model.num_layers == 3 and cfg.model.attn_implementation == "sdpa"


def test_adoption_validates_again():
    cfg = sft("train.seq_len=512", "train.global_batch_tokens=8192")  # fits the default shape, not the base's 256
    with pytest.raises(ConfigError, match="train.seq_len: 512 exceeds what the model can hold"):
        cfg.adopt_model(LLAMA, "sft.init_from")


def test_an_unsupported_model_type_is_an_error():
    with pytest.raises(ConfigError, match=r"sft.init_from='runs/tiny' is a 'gpt2' model"):
        sft().adopt_model({"model_type": "gpt2", "n_embd": 64}, "sft.init_from")


def test_explicit_keys_are_recorded_but_are_not_part_of_the_config():
    cfg = load_config(None, ["model.hidden_size=256", "data.sources.1.weight=0.5"])
    assert {"model.hidden_size", "model.num_kv_heads", "train.steps", "data.sources", "data.sources.1.weight",
            "data.sources.0.path", "run.name"} <= cfg.explicit
    assert "model.vocab_size" not in cfg.explicit and "model.rms_norm_eps" not in cfg.explicit
    assert "explicit" not in cfg.to_dict() and "model_from" not in cfg.to_dict()
    assert cfg.hash() == load_config(None, ["model.hidden_size=256", "data.sources.1.weight=0.5"]).hash()
    same = from_dict(cfg.to_dict())
    assert same == cfg and same.hash() == cfg.hash()
    assert "model.rms_norm_eps" in same.explicit  # rebuilt from to_dict(): every key was given
    assert copy.deepcopy(cfg).explicit == cfg.explicit
    with pytest.raises(ConfigError, match="unknown key 'explicit'"):
        load_config(None, ["explicit=[]"])


@pytest.mark.parametrize("overrides", [
    ["model.arch=llama"],
    ["model.arch=llama", "model.tie_embeddings=false", "model.num_kv_heads=6", "model.rope_theta=123456.0"],
    ["model.arch=smollm3", "model.nope_every=4", "model.num_layers=8", "model.rms_norm_eps=1e-6"],
    ["model.arch=smollm3", "model.num_layers=3", "model.vocab_size=500", "model.init_std=0.01"],
])
def test_a_transformers_config_round_trips_through_hf_config(overrides):
    from raysmol.model import hf_config

    a = load_config(None, ["model.hidden_size=96", "model.num_heads=6", "model.num_kv_heads=2",
                           "model.intermediate_size=160", "model.max_position_embeddings=512", *overrides])
    b = sft()  # a config with no model keys: every one comes from the base
    b.adopt_model(hf_config(a, eos_id=1).to_dict(), "sft.init_from")
    want = dataclasses.replace(a.model, vocab_size=a.vocab_size())
    assert b.model == want
