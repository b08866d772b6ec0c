"""Autoscaling for real: Ray's own autoscaler (v2, as cluster/aws.yaml, gcp.yaml and kuberay/ run it, in the head's
monitor process) on its fake multi-node provider, which starts and stops real raylets on this machine.

One cluster for both scenarios: a head with no CPU, as in cluster/ (every training worker lands on a node the
autoscaler launched; the driver, Ray Train's controller, raysmol's progress actor and Ray's AutoscalingCoordinator
all take 0 CPUs and stay on the head), and one type of 1-CPU worker nodes.

A. Grow from zero, shrink after: a fixed 2-worker run is submitted to the empty cluster (worker type min 0, max 2).
   Its demand (Ray Data's tokenizing task, then Ray Train's resource request through the AutoscalingCoordinator
   and its placement group) makes the autoscaler launch 2 nodes; the run trains at world size 2; the idle nodes
   are terminated idle_timeout_minutes after it.
B. Elastic growth onto a late node: the worker type is set to min 1, max 1 (the autoscaler re-reads its config file
   on every update); an elastic run (min_workers=1, num_workers=2) starts on that one node. At step 6 it pauses
   (faults.pause_at_step) and max goes to 2: the autoscaler launches a second node, Ray Train's
   ElasticScalingPolicy sees it and restarts the run at world size 2 from checkpoint 4, and every step's loss
   stays on run A's curve (the same config at a fixed 2 workers). Min goes back to 0 and both nodes are removed.

The driver runs in a child process (this file as a script) so the pytest session's own Ray stays out of it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from localray import Head, _head_command, clean_env, free_port, kill_under, new_tmpdir, outward_ip

FAKE_HEAD_NODE_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"  # ray's fake_multi_node provider
WORKER_TYPE = "ray.worker.cpu"
IDLE_TIMEOUT_MIN = 0.1  # 6 s (cluster/ configs: 10 minutes, for GPU nodes that take minutes to boot)
# Ray Train checks an elastic run for room to grow every train.elastic_resize_interval_s (60 s by default): lowered
# so a resize comes seconds after the node does.
RESIZE_INTERVAL_S = 2.0
STEPS, CHECKPOINT_EVERY, PAUSE_AT = 10, 4, 6
COMMON = [f"train.steps={STEPS}", f"train.checkpoint_every={CHECKPOINT_EVERY}", "train.keep_checkpoints=3",
          "train.eval_every=0", "train.log_every=1", "train.max_failures=2", "optim.warmup_steps=2",
          "run.name=t"]
TOLERANCE = 1e-4  # test_resilience.py's test_a_new_world_size_resumes_on_the_same_loss_curve


def autoscaler_config(gcs: str, max_nodes: int) -> dict:
    """Ray's fake_multi_node/example.yaml (not shipped in the wheel) with a CPU-less head and one 1-CPU type."""
    return {
        "cluster_name": "raysmol-autoscaling-test",
        "max_workers": 3,
        # "external" + module: the provider class of type fake_multinode, whose defaults file (example.yaml) autoscaler
        # v2 reads (prepare_config) but the ray wheel does not ship. launch_multiple and head_node_id: what v2 needs
        # from this provider (as ray.cluster_utils.AutoscalingCluster(autoscaler_v2=True) sets them).
        "provider": {"type": "external",
                     "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
                     "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs, "launch_multiple": True,
                     "head_node_id": FAKE_HEAD_NODE_ID},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            WORKER_TYPE: {"resources": {"CPU": 1, "object_store_memory": 256 * 1024**2}, "node_config": {},
                          "min_workers": 0, "max_workers": max_nodes},
        },
        "head_node_type": "ray.head.default",
        "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": IDLE_TIMEOUT_MIN, "docker": {},
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
    }


def set_node_type(path: Path, min_nodes: int, max_nodes: int) -> None:
    """Change the worker type's bounds: the autoscaler re-reads its config file on every update (v2:
    FileConfigReader.refresh_cached_autoscaling_config, called from Autoscaler.update_autoscaling_state)."""
    cfg = json.loads(path.read_text())
    cfg["available_node_types"][WORKER_TYPE].update(min_workers=min_nodes, max_workers=max_nodes)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cfg))
    os.replace(tmp, path)  # the monitor reads it whole or not at all


