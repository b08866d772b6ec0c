"""Config -> transformers model, and the parameter and FLOP counts that reports and MFU rely on."""

from __future__ import annotations

import torch
import transformers

from raysmol.config import Config


def hf_config(cfg: Config, eos_id: int = 0) -> transformers.PretrainedConfig:
    """The transformers config for `cfg.model` (Llama, or SmolLM3 when NoPE layers are wanted)."""
    m = cfg.model
    common = dict(
        vocab_size=cfg.vocab_size(),
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads,
        max_position_embeddings=m.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
        tie_word_embeddings=m.tie_embeddings,
        rms_norm_eps=m.rms_norm_eps,
        initializer_range=m.init_std,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        use_cache=False,
    )
    if m.arch == "smollm3":
        # SmolLM3 drops RoPE on every `no_rope_layer_interval`-th layer; interval 0 would divide by zero,
        # so "RoPE everywhere" is spelled as an explicit all-ones list.
        if m.nope_every:
            c = transformers.SmolLM3Config(no_rope_layer_interval=m.nope_every, **common)
        else:
            c = transformers.SmolLM3Config(no_rope_layers=[1] * m.num_layers, **common)
    else:
        c = transformers.LlamaConfig(**common)
    c._attn_implementation = m.attn_implementation
    return c


def build_model(cfg: Config, eos_id: int = 0, seed: int | None = None) -> transformers.PreTrainedModel:
    """A freshly initialised causal LM; the same seed gives the same weights on every rank."""
    if seed is not None:
        torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(cfg, eos_id), dtype=torch.float32)
    return model


def nope_layers(cfg: Config) -> list[int]:
    """Indices of layers without rotary embeddings (SmolLM3 convention: every k-th, 1-based)."""
    k = cfg.model.nope_every
    return [i for i in range(cfg.model.num_layers) if k and (i + 1) % k == 0]


def param_count(cfg: Config) -> int:
    """Parameters by formula; tests check it equals what transformers counts for the same config."""
    m = cfg.model
    h, v, head = m.hidden_size, cfg.vocab_size(), m.hidden_size // m.num_heads
    attn = h * (m.num_heads * head) * 2 + h * (m.num_kv_heads * head) * 2  # q, o; k, v
    mlp = 3 * h * m.intermediate_size  # gate, up, down (SwiGLU)
    per_layer = attn + mlp + 2 * h  # two RMSNorms
    embed = v * h * (1 if m.tie_embeddings else 2)
    return embed + m.num_layers * per_layer + h


def flops_per_token(cfg: Config) -> float:
    """Training FLOPs per token (forward + backward), the PaLM appendix-B convention.

    6 x (matmul parameters, including the LM head even when tied, excluding the input embedding lookup)
    plus 12 x layers x hidden x sequence for the attention score and value products (counted in full,
    without the causal half, as PaLM and most MFU reports do).
    """
    m = cfg.model
    h, v, head = m.hidden_size, cfg.vocab_size(), m.hidden_size // m.num_heads
    attn = h * (m.num_heads * head) * 2 + h * (m.num_kv_heads * head) * 2
    mlp = 3 * h * m.intermediate_size
    matmul_params = m.num_layers * (attn + mlp) + v * h
    attention = 12 * m.num_layers * (m.num_heads * head) * cfg.train.seq_len
    return 6.0 * matmul_params + attention
