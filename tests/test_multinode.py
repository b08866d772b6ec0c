"""A pretraining run on three Ray nodes on this machine (a head and two worker nodes): one Ray Train worker on
each worker node, both writing into one checkpoint on shared object storage (the moto S3 server on loopback).

The cluster lives in a child process (tests/multinode_run.py): `ray.cluster_utils.Cluster` must own its main
thread and must never meet the pytest session's own `ray.init`. Its RAY_TMPDIR, ports and token are private,
and whatever it leaves behind is killed by that RAY_TMPDIR, whether the run passed, failed or timed out."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import small_config
from localray import clean_env, kill_under, new_tmpdir

from raysmol import storage

HELPER = Path(__file__).with_name("multinode_run.py")
RUN_TIMEOUT_S = 420


@pytest.mark.slow
def test_pretraining_spreads_over_two_worker_nodes_sharing_s3_storage(tmp_path, small_data, s3_server):
    bucket = s3_server.bucket("multinode")
    cfg = small_config(tmp_path, small_data, {"run.name": "mn", "run.output_dir": f"{bucket}/runs"})
    config, result = tmp_path / "mn.yaml", tmp_path / "result.json"
    config.write_text(cfg.to_yaml())

    ray_tmp = new_tmpdir()
    started = time.monotonic()
    try:
        out = subprocess.run([sys.executable, str(HELPER), str(config), str(result)],
                             env=clean_env(ray_tmp, secrets.token_hex(32)), capture_output=True, text=True,
                             timeout=RUN_TIMEOUT_S)
    finally:
        kill_under(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    took = time.monotonic() - started
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]

    run = json.loads(result.read_text())
    # One worker on each worker node, none on the head (which has no CPUs to give).
    assert sorted(run["train_worker_nodes"]) == sorted(run["worker_nodes"]), run
    assert len(set(run["worker_nodes"])) == 2 and run["head_node"] not in run["train_worker_nodes"]

    summary = run["summary"]
    assert summary["steps"] == cfg.train.steps
    # Both ranks' ZeRO shards landed in the same checkpoint folder on the shared bucket ...
    shards = storage.listdir(storage.join(summary["checkpoint"], "ds"))
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(shards)
    state = json.loads(storage.read_text(storage.join(summary["checkpoint"], "state.json")))
    assert state["step"] == cfg.train.steps and state["world_size"] == 2
    # ... and the export that eval and serving read is there too.
    assert storage.exists(storage.join(summary["export"], "model.safetensors"))
    print(f"multi-node run (3 nodes, 2 workers, {cfg.train.steps} steps, S3 storage), end to end: {took:.1f} s")
