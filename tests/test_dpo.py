"""DPO: the loss against a hand computation, pair data, and a run on the same loop that raises the margin."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from support import small_config

from raysmol.config import ConfigError
from raysmol.post.chat import ChatError
from raysmol.post.preference import builtin_pairs, pair_conversations, pair_rows, read_pairs
from raysmol import recipes
from raysmol.post.dpo import dpo
from raysmol.train.objectives import IGNORE


def pairs_file(path: Path, n: int, seed: int = 0) -> Path:
    """A preference a model of any size can learn: an answer (chosen) over a refusal (rejected)."""
    r = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = r.randint(1, 20), r.randint(1, 20)
            f.write(json.dumps({"prompt": f"What is {a} + {b}?", "chosen": f"It is {a + b}.",
                                "rejected": r.choice(["I do not know.", "No idea, sorry."])}) + "\n")
    return path


def test_dpo_loss_on_two_pairs_equals_a_hand_computation():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32))
    # Rows: chosen 0, rejected 0, chosen 1, rejected 1; a 3-token prompt, replies of different lengths.
    seqs = [[5, 6, 7, 10, 11, 2], [5, 6, 7, 12, 2], [8, 9, 7, 13, 14, 15, 2], [8, 9, 7, 16, 2]]
    masks = [np.array([0, 0, 0] + [1] * (len(s) - 3), dtype=bool) for s in seqs]
    rows = pair_rows([((np.array(seqs[0]), masks[0]), (np.array(seqs[1]), masks[1])),
                      ((np.array(seqs[2]), masks[2]), (np.array(seqs[3]), masks[3]))], seq_len=8, pad_id=0)
    ref = torch.tensor([-10.0, -12.0, -9.0, -8.5], dtype=torch.float64)
    batch = rows.batch(np.arange(4))
    batch.extras = {"ref_logps": ref}
    beta = 0.3
    loss, metrics = dpo(model, batch, beta)

    def logp(seq):  # each sequence alone, no padding: sum of log p(token | prefix) over the reply's tokens
        logits = model(torch.tensor([seq])).logits[0].double()
        return sum(F.log_softmax(logits[j - 1], -1)[seq[j]] for j in range(3, len(seq)))

    pol = [logp(s) for s in seqs]
    margins = [beta * ((pol[0] - ref[0]) - (pol[1] - ref[1])), beta * ((pol[2] - ref[2]) - (pol[3] - ref[3]))]
    want = sum(-math.log(1 / (1 + math.exp(-float(m)))) for m in margins) / 2
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert float(metrics["reward_margin"]) == pytest.approx(float(sum(margins)) / 2, rel=1e-5)
    assert float(metrics["reward_accuracy"]) == sum(float(m) > 0 for m in margins) / 2
    assert (batch.labels[:, :2] == IGNORE).all()  # prompt tokens predict nothing


def test_pair_data_formats_and_errors(tmp_path):
    chosen, rejected = pair_conversations({"prompt": "2+2?", "chosen": "4", "rejected": "5"}, "x")
    assert chosen == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert rejected[-1]["content"] == "5"
    convo = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert pair_conversations({"chosen": convo, "rejected": convo}, "x")[0] == convo  # hub layout: whole chats
    with pytest.raises(ChatError, match="f.jsonl:3: a preference pair needs rejected"):
        pair_conversations({"prompt": "q", "chosen": "a"}, "f.jsonl:3")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\nnot json\n')
    with pytest.raises(ChatError, match="bad.jsonl:2: not valid JSON"):
        read_pairs(str(bad))
    import re

    for spec in ("builtin:arithmetic-small", "builtin:arithmetic"):
        for _, good, wrong in builtin_pairs(spec, n=50):
            assert good[:-1] == wrong[:-1] and good[-1] != wrong[-1]
            # Only the result differs: the same text once numbers are masked, the same operands.
            mask = lambda t: re.sub(r"-?\d+", "N", t)  # noqa: E731
            assert mask(good[-1]["content"]) == mask(wrong[-1]["content"])
            if spec == "builtin:arithmetic":  # worked solutions: everything before the last result is kept
                assert good[-1]["content"].rsplit("= ", 1)[0] == wrong[-1]["content"].rsplit("= ", 1)[0]


def dpo_config(tmp_path, small_data, base, **over):
    return small_config(tmp_path, small_data, {
        "dpo.data": str(pairs_file(tmp_path / "pairs.jsonl", 400)), "dpo.init_from": str(base), "dpo.beta": 0.5,
        "optim.lr": 3e-3, "optim.weight_decay": 0.0, "train.seq_len": 32, "train.global_batch_tokens": 512,
        "train.micro_batch_size": 4, "train.steps": 16, "train.checkpoint_every": 8, "train.eval_every": 8,
        "train.eval_batches": 2, **over})


def test_dpo_run_starts_at_log2_and_raises_the_margin(ray_local, small_data, base, tmp_path):
    summary = recipes.run("dpo", dpo_config(tmp_path, small_data, base), show_progress=False)
    assert summary["dpo"]["pairs"] + summary["dpo"]["val_pairs"] == 400 and summary["dpo"]["dropped"] == 0
    # Policy == reference at step 0: every implicit reward is 0 and the loss is exactly log 2.
    assert summary["initial_val_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert summary["first_loss"] == pytest.approx(math.log(2), abs=1e-5)
    rows = [json.loads(line) for line in (tmp_path / "runs" / "t" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val_reward_margin" in r]
    assert [r["step"] for r in val] == [0, 8, 16]
    assert val[0]["val_reward_margin"] == pytest.approx(0, abs=1e-5)
    assert val[-1]["val_reward_margin"] > 0.5 and val[-1]["val_reward_accuracy"] > 0.9
    assert summary["final_val_loss"] < math.log(2)
    train = [r for r in rows if "reward_margin" in r]
    assert np.mean([r["reward_margin"] for r in train[-4:]]) > np.mean([r["reward_margin"] for r in train[:4]])
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "runs" / "t" / "hf") is not None


def test_an_apo_run_lowers_held_out_loss(ray_local, small_data, base, tmp_path):
    """dpo.loss picks the objective; nothing else changes. APO-zero (SmolLM3's) starts at exactly 1 (policy ==
    reference: 1 - sigmoid(0) + sigmoid(0)) and training lowers it on held-out pairs while the margin grows."""
    summary = recipes.run("dpo", dpo_config(tmp_path, small_data, base, **{"dpo.loss": "apo_zero"}),
                          show_progress=False)
    assert summary["initial_val_loss"] == pytest.approx(1.0, abs=1e-5)
    assert summary["final_val_loss"] < 1.0 - 0.05
    rows = [json.loads(line) for line in (tmp_path / "runs" / "t" / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in rows if "val_reward_margin" in r][-1]["val_reward_margin"] > 0.2


def test_post_training_modes_are_exclusive_and_dpo_needs_a_model(small_data, tmp_path):
    with pytest.raises(ConfigError, match="sft.data and dpo.data are all set"):
        small_config(tmp_path, small_data, {"sft.data": "a.jsonl", "sft.init_from": "m", "dpo.data": "b.jsonl",
                                            "dpo.init_from": "m"})
    with pytest.raises(ConfigError, match="dpo.init_from"):
        small_config(tmp_path, small_data, {"dpo.data": "b.jsonl"})
    with pytest.raises(ConfigError, match="dpo.beta"):
        small_config(tmp_path, small_data, {"dpo.data": "b.jsonl", "dpo.init_from": "m", "dpo.beta": 0})


def test_dpo_tiny_job_is_valid():
    from raysmol.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "jobs" / "dpo_tiny.yaml")
    assert cfg.post_training() == "dpo" and cfg.dpo.init_from == "runs/sft_tiny"
