"""train.sample_prompts: a vibe check at every export. Rank 0 loads the export it has just written into a
transformers engine on its own device and writes greedy completions of the run's fixed prompts (through the chat
template where the tokenizer has one) to <run_dir>/samples/step_<step>.jsonl, beside the export they come from.

The prompts are read on the driver when the run starts (a bad file fails there, naming the line; workers on other
nodes may not see the driver's disk) and travel inside the hook.
"""

from __future__ import annotations

import json
import time
from typing import Any

from raysmol import storage
from raysmol.config import Config
from raysmol.serve.engines import Sampling, TransformersEngine
from raysmol.serve.prompts import has_chat_template, read_prompts, sample
from raysmol.train.hooks import Context, Hook


def samples_path(run_dir: str, step: int) -> str:
    return storage.join(run_dir, "samples", f"step_{step:08d}.jsonl")


class ExportSamples(Hook):
    def __init__(self, rows: list[dict[str, Any]], max_tokens: int):
        self.rows, self.max_tokens = rows, max_tokens

    @classmethod
    def for_config(cls, cfg: Config) -> list[Hook]:
        t = cfg.train
        return [cls(read_prompts(t.sample_prompts), t.sample_max_tokens)] if t.sample_prompts else []

    def after_export(self, ctx: Context) -> None:
        if ctx.rank != 0:
            return
        import torch

        started = time.monotonic()
        dtype = "bfloat16" if ctx.device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
        engine = TransformersEngine(storage.model_folder(ctx.export_dir), version=ctx.step,
                                    options={"device": str(ctx.device), "dtype": dtype})
        chat = has_chat_template(engine.tokenizer)
        rows = sample(engine, self.rows, Sampling(max_tokens=self.max_tokens), chat)
        del engine
        meta = {"step": ctx.step, "export": ctx.export_dir, "prompt_format": "chat" if chat else "completion"}
        uri = samples_path(ctx.run_dir, ctx.step)
        storage.write_text(uri, "".join(json.dumps({**meta, **r}) + "\n" for r in rows))
        ctx.log({"step": ctx.step, "event": "samples", "path": uri, "samples_s": round(time.monotonic() - started, 2)})
