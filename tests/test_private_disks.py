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
from localray import REPO, private_node, ray_head
from support import make_docs, write_docs

from raysmol import storage

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):
    hide = [Path.home() / ".cache", tmp_path_factory.getbasetemp()]
    with ray_head(num_cpus=0, multi_node=True) as head, private_node(head, 2, hide):
        yield head


def driver(head, args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """`raysmol ARGS` as a driver on the head's node (the host's view of the disks), joined to the cluster."""
    return subprocess.run([sys.executable, "-m", "raysmol", *args], env={**head.client_env(), "RAY_ADDRESS": head.gcs},
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


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
