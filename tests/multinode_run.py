"""A pretraining run on a three-node Ray cluster on this machine; run as a script, in its own process.

    python tests/multinode_run.py CONFIG.yaml RESULT.json

The head has no CPUs and each worker node one, so a 2-worker run has to put one Ray Train worker on each worker
node (as 16 GPU workers must span two 8-GPU nodes). The Ray Train controller (0 CPUs, pinned to the driver's
node) and the driver stay on the head. RESULT.json gets the run's summary and, from Ray's state API, the node
every training worker ran on. Its own process because `ray.cluster_utils.Cluster` must own the main thread and
must not meet the pytest session's `ray.init`; the caller sets RAY_TMPDIR and kills what is left by it.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from raysmol.config import load_config
from raysmol.recipes import pretrain

LOOPBACK = "127.0.0.1"
WORKER_NODES = 2


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def start_cluster() -> tuple[Cluster, str, list[str]]:
    """Head (0 CPUs) and WORKER_NODES worker nodes with 1 CPU each; returns the cluster and the node ids."""
    gcs = f"{LOOPBACK}:{free_port()}"
    # Ray's internals (Ray Train's placement-group cleaner, the state API) look for "the" cluster by scanning
    # this machine's processes and take the newest; RAY_ADDRESS, inherited by every process started below,
    # keeps them on this one while other Rays (the pytest session's) run beside it.
    os.environ["RAY_ADDRESS"] = gcs
    # Fixed ports collide with another Ray on the machine (8265, 52365): every listening port is a free one.
    head = {"num_cpus": 0, "node_ip_address": LOOPBACK, "gcs_server_port": int(gcs.rpartition(":")[2]),
            "include_dashboard": True, "dashboard_host": LOOPBACK, "dashboard_port": free_port(),
            "dashboard_agent_listen_port": free_port()}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    workers = [cluster.add_node(num_cpus=1, node_ip_address=LOOPBACK, dashboard_agent_listen_port=free_port())
               for _ in range(WORKER_NODES)]
    cluster.wait_for_nodes()
    return cluster, cluster.head_node.node_id, [n.node_id for n in workers]


def train_worker_nodes() -> list[str]:
    """Node id of every Ray Train worker actor this session started (dead ones included: the run is over)."""
    actors = list_actors(address=os.environ["RAY_ADDRESS"], filters=[("class_name", "=", "RayTrainWorker")],
                         detail=True, limit=1000, raise_on_missing_output=False)
    return [a.node_id for a in actors]


def main(config_path: str, result_path: str) -> None:
    cfg = load_config(config_path)
    cluster, head, workers = start_cluster()
    try:
        ray.init(address=cluster.address)
        summary = pretrain(cfg, show_progress=False)
        result = {"summary": summary, "head_node": head, "worker_nodes": workers,
                  "train_worker_nodes": train_worker_nodes()}
        Path(result_path).write_text(json.dumps(result, indent=1))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