@contextmanager
def autoscaling_head(max_nodes: int):
    """`ray start --head --autoscaling-config` with the fake provider, on this machine's outward address (the fake
    nodes register with it), token auth, private temp dir and ports. Ray's AutoscalingCluster would do this with
    `ray stop --force`, which kills every Ray on the machine; this kills only this cluster's processes (the fake
    nodes are children of the head's monitor and inherit its RAY_TMPDIR)."""
    import secrets

    ip = outward_ip()
    tmpdir = new_tmpdir()
    token = secrets.token_hex(32)
    gcs_port, dashboard_port = free_port(), free_port()
    gcs = f"{ip}:{gcs_port}"
    config = tmpdir / "autoscaler.json"
    config.write_text(json.dumps(autoscaler_config(gcs, max_nodes)))
    # Autoscaler v2, as cluster/aws.yaml, gcp.yaml and the KubeRay manifests run it; the head's node id is the one
    # the fake provider calls the head (ray.cluster_utils.AutoscalingCluster(autoscaler_v2=True) does the same).
    env = clean_env(tmpdir, token, True, RAY_ADDRESS=gcs, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1",
                    RAY_enable_autoscaler_v2="1", RAY_CLOUD_INSTANCE_ID=FAKE_HEAD_NODE_ID,
                    RAY_OVERRIDE_NODE_ID_FOR_TESTING=FAKE_HEAD_NODE_ID)
    try:
        cmd = [*_head_command(tmpdir, 0, gcs_port, dashboard_port, ip), f"--autoscaling-config={config}"]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"ray start --head failed ({out.returncode}):\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
        yield Head(tmpdir, token, f"http://{ip}:{dashboard_port}", gcs, ip), config
    finally:
        kill_under(tmpdir)
        shutil.rmtree(tmpdir, ignore_errors=True)


