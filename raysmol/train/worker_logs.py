"""The run's process logs in its run directory: <run_dir>/logs/<Actor>-<pid>.out|err for every actor of this
driver's job (Ray Train's controller and workers, GRPO's engines), fetched through Ray's state API from whichever
node ran them, dead ones included (a crashed worker's traceback is what one looks for).

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
    for a in actors:
        for suffix in ("out", "err"):
            try:
                lines = [x for x in get_log(address=address, actor_id=a.actor_id, suffix=suffix, tail=-1, timeout=30)
                         for x in x.splitlines(keepends=True)]
            except Exception as e:
                log.debug("no %s log for %s %s: %s", suffix, a.class_name, a.actor_id, e)
                continue
            text = "".join(x for x in lines if not x.startswith(_HEADER))
            if text.strip():
                storage.write_text(storage.join(out, f"{a.class_name}-{a.pid}.{suffix}"), text[-MAX_BYTES:])
    return out
