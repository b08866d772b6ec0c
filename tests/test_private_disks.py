"""A Ray cluster whose worker node has its own disk: `ray start` under `unshare --mount` with the driver's cache
and temp folders as empty private mounts (tests/localray.py `private_node`), the head with no CPUs, so every
task and training worker runs on the node that cannot see the driver's files. Whatever a run hands to that node
must be a URI it can resolve itself (object storage: the moto S3 server on loopback), and a local path it cannot
see is refused before any work, naming its key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from localray import REPO, private_node, ray_head
from support import make_docs, write_docs
from transformers import AutoModelForCausalLM

from raysmol import storage

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):
    hide = [Path.home() / ".cache", tmp_path_factory.getbasetemp()]
    driver_tmp = tmp_path_factory.mktemp("driver_tmp")  # under the base temp folder: hidden from the node
    with ray_head(num_cpus=0, multi_node=True) as head, private_node(head, 2, hide):
        head.driver_tmp = driver_tmp
        yield head


def driver(head, args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """`raysmol ARGS` as a driver on the head's node (the host's view of the disks), joined to the cluster; its
    temp folder is one the node cannot see, as on another machine."""
    env = {**head.client_env(), "RAY_ADDRESS": head.gcs, "TMPDIR": str(head.driver_tmp)}
    return subprocess.run([sys.executable, "-m", "raysmol", *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


GSM8K = REPO.parent / "shared" / "data" / "gsm8k"  # read by the driver, which sends the prompts to the engine
TINY = ["jobs/tiny.yaml", "train.steps=4", "train.checkpoint_every=2", "train.eval_every=4", "optim.warmup_steps=1"]


@pytest.fixture(scope="module")
def pretrained(cluster, s3_server, tmp_path_factory) -> str:
    """The issue's first failure: the built-in corpus generated on the driver's disk, tokenized on another node;
    and one source a local file of the driver's, which only the driver's node (no CPUs) can tokenize."""
    bucket = s3_server.bucket("private")
    arithmetic = write_docs(tmp_path_factory.mktemp("driver_only") / "arithmetic.jsonl", make_docs(3, 400, "math"))
    out = driver(cluster, ["pretrain", *TINY, f"run.output_dir={bucket}/runs", f"data.cache_dir={bucket}/cache",
                           f"data.sources.2.path={arithmetic}"])
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-5000:]
    return bucket


def test_pretraining_the_embedded_corpus_on_a_node_with_its_own_disk(pretrained):
    bucket = pretrained
    summary = json.loads(storage.read_text(f"{bucket}/runs/tiny/summary.json"))
    assert summary["steps"] == 4 and summary["final_val_loss"] < summary["initial_val_loss"]
    assert storage.exists(f"{bucket}/runs/tiny/hf/model.safetensors")
    # The corpus went to the bucket and was prepared from there.
    (corpus,) = storage.listdir(f"{bucket}/cache/corpus")
    assert {"prose.jsonl", "code.jsonl", "arithmetic.jsonl", "_DONE"} <= set(storage.listdir(f"{bucket}/cache/corpus/{corpus}"))
    assert all(d["prepared"].startswith(f"{bucket}/cache/prepared/") for d in summary["data"].values())
    assert summary["data"]["arithmetic"]["tokens"] > 0 and summary["stages"][0]["sources"]["arithmetic"]["tokens"] > 0


def test_sft_and_freeform_evaluation_from_object_storage_on_a_node_with_its_own_disk(cluster, pretrained):
    """SFT starts from the pretraining run's directory on the bucket (every worker fetches its own copy); GSM8K's
    engine actor, on the node, loads the SFT export by its URI."""
    bucket = pretrained
    out = driver(cluster, ["sft", "jobs/sft_tiny.yaml", f"sft.init_from={bucket}/runs/tiny", f"run.output_dir={bucket}/runs",
                           "train.steps=2", "train.checkpoint_every=2", "train.eval_every=2", "optim.warmup_steps=1"])
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-5000:]
    summary = json.loads(storage.read_text(f"{bucket}/runs/sft_tiny/summary.json"))
    assert summary["steps"] == 2 and summary["sft"]["init_from"] == f"{bucket}/runs/tiny"  # the URI, not a node's copy
    out = driver(cluster, ["eval", f"{bucket}/runs/sft_tiny", "--task", "gsm8k", "--engine", "transformers",
                           "--limit", "2", "--shots", "0", "--max-tokens", "8", "--reference", str(GSM8K),
                           "--out", f"{bucket}/eval"])
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-5000:]
    assert "gsm8k" in out.stdout and storage.listdir(f"{bucket}/eval")


def test_a_local_path_the_node_cannot_see_is_refused_before_any_work(cluster, s3_server, tmp_path):
    bucket = s3_server.bucket("private-refused")
    cache = tmp_path / "cache"  # on the driver's disk only
    out = driver(cluster, ["pretrain", *TINY, f"run.output_dir={bucket}/runs", f"data.cache_dir={cache}"], timeout=300)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-5000:]
    assert f"data.cache_dir={cache}: not visible from node(s) {cluster.ip}" in out.stderr, out.stderr[-3000:]
    assert "object storage" in out.stderr and "run.output_dir=" not in out.stderr  # that one is on the bucket
    assert not storage.exists(f"{bucket}/runs/tiny") and not (cache / "prepared").exists()


def test_grpo_on_a_node_with_its_own_disk_survives_a_lost_engine_and_a_crash(cluster, pretrained, tmp_path):
    """GRPO's policy starts from the pretraining run on the bucket; its engine actor, reward tasks and trainer run
    on the node. Every update's weights reach the engine (its greedy tokens equal the trainer's), a killed engine
    is replaced, and a crashed worker resumes from the checkpoint, all without a path of the driver's."""
    bucket = pretrained
    prompts = tmp_path / "prompts.jsonl"  # the driver's file: the driver reads the prompts
    prompts.write_text("".join(json.dumps({"prompt": f"What is {i} + {i + 1}?", "answer": str(2 * i + 1)}) + "\n"
                               for i in range(40)))
    run = f"{bucket}/runs/grpo_tiny"
    out = driver(cluster, ["grpo", "jobs/grpo_tiny.yaml", f"grpo.init_from={bucket}/runs/tiny", f"run.output_dir={bucket}/runs",
                           f"grpo.data={prompts}", "grpo.reward=tests.grpo_rewards:digits", "grpo.group_size=4",
                           "grpo.prompts_per_step=2", "grpo.eval_prompts=4", "grpo.verify_sync=true", "optim.lr=1e-2",
                           "grpo.weight_sync=files",  # the fallback for nodes without a shared object store
                           "grpo.recompute_logps=true",  # verl's second forward (the default takes the loss's)
                           "optim.warmup_steps=0", "train.num_workers=1", "train.steps=3", "train.checkpoint_every=2",
                           "train.eval_every=3", "train.global_batch_tokens=384", "train.micro_batch_size=2",
                           "faults.kill_engine_at_step=2", "faults.crash_at_step=3"])
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-5000:]
    summary = json.loads(storage.read_text(f"{run}/summary.json"))
    assert summary["steps"] == 3 and summary["grpo"]["init_from"] == f"{bucket}/runs/tiny"  # the URI, not a node's copy
    rows = [json.loads(x) for x in storage.read_text(f"{run}/metrics.jsonl").splitlines()]
    steps = [r for r in rows if "loss" in r]
    # Rank 0 crashed after step 3's update: the run resumed from step 2's checkpoint and redid step 3.
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert [(e["resume_step"], e["steps_redone"]) for e in summary["recovery"]] == [(2, 1)]
    for r in steps:  # after each update: every engine reports the new version, greedy tokens equal the trainer's
        assert r["sync_check"] == {"version": r["step"], "engine_versions": [r["step"]], "greedy_match": True}
        assert 0 <= r["reward"] <= 1 and r["completion_tokens"] > 0
        # One update per step over four micro-batches: all on-policy, and the trainer's own log-probs make that exact.
        assert r["ratio_min"] == r["ratio_max"] == r["ratio_mean"] == 1.0 and r["clip_fraction"] == 0
        assert 0 <= r["engine_gap_mean"] <= r["engine_gap_max"] and r["logps_s"] > 0
    # Engine 0 was killed before step 2's rollout (replaced, retried); the resumed worker found the driver's
    # original engine 0 dead too and replaced it while pushing step 2's weights.
    assert [r["engine_restarts"] for r in steps] == [0, 1, 1]
    assert summary["grpo"]["sync_checks"] == 3
    assert summary["grpo"]["weight_sync"] == "files" and summary["grpo"]["sync_s_mean"] > 0
    zero = next(r for r in rows if r.get("step") == 0 and "event" not in r)  # the evaluation before step 1
    assert "eval/accuracy" in zero and "eval/accuracy_sampled" in steps[-1]
    got = AutoModelForCausalLM.from_pretrained(storage.model_folder(f"{run}/hf")).state_dict()
    start = AutoModelForCausalLM.from_pretrained(storage.model_folder(f"{bucket}/runs/tiny/hf")).state_dict()
    assert any(not torch.equal(got[k], start[k]) for k in start)  # the policy moved
    assert storage.listdir(f"{run}/policy") == ["v00000003"]  # the engines' folders, on the bucket; the latest kept


