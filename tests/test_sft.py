"""Supervised fine-tuning end to end: the same Ray Train + DeepSpeed loop on packed conversations."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import transformers
from support import small_config

from raysmol.config import ConfigError
from raysmol import recipes


def chats(path, n: int, seed: int = 0):
    r = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = r.randint(1, 20), r.randint(1, 20)
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                                             {"role": "assistant", "content": f"{a + b}"}]}) + "\n")
    return path


def sft_config(tmp_path, small_data, base, **over):
    data = chats(tmp_path / "chat.jsonl", 300)
    return small_config(tmp_path, small_data, {"sft.data": str(data), "sft.init_from": str(base),
                                               "train.seq_len": 64, "train.steps": 10, "train.checkpoint_every": 5,
                                               **over})


def test_sft_starts_from_the_base_weights(ray_local, small_data, base, tmp_path):
    cfg = sft_config(tmp_path, small_data, base, **{"optim.lr": 1e-10, "train.steps": 2})
    recipes.run("sft", cfg, show_progress=False)
    got = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "runs" / "t" / "hf").state_dict()
    want = transformers.AutoModelForCausalLM.from_pretrained(base).state_dict()
    # A vanishing lr: the export is the base model itself (a fresh init would differ by ~0.02 everywhere).
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-7)


def test_sft_trains_on_assistant_tokens_and_exports_a_chat_model(ray_local, small_data, base, tmp_path):
    summary = recipes.run("sft", sft_config(tmp_path, small_data, base), show_progress=False)
    s = summary["sft"]
    assert s["conversations"] + s["val_conversations"] == 300 and s["truncated"] == 0
    assert s["rows"] < s["conversations"]  # packed: several conversations per row
    assert summary["final_val_loss"] < summary["initial_val_loss"]
    run = tmp_path / "runs" / "t"
    tok = transformers.AutoTokenizer.from_pretrained(run / "hf")
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|assistant|>\n")  # the chat template travels with the model
    epochs = [r["epochs"]["sft"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    assert epochs == sorted(epochs) and epochs[-1] > 0


def test_sft_refuses_a_base_of_another_shape(small_data, base, tmp_path):
    cfg = sft_config(tmp_path, small_data, base, **{"model.hidden_size": 128})
    with pytest.raises(ConfigError, match="hidden_size: config 128 vs model 64"):
        recipes.run("sft", cfg, show_progress=False)


def test_sft_tiny_job_is_valid_and_builtin_chats_are_arithmetic():
    from raysmol.config import load_config
    from raysmol.post.chat import ChatError, read_conversations

    cfg = load_config(Path(__file__).resolve().parents[1] / "jobs" / "sft_tiny.yaml")
    assert cfg.sft.data == "builtin:arithmetic-small" and cfg.sft.init_from == "runs/tiny"
    convs = read_conversations("builtin:arithmetic")
    assert len(convs) == 5000
    (_, first), = convs[:1]
    assert first[0]["role"] == "user" and first[1]["content"].endswith(".") and "The answer is" in first[1]["content"]
    with pytest.raises(ChatError, match="valid: builtin:arithmetic, builtin:arithmetic-small"):
        read_conversations("builtin:poetry")
