"""The run's process logs in its run directory: <run_dir>/logs/<Actor>-<pid>.out|err for every actor of this
driver's job (Ray Train's controller and workers, GRPO's engines), dead ones included (a crashed worker's
traceback is what one looks for). The actors come from Ray's state API (the GCS); their logs are read from this
node's Ray log folder when they ran here, else fetched through the state API from the node that ran them (that
needs the node's dashboard agent, which does not start when another Ray on the same machine holds its port).

By default the console shows none of it (`init_ray` turns off log_to_driver; `raysmol --verbose` turns it back on),
so this is where DeepSpeed's, torch's and Ray's worker output goes. Best effort: a log that cannot be fetched is
noted, never a reason to fail a run.
"""

from __future__ import annotations

import logging

from raysmol import storage

log = logging.getLogger(__name__)

MAX_BYTES = 4 << 20  # the tail of each log: a week-long run's stdout must not become a run-directory problem
_HEADER = (":job_id:", ":actor_name:", ":task_name:")


def collect(run_dir: str) -> str | None:
    """Write this job's actor logs under <run_dir>/logs; returns that folder (None when Ray's state API is off)."""
    import ray
    from ray.util.state import get_log, list_actors

    job = ray.get_runtime_context().get_job_id()
    # This driver's cluster by its GCS address: auto-detection refuses when the machine runs several Ray instances.
    address = ray.get_runtime_context().gcs_address
    try:
        actors = list_actors(address=address, filters=[("job_id", "=", job)], detail=True, limit=10_000,
                             raise_on_missing_output=False)
    except Exception as e:  # no dashboard (ray.init(include_dashboard=False)), an old head...
        log.warning("process logs not collected: Ray's state API did not answer (%s)", str(e).splitlines()[0])
        return None
    out = storage.join(run_dir, "logs")
    here, local_logs = ray.get_runtime_context().get_node_id(), _local_logs_dir()
    for a in actors:
        for suffix in ("out", "err"):
            try:
                if a.node_id == here and local_logs is not None:
                    # Ray's own naming: worker-<worker id>-<job id>-<pid>.<suffix>
                    lines = [x for f in sorted(local_logs.glob(f"worker-*-{a.pid}.{suffix}"))
                             for x in f.read_text(errors="replace").splitlines(keepends=True)]
                else:
                    lines = [x for x in get_log(address=address, actor_id=a.actor_id, suffix=suffix, tail=-1,
                                                timeout=30) for x in x.splitlines(keepends=True)]
            except Exception as e:
                log.debug("no %s log for %s %s: %s", suffix, a.class_name, a.actor_id, e)
                continue
            text = "".join(x for x in lines if not x.startswith(_HEADER))
            if text.strip():
                storage.write_text(storage.join(out, f"{a.class_name}-{a.pid}.{suffix}"), text[-MAX_BYTES:])
    return out


def _local_logs_dir():
    """This node's Ray log folder (no public API names it; None when this Ray does not say)."""
    from pathlib import Path

    try:
        import ray._private.worker as worker

        return Path(worker._global_node.get_logs_dir_path())
    except Exception:
        return None
