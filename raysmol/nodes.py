"""Which nodes see a local path: Ray glue for clusters whose nodes have their own disks.

A local path names a file on the driver's disk. Handed to a task or a training worker on another node it names
nothing there (or something else), and the failure surfaces late and far away: a FileNotFoundError inside a Ray
Data task, or a worker group that Ray Train restarts until `max_failures` is spent. Object-store URIs are visible
everywhere; a local path may be too (a shared filesystem, or one machine running every node). `unseen` asks every
other alive node, with one zero-CPU task each, whether it sees the same file or folder (same inode, size and
modification time), so a run can fail before any work with a message that names the key and the way out.
"""

from __future__ import annotations

import os
from typing import Any

from raysmol import storage
from raysmol.config import ConfigError


def fingerprint(path: str) -> tuple[int, int, int] | None:
    """What a node sees at `path`: (inode, size, mtime in ns), or None when nothing is there."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, (0 if os.path.isdir(path) else st.st_size), st.st_mtime_ns


def _look(paths: list[str]) -> list[tuple[int, int, int] | None]:
    return [fingerprint(p) for p in paths]


def other_nodes() -> list[dict[str, Any]]:
    """Alive nodes other than the driver's that can run work (a head started with no CPUs and no GPUs runs none)."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    return [n for n in ray.nodes() if n["Alive"] and n["NodeID"] != here
            and (n["Resources"].get("CPU", 0) > 0 or n["Resources"].get("GPU", 0) > 0)]


def unseen(paths: list[str]) -> dict[str, list[str]]:
    """{local path: addresses of the alive nodes that do not see it as the driver does}; object-store URIs and
    paths every node sees are left out. Costs nothing on a one-node cluster (a laptop)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    local = sorted({os.path.abspath(os.path.expanduser(p)) for p in paths if p and not storage.is_remote(p)})
    nodes = other_nodes() if local else []
    if not nodes:
        return {}
    want = _look(local)
    look = ray.remote(num_cpus=0, max_retries=0)(_look)
    got = ray.get([look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                   .remote(local) for n in nodes])
    out: dict[str, list[str]] = {}
    for n, seen in zip(nodes, got):
        for p, w, s in zip(local, want, seen):
            if w is not None and s != w:  # nothing here (a hub model id): each node resolves it itself
                out.setdefault(p, []).append(f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})")
    return out


def require_shared(named: dict[str, str], why: str) -> None:
    """Raise a ConfigError naming every config key in `named` ({key: path}) whose local path some alive node
    does not see; `why` says who reads it there. A path that does not exist here is not checked: create the
    folders a run writes first."""
    missing = unseen(list(named.values()))
    bad = [(k, p) for k, p in named.items() if p and os.path.abspath(os.path.expanduser(p)) in missing]
    if bad:
        lines = [f"{k}={p}: not visible from node(s) {', '.join(missing[os.path.abspath(os.path.expanduser(p))])}"
                 for k, p in bad]
        raise ConfigError(
            "a local path on the driver's disk is used on other nodes (" + why + "):\n  " + "\n  ".join(lines)
            + "\nput it on storage that every node reaches: object storage (for example "
            + f"{bad[0][0]}=s3://BUCKET/{os.path.basename(bad[0][1].rstrip('/')) or 'raysmol'}) or a filesystem "
            "mounted at the same path on every node")


def driver_pin() -> dict[str, Any]:
    """`map_batches` arguments that keep its tasks on the driver's node, with a CPU when that node has one (a head started
    with 0 CPUs still runs it, one task at a time)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    cpus = next((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["NodeID"] == here), 0)
    pin = {"scheduling_strategy": NodeAffinitySchedulingStrategy(here, soft=False)}
    return {**pin, "num_cpus": 1} if cpus >= 1 else {**pin, "num_cpus": 0, "concurrency": 1}
