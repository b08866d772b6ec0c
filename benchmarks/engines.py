"""Engine throughput: the vLLM engine vs the transformers engine, same model, same prompts, same work.

Both engines are raysmol's own (`raysmol.serve.engines`), built in this process one after the other so they do not
compete for cores. Each generates exactly `--max-tokens` tokens for every prompt (min_tokens = max_tokens, greedy),
so the work is identical whatever the weights say; one warm-up batch first (vLLM's first call compiles and
allocates). Printed: samples/s and generated tokens/s of each, and the ratio vLLM / transformers (goal >= 2x).

The model: `--model DIR` (any Hugging Face causal LM folder), default a random-init Llama of the embedded default's
shape scaled up (hidden 256, 4 layers, ~6M parameters) with raysmol's builtin tokenizer.

    .venv/bin/python benchmarks/engines.py [--model DIR] [--prompts 64] [--max-tokens 64] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time


def default_model(folder: str) -> str:
    import torch
    import transformers

    from raysmol.data.tokenizer import resolve_tokenizer

    tok = resolve_tokenizer("builtin", os.path.expanduser("~/.cache/raysmol"))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=256, intermediate_size=1024,
                                   num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                                   max_position_embeddings=1024, tie_word_embeddings=True,
                                   eos_token_id=tok.eos_id, pad_token_id=tok.eos_id, bos_token_id=None)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(tok.hf_dir).save_pretrained(folder)
    return folder


def prompts(n: int) -> list[str]:
    r = random.Random(0)
    return [f"Question: Tom has {r.randint(2, 99)} apples and buys {r.randint(2, 99)} more. "
            f"How many apples does he have?\nAnswer:" for _ in range(n)]


def measure(kind: str, model: str, batch: list[str], max_tokens: int) -> dict:
    from raysmol.serve.engines import Sampling, make_engine

    t0 = time.perf_counter()
    engine = make_engine(kind, model, options={"dtype": "float32"})
    start = time.perf_counter() - t0
    sampling = Sampling(max_tokens=max_tokens, min_tokens=max_tokens)
    engine.generate(batch[:4], sampling)  # warm-up
    t = time.perf_counter()
    out = engine.generate(batch, sampling)
    wall = time.perf_counter() - t
    tokens = sum(len(g[0].token_ids) for g in out)
    del engine
    return {"engine": kind, "startup_s": round(start, 2), "wall_s": round(wall, 3), "samples": len(out),
            "tokens": tokens, "samples_per_s": len(out) / wall, "tokens_per_s": tokens / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a Hugging Face model folder (default: a random-init ~6M-parameter Llama)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or default_model(tmp)
        batch = prompts(args.prompts)
        rows = [measure(kind, model, batch, args.max_tokens) for kind in ("transformers", "vllm")]
    by = {r["engine"]: r for r in rows}
    ratio = by["vllm"]["samples_per_s"] / by["transformers"]["samples_per_s"]
    if args.json:
        print(json.dumps({"rows": rows, "ratio_vllm_over_transformers": ratio}, indent=1))
        return
    print(f"{args.prompts} prompts x {args.max_tokens} tokens, greedy, fixed length")
    print(f"{'engine':<14}{'start s':>9}{'samples/s':>12}{'tokens/s':>12}")
    for r in rows:
        print(f"{r['engine']:<14}{r['startup_s']:>9.1f}{r['samples_per_s']:>12.2f}{r['tokens_per_s']:>12.1f}")
    print(f"vLLM / transformers: {ratio:.2f}x (goal >= 2x)")


if __name__ == "__main__":  # vLLM spawns its engine process: the guard is required
    main()
