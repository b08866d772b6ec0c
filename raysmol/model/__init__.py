"""Config -> transformers model, and the parameter and FLOP counts that reports and MFU rely on.

Also the GPU path's model-side switches: the attention implementation (including `varlen`, PyTorch's own
variable-length flash kernel for packed documents), Liger kernels, activation checkpointing and torch.compile.
"""

from __future__ import annotations

import importlib.util
import inspect

import numpy as np
import torch
import torch.nn.functional as F
import transformers

from raysmol.config import Config, ConfigError

# Implementations that take document boundaries (cu_seq_lens_*, max_length_*) instead of a mask: a packed
# micro-batch runs as one flat sequence of documents, with no [m, 1, L, L] mask materialised.
VARLEN_IMPLEMENTATIONS = ("varlen", "flash_attention_2", "flash_attention_3")


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
    c._attn_implementation = attn_implementation(cfg)
    return c


def precision(cfg: Config) -> str:
    """bf16 or fp32 (train.precision, with auto = bf16 on GPUs, fp32 on CPUs)."""
    return ("bf16" if cfg.train.use_gpu else "fp32") if cfg.train.precision == "auto" else cfg.train.precision


def attn_implementation(cfg: Config) -> str:
    """model.attn_implementation with `auto` resolved.

    auto: on GPUs in bf16, flash-attn's varlen kernel when the package is installed, else PyTorch's own
    (`varlen`); both honour packed documents from cu_seqlens. Elsewhere SDPA, which transformers gives a
    block-diagonal mask built from the restarting position ids (correct, but a dense mask: a slower kernel).
    """
    name = cfg.model.attn_implementation
    if name != "auto":
        return name
    if not (cfg.train.use_gpu and precision(cfg) == "bf16"):
        return "sdpa"
    return "flash_attention_2" if importlib.util.find_spec("flash_attn") else "varlen"


