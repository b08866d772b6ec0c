"""A GGUF file (llama.cpp's format: quantized weights, tokenizer and chat template in one file) -> an ordinary
Hugging Face model folder that training, engines and evaluation open like any other.

transformers reads GGUF itself (with the `gguf` package) and de-quantizes the weights into a float model; what it
leaves in the config is a `quantization_config` naming GGUF, which would make the saved folder claim to be
quantized, so it is dropped before saving."""

from __future__ import annotations

from pathlib import Path

from raysmol.model.folder import ModelFolderError


def gguf_to_hf(gguf: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    """Write `gguf` as a save_pretrained folder (weights in `dtype`, tokenizer, chat template) at `out`."""
    import torch
    import transformers

    gguf = Path(gguf)
    if not gguf.is_file() or gguf.suffix != ".gguf":
        raise ModelFolderError(f"{gguf}: not a .gguf file")
    try:
        import gguf as _  # noqa: F401  transformers' reader needs it
    except ImportError as e:
        raise ModelFolderError(f"{gguf}: reading GGUF needs the gguf package (pip install gguf)") from e
    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype))
    # The weights are de-quantized floats now: nothing of GGUF's quantization stays (save_pretrained refuses a
    # model with a quantizer attached, and a config naming one would be loaded as quantized).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
