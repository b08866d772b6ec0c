"""Seconds to sync one policy version into a pool of engines: files (a Hugging Face folder written under a run
directory, loaded by every engine) against object_store (buckets ray.put and loaded by every engine), for the
transformers and the vLLM engine. What GRPO's per-step `sync_s` measures, less the trainer's gather (the same for
both). Usage: python benchmarks/weight_sync.py MODEL_FOLDER OTHER_WEIGHTS_FOLDER [repeats] [kinds]"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch
import transformers

from raysmol.serve.pool import EnginePool
from raysmol.serve.sync import buckets


def main() -> None:
    start, other = sys.argv[1], sys.argv[2]
    repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    kinds = sys.argv[4].split(",") if len(sys.argv) > 4 else ["transformers", "vllm"]
    ray.init(address="local", num_cpus=4, log_to_driver=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(other, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(other)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # As Rollouts._put: a tied head is left out (save_pretrained leaves it out of the files too).
    sent = {k: v for k, v in sd.items() if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    mb = sum(t.numel() * t.element_size() for t in sd.values()) / 2**20
    print(f"model {Path(other).name}: {sum(t.numel() for t in sd.values()) / 1e6:.1f}M params, {mb:.1f} MiB fp32")
    for kind in kinds:
        with EnginePool(kind, start, num_engines=1, timeout_s=600, load_timeout_s=600,
                        options={"dtype": "float32"}) as pool, tempfile.TemporaryDirectory() as run:
            times: dict[str, list[float]] = {"files": [], "object_store": []}
            v = 0
            for _ in range(repeats):
                v += 1
                t = time.perf_counter()
                d = Path(run) / f"v{v:08d}"
                model.save_pretrained(d, state_dict=sd)  # as Rollouts._write: export_hf + tokenizer
                tok.save_pretrained(d)
                pool.load(str(d), v)
                times["files"].append(time.perf_counter() - t)
                v += 1
                t = time.perf_counter()
                refs = [ray.put(b) for b in buckets(sent, 256)]
                pool.sync(refs, v)
                times["object_store"].append(time.perf_counter() - t)
            for how, ts in times.items():
                print(f"{kind:12s} {how:12s} median {statistics.median(ts):.3f} s  (min {min(ts):.3f}, max "
                      f"{max(ts):.3f}, {len(ts)} syncs)", flush=True)
            ratio = statistics.median(times["object_store"]) / statistics.median(times["files"])
            print(f"{kind:12s} object_store / files: {ratio:.2f}x the time (baseline: files, same run)", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