@pytest.mark.slow
def test_runs_grow_the_cluster_from_zero_and_an_elastic_run_grows_onto_a_late_node(tmp_path):
    with autoscaling_head(max_nodes=2) as (head, config):
        # A worker group that waits longer than 60 s (Ray Train's default) for its nodes is retried (a retryable
        # controller error, unlimited); a longer wait keeps a slow 2-core machine from going round that loop.
        env = {**head.client_env(), "RAY_ADDRESS": head.gcs, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
               "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "180"}
        proc = subprocess.run([sys.executable, __file__, str(tmp_path), str(config)], env=env, capture_output=True,
                              text=True, timeout=900)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            log = (head.tmpdir / "session_latest" / "logs" / "monitor.log")
            tail = "".join(x for x in (log.read_text().splitlines(True) if log.exists() else [])
                           if "legacy field" not in x)[-4000:]
            pytest.fail(f"driver failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}\n"
                        f"monitor.log:\n{tail}")
    r = json.loads(line[len("RESULT "):])
    print(json.dumps({k: {x: y for x, y in v.items() if x != "losses"} for k, v in r.items()}, indent=1))
    a, b = r["a"], r["b"]
    # benchmarks/recovery.py --only fresh_nodes reads this line
    print("FRESH_NODES " + json.dumps({"submit_to_first_step_s": a["submit_to_first_step_s"],
                                       "prepare_s": a["prepare_s"], "nodes_removed_after_s": a["removed_after_s"],
                                       "grown_first_step_after_allowed_s": b["grown_first_step_s"] - b["second_node_allowed_s"]}))

    # A: zero nodes before, the autoscaler launched 2 for the run, trained at world size 2, removed them after.
    assert a["nodes_before"] == 0 and a["max_nodes_during"] == 2
    assert [s["world_size"] for s in a["starts"]] == [2] and a["recovery"] == []
    assert [x["step"] for x in a["losses"]] == list(range(1, STEPS + 1))
    assert a["nodes_after"] == 0, "idle nodes were not removed"

    # B: started on the one node there was, grew to 2 once the second arrived, resumed from a checkpoint.
    assert b["nodes_before"] == 1 and b["max_nodes_during"] == 2
    sizes = [s["world_size"] for s in b["starts"]]
    assert sizes[0] == 1 and sizes[-1] == 2, sizes
    grown = b["starts"][-1]
    assert b["recovery"][-1]["failure"] == "elastic resize: 1 -> 2 workers (room for more)", b["recovery"]
    assert grown["step"] % CHECKPOINT_EVERY == 0 and grown["step"] <= PAUSE_AT, grown
    assert b["final_step"] == STEPS
    # The same trajectory: every step's loss, before and after the resize, on run A's curve (a fixed 2 workers).
    ref = {x["step"]: x["loss"] for x in a["losses"]}
    after = [x for x in b["losses"] if x["after_resize"]]
    assert [x["step"] for x in after] == list(range(grown["step"] + 1, STEPS + 1))
    for x in b["losses"]:
        assert abs(x["loss"] - ref[x["step"]]) < TOLERANCE, (x, ref[x["step"]])


# ------------------------------------------------------------------------------------------- the driver (child)


def _drive(out: Path, config: Path) -> dict:
    import ray

    from raysmol.config import load_config
    from raysmol.recipes import pretrain

    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)

    def workers() -> int:
        return sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0)

    def wait_for(cond, timeout: float, what: str) -> float:
        t0 = time.time()
        while not cond():
            if time.time() - t0 > timeout:
                raise TimeoutError(f"{what}: not within {timeout:.0f} s (worker nodes: {workers()})")
            time.sleep(0.5)
        return time.time() - t0

    def watch(stop: threading.Event, seen: list[tuple[float, int]]) -> None:
        """(time, worker nodes) at each change."""
        while not stop.is_set():
            n = workers()
            if not seen or seen[-1][1] != n:
                seen.append((time.time(), n))
            time.sleep(0.25)

    def scenario(name: str, overrides: list[str], during=None, after=None) -> dict:
        run = out / name
        cfg = load_config(None, [*COMMON, f"run.output_dir={run}", f"data.cache_dir={out / 'cache'}", *overrides])
        res = {"nodes_before": workers()}
        stop, seen = threading.Event(), []
        threads = [threading.Thread(target=watch, args=(stop, seen), daemon=True)]
        if during is not None:
            threads.append(threading.Thread(target=during, args=(run / "t",), daemon=True))
        for t in threads:
            t.start()
        submitted = time.time()
        try:
            summary = pretrain(cfg, show_progress=False)
        finally:
            stop.set()
        ended = time.time()
        rows = [json.loads(x) for x in (run / "t" / "metrics.jsonl").read_text().splitlines()]
        starts = [r for r in rows if r.get("event") == "start"]
        last_start = max(i for i, r in enumerate(rows) if r.get("event") == "start")
        first_step = next(r for r in rows if "loss" in r)
        submit_row = next(r for r in rows if r.get("event") == "submit")
        res.update(max_nodes_during=max(n for _, n in seen),
                   node_changes=[(round(t - submitted, 1), n) for t, n in seen],
                   starts=[{"step": r["step"], "world_size": r["world_size"], "at_s": round(r["time"] - submitted, 1)}
                           for r in starts],
                   recovery=summary["recovery"], final_step=summary["steps"],
                   losses=[{"step": r["step"], "loss": r["loss"], "after_resize": i > last_start}
                           for i, r in enumerate(rows) if "loss" in r],
                   prepare_s=submit_row["time"] - submitted,  # tokenizing (run A) before Ray Train is called
                   submit_to_first_step_s=first_step["time"] - submitted,
                   grown_first_step_s=rows[last_start + 1]["time"] - submitted, wall_s=ended - submitted)
        # Idle nodes go: the autoscaler terminates them idle_timeout_minutes after their last use.
        res["submitted"] = submitted
        if after is not None:
            after()
        res["removed_after_s"] = wait_for(lambda: workers() == 0, 120, "idle worker nodes removed")
        res["nodes_after"] = workers()
        return res

    out_a = scenario("a", [])

    def grow_later(run_dir: Path) -> None:
        """At the pause (world size 1), let the second node come; rank 1 of the grown run must not pause again."""
        marker = run_dir / "faults" / f"pause_at_step-{PAUSE_AT}-rank0"
        deadline = time.time() + 600
        while not marker.exists() and time.time() < deadline:
            time.sleep(0.2)
        (run_dir / "faults" / f"pause_at_step-{PAUSE_AT}-rank1").write_text("{}")
        set_node_type(config, 1, 2)
        allowed.append(time.time())

    # One node there (min_workers 1) and no room for a second (max_workers 1). Not max_workers 1 from zero: autoscaler
    # v2 drops a resource request it cannot meet in full (scheduler.py _enforce_resource_constraints), and the
    # elastic run asks for num_workers bundles and creates no placement group before it has min_workers, so on an
    # empty cluster capped below num_workers nothing would ever start.
    allowed: list[float] = []
    set_node_type(config, 1, 1)
    wait_for(lambda: workers() == 1, 120, "the one node of run B")
    out_b = scenario("b", ["train.min_workers=1", f"train.elastic_resize_interval_s={RESIZE_INTERVAL_S}",
                           f"faults.pause_at_step={PAUSE_AT}", "faults.pause_seconds=300"],
                     during=grow_later, after=lambda: set_node_type(config, 0, 2))
    out_b["second_node_allowed_s"] = round(allowed[0] - out_b.pop("submitted"), 1)
    out_a.pop("submitted")
    return {"a": out_a, "b": out_b}


if __name__ == "__main__":
    print("RESULT " + json.dumps(_drive(Path(sys.argv[1]), Path(sys.argv[2]))), flush=True)