def test_an_ablation_sweep_on_a_node_with_its_own_disk_stops_a_diverging_trial(cluster, pretrained, tmp_path):
    """A sweep whose spec and baseline are the driver's files and whose trials, data and results live on the
    bucket: every trial runs on the node; ASHA stops the diverging one at a rung, and the report, plots and ledger
    are built from the bucket."""
    bucket = pretrained
    spec = tmp_path / "sweep.yaml"
    # One trial at a time: the baseline has recorded its value at every rung when the diverging trial gets there
    # (with two at once, whichever reaches a rung first is compared with nothing).
    spec.write_text(f"""name: private
output_dir: {bucket}/ablations
baseline: {REPO / 'jobs' / 'tiny.yaml'}
overrides: {{train.steps: 8, train.eval_every: 2, train.checkpoint_every: 4, optim.warmup_steps: 1,
            train.zero_stage: 0, data.cache_dir: {bucket}/cache}}
variants:
  - name: lr_x300
    reason: a learning rate 300x the baseline's diverges; ASHA stops it
    changes: {{optim.lr: 1.0}}
seeds: [0]
metric: {{name: val_loss, mode: min}}
budget: {{steps: 8}}
scheduler: {{grace_period: 2, reduction_factor: 2, margin: 0.1}}
resources: {{workers: 1, max_concurrent_trials: 1}}
""")
    out = driver(cluster, ["ablate", str(spec)])
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-5000:]
    sweep = f"{bucket}/ablations/private"
    trials = {t["name"]: t for t in json.loads(storage.read_text(f"{sweep}/trials.json"))}
    assert trials["baseline-s0"]["status"] == "completed" and trials["baseline-s0"]["history"][-1][0] == 8
    bad = trials["lr_x300-s0"]
    assert bad["status"] == "stopped" and bad["stopped_at_step"] < 8, bad
    at = dict(trials["baseline-s0"]["history"])  # the diverging trial's loss at the rung: far above the baseline's
    assert bad["history"][-1][1] > at[bad["stopped_at_step"]] + 0.1
    assert "stopped early by ASHA" in out.stdout and f"seed 0 at step {bad['stopped_at_step']}" in out.stdout
    md = storage.read_text(f"{sweep}/report.md")
    assert "lr_x300" in md and "## Compute (ledger)" in md
    for png in ("curves.png", "metric.png"):
        assert len(storage.read_bytes(f"{sweep}/plots/{png}")) > 5000
    for name, t in trials.items():  # both trials' compute is booked as ablation, in their run directories
        assert t["run_dir"] == f"{sweep}/trials/{name}"
        recs = [json.loads(x) for x in storage.read_text(f"{t['run_dir']}/ledger.jsonl").splitlines()]
        assert [r["category"] for r in recs] == ["ablation"] and recs[0]["device_hours"] > 0
    assert json.loads(storage.read_text(f"{sweep}/trials/lr_x300-s0/ledger.jsonl"))["status"] == "stopped"
