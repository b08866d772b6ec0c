"""The Ray runtime: join the cluster a job runs in, or start a local one."""

from __future__ import annotations

import os


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in RAY_ADDRESS (as under `ray job submit`), else start a local one."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        # Logical CPUs may exceed physical cores: each worker pins torch to cpu_threads_per_worker threads.
        ray.init(address="local", num_cpus=num_cpus or max(4, os.cpu_count() or 1), log_to_driver=True)