def packed_attention_kwargs(position_ids: torch.Tensor) -> dict:
    """Document boundaries of a packed [m, L] micro-batch for variable-length attention, from its position ids.

    A document starts at every row start and wherever the position does not follow the previous one
    (transformers' own packed-sequence rule, so every implementation sees the same documents). Returns the
    flash-attention kwargs transformers forwards to attention (`cu_seq_lens_q/k` int32 [docs + 1] over the
    flattened micro-batch, `max_length_q/k` ints). Computed from host tensors, so no device sync.
    """
    pos = position_ids.detach().cpu().numpy()
    starts = np.ones(pos.shape, dtype=bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    cu = np.append(np.flatnonzero(starts.ravel()), pos.size).astype(np.int32)
    cu_t, longest = torch.from_numpy(cu), int(np.diff(cu).max())
    return {"cu_seq_lens_q": cu_t, "cu_seq_lens_k": cu_t, "max_length_q": longest, "max_length_k": longest}


def varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function `varlen`: causal attention within each packed document.

    query [b, Hq, L, D], key/value [b, Hkv, L, D] -> [b, L, Hq, D]. CUDA: torch.nn.attention.varlen.varlen_attn
    (the flash kernel bundled with PyTorch, no extra package). CPU: one SDPA call per document, the reference.
    """
    if cu_seq_lens_q is None or max_length_q is None:
        if kwargs.get("position_ids") is None or query.shape[2] != key.shape[2]:
            raise ValueError("attention 'varlen' needs document boundaries (cu_seq_lens_q, max_length_q) or position ids, "
                             "and no KV cache: train through raysmol.train.objectives; generate with sdpa")
        # Correct but slow: a device-to-host copy in every layer. raysmol.train.objectives passes them precomputed.
        boundaries = packed_attention_kwargs(kwargs["position_ids"].expand(query.shape[0], -1))
        cu_seq_lens_q, max_length_q = boundaries["cu_seq_lens_q"], boundaries["max_length_q"]
    if dropout:
        raise ValueError("attention 'varlen' has no dropout; set the model's attention_dropout to 0")
    b, hq, length, d = query.shape
    q, k, v = (x.transpose(1, 2).reshape(b * length, x.shape[1], d) for x in (query, key, value))
    cu = cu_seq_lens_q.to(q.device, non_blocking=True)
    if q.is_cuda:
        out = _cuda_varlen(q, k, v, cu, max_length_q, scaling)
    else:
        out = torch.cat([F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1),
                                                        v[s:e].transpose(0, 1), is_causal=True, scale=scaling,
                                                        enable_gqa=True).transpose(0, 1)
                         for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())])
    return out.reshape(b, length, hq, d), None


def _cuda_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, longest: int,
                 scale: float | None) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    if q.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"attention 'varlen' runs in bf16/fp16 on GPUs, got {q.dtype}: use train.precision: bf16 "
                         "or model.attn_implementation: sdpa")
    # The API grew between PyTorch releases (2.9: is_causal, no scale, no GQA; 2.12+: window_size, scale,
    # enable_gqa): ask for causal attention and fill in what this version lacks.
    params = inspect.signature(varlen_attn).parameters
    kwargs = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if "scale" in params:
        kwargs["scale"] = scale
    elif scale is not None:
        q = q * (scale * q.shape[-1] ** 0.5)  # the kernel applies 1/sqrt(head_dim)
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:  # share each KV head across its query group by hand
            k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
    return varlen_attn(q, k, v, cu, cu, longest, longest, **kwargs)


transformers.AttentionInterface.register("varlen", varlen_attention)


def build_model(cfg: Config, eos_id: int = 0, seed: int | None = None) -> transformers.PreTrainedModel:
    """A freshly initialised causal LM; the same seed gives the same weights on every rank."""
    if seed is not None:
        torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(cfg, eos_id), dtype=torch.float32)
    return model


def load_model(folder, cfg: Config) -> transformers.PreTrainedModel:
    """A Hugging Face model folder with its own config (post-training: the export then carries the base's config
    unchanged, which engines and the hub expect), attending with the config's implementation, fp32 masters."""
    c = transformers.AutoConfig.from_pretrained(folder)
    c._attn_implementation = attn_implementation(cfg)
    c.use_cache = False
    return transformers.AutoModelForCausalLM.from_pretrained(folder, config=c, dtype=torch.float32)


def prepare_for_training(model: transformers.PreTrainedModel, cfg: Config) -> transformers.PreTrainedModel:
    """The GPU path's switches, in place (state-dict keys unchanged, so checkpoints and export are unaffected):
    Liger kernels, activation checkpointing, torch.compile."""
    t = cfg.train
    if t.liger:
        apply_liger(model, cfg)
    if t.activation_checkpointing:
        # Non-reentrant checkpointing: works with inputs that need no grad and with torch.compile (PyTorch's advice).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if t.compile:
        model.compile()  # compiles forward in place; torch.compile(model) would prefix every key with _orig_mod.
    return model


FUSED_LOSS = "raysmol_fused_loss"  # set on a model whose forward computes the loss without logits (Liger FLCE)


def apply_liger(model: transformers.PreTrainedModel, cfg: Config) -> None:
    """Liger's Triton kernels on this model instance: RMSNorm, SwiGLU, RoPE and the fused linear cross-entropy
    (loss straight from the hidden states, never materialising [tokens, vocab] logits)."""
    try:
        import liger_kernel.transformers as liger
    except ImportError as e:
        raise ConfigError(f"{cfg.origin}: train.liger: needs the liger-kernel package (pip install liger-kernel; "
                          f"Triton on CUDA GPUs), which is not importable here ({e}); set train.liger: false") from e
    apply = getattr(liger, f"apply_liger_kernel_to_{model.config.model_type}", None)
    if apply is None:
        raise ConfigError(f"{cfg.origin}: train.liger: this liger-kernel has no kernels for model type "
                          f"{model.config.model_type!r} (model.arch={cfg.model.arch}); set train.liger: false")
    apply(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True, model=model)
    setattr(model, FUSED_LOSS, True)


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
