"""(ray) An ablation sweep as a Ray Tune experiment in which every (variant, seed) trial is a Ray Train run.

Each Tune trial runs a small driver (`run_trial`, the pattern of Ray's "Hyperparameter Tuning with Ray Tune"
guide for Train V2) that launches raysmol's own `pretrain` with its own Train workers and forwards every
validation metric to Tune, where ASHA decides whether the trial goes on. The trial driver holds almost no CPU:
concurrency is bounded by `max_concurrent_trials`, planned from the cluster's CPUs (GPUs) and the trial size.

Sweep directory `<output_dir>/<name>/`: `ablation.yaml` (the resolved file), `tune/` (the Tune experiment,
restored when `raysmol ablate` runs again after a driver restart: finished trials are kept, unfinished ones
resume from their newest raysmol checkpoint), `asha.json` (ASHA's rung records and the trials it stopped, kept
across a restore), `trials/<variant>-s<seed>/` (raysmol run directories), `trials.json` (status and metric
history of every trial), `report.md` and `plots/`.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import yaml
from ray.tune import Callback
from ray.tune.schedulers.async_hyperband import AsyncHyperBandScheduler, _Bracket

from raysmol import ledger, storage
from raysmol.ablate import report
from raysmol.ablate.spec import AblationSpec, Trial, load_ablation
from raysmol.config import Config, from_dict
from raysmol.train import trackers

log = logging.getLogger(__name__)
# A trial's driver only polls metrics; Tune cannot schedule a trial that asks for nothing.
DRIVER_CPU = 0.01
ASHA_STATE = "asha.json"


def ablate(path: str, *, show_progress: bool = True) -> str:
    """Run (or resume) the sweep in ablation file `path`; returns the terminal report table."""
    from raysmol.runtime import init_ray

    spec = load_ablation(path)
    init_ray()
    sweep = spec.sweep_dir()
    storage.makedirs(sweep)
    storage.write_text(storage.join(sweep, "ablation.yaml"), yaml.safe_dump(spec.to_dict(), sort_keys=False))
    trials = spec.trials()
    _prepare_data(trials, show_progress)
    started = time.time()
    grid = tuner(spec, trials, show_progress).fit()
    outcomes = _outcomes(spec, trials, grid)
    storage.write_text(storage.join(sweep, "trials.json"), json.dumps(outcomes, indent=1))
    log.info("sweep %s: %d trials in %.0f s", spec.name, len(outcomes), time.time() - started)
    table = report.write(sweep)
    unfinished = [o["name"] for o in outcomes if o["status"] == "interrupted"]
    if unfinished:
        table += (f"interrupted before {', '.join(unfinished)} finished: run `raysmol ablate {path}` again to resume "
                  "them from their checkpoints\n")
    return table


def tuner(spec: AblationSpec, trials: list[Trial], show_progress: bool = False):
    """A new Tune experiment for the sweep, or the interrupted one restored from `<sweep>/tune`."""
    from ray import tune

    path, fs = storage.ray_storage(spec.sweep_dir())
    # The trial configs travel through the object store; the search space holds only trial names (what
    # Tune prints and stores).
    params = {t.name: _trial_params(spec, t) for t in trials}
    trainable = tune.with_resources(tune.with_parameters(run_trial, trials=params), {"CPU": DRIVER_CPU})
    experiment = storage.join(spec.sweep_dir(), "tune")
    exp_path, exp_fs = storage.ray_storage(experiment)
    if tune.Tuner.can_restore(exp_path, storage_filesystem=exp_fs):
        log.info("resuming the sweep's Tune experiment at %s", experiment)
        # Finished and stopped trials keep their results; unfinished ones start again, and raysmol resumes
        # each from the newest committed checkpoint in its run directory.
        return tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, resume_errored=True,
                                  storage_filesystem=exp_fs)
    # A new experiment starts with empty rungs, whatever an earlier one left.
    storage.remove_tree(storage.join(spec.sweep_dir(), ASHA_STATE))
    first = trials[0].config
    return tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search([t.name for t in trials])},
        tune_config=tune.TuneConfig(scheduler=scheduler(spec, max(t.config.train.steps for t in trials)),
                                    max_concurrent_trials=max_concurrent(spec, first),
                                    trial_dirname_creator=lambda trial: trial.config["trial"],
                                    trial_name_creator=lambda trial: trial.config["trial"]),
        run_config=tune.RunConfig(name="tune", storage_path=path, storage_filesystem=fs,
                                  verbose=1 if show_progress else 0, callbacks=[ReleaseStoppedRuns()]),
    )


def scheduler(spec: AblationSpec, max_steps: int):
    from ray.tune.schedulers import FIFOScheduler

    s = spec.scheduler
    if not s.enabled:
        return FIFOScheduler()
    return MarginASHA(time_attr="step", metric=spec.metric.name, mode=spec.metric.mode, max_t=max_steps,
                      grace_period=min(s.grace_period, max_steps), reduction_factor=s.reduction_factor,
                      margin=s.margin, state_uri=storage.join(spec.sweep_dir(), ASHA_STATE))


def max_concurrent(spec: AblationSpec, cfg: Config) -> int:
    """The file's limit, else as many trials as the cluster's CPUs (GPUs) hold at one trial's size."""
    import ray

    if spec.resources.max_concurrent_trials:
        return spec.resources.max_concurrent_trials
    t = cfg.train
    res = ray.cluster_resources()
    if t.use_gpu:
        return max(1, int(res.get("GPU", 0) // t.num_workers))
    return max(1, int(res.get("CPU", 0) // (t.num_workers + DRIVER_CPU)))


def run_trial(params: dict[str, Any], trials: dict[str, dict[str, Any]]) -> None:
    """Tune function trainable: one raysmol pretraining run whose validation metric is reported to Tune."""
    from ray import tune

    p = trials[params["trial"]]
    if p["scheduler_state"] and tune.get_context().get_trial_id() in asha_stops(p["scheduler_state"]):
        # ASHA stopped it, but the driver went away before Tune's experiment state (written at most every 10 s)
        # said so: the restored experiment resumes it as unfinished.
        return
    from raysmol.recipes import pretrain

    cfg = from_dict(p["config"], origin=f"ablation trial {p['name']}")
    metric = p["metric"]
    last: dict[str, Any] = {}

    def forward(rows: list[dict[str, Any]]) -> None:
        for r in rows:
            if r.get(metric) is None:
                continue
            if r["step"] >= cfg.train.steps:
                # Held back until the run directory is complete: Tune may stop a trial at its last report.
                last.update(r)
                continue
            tune.report({metric: r[metric], "step": r["step"], "tokens": r["tokens"]})

    summary = pretrain(cfg, show_progress=False, on_rows=forward)
    if last:
        tune.report({metric: last[metric], "step": last["step"], "tokens": last["tokens"], "completed": True})
    elif summary.get("final_val_loss") is not None and metric == "val_loss":
        # Resumed after its last validation: report the final value the run directory holds.
        tune.report({metric: summary["final_val_loss"], "step": summary["steps"], "tokens": summary["tokens"],
                     "completed": True})


def _trial_params(spec: AblationSpec, t: Trial) -> dict[str, Any]:
    state = storage.join(spec.sweep_dir(), ASHA_STATE) if spec.scheduler.enabled else None
    return {"name": t.name, "variant": t.variant, "seed": t.seed, "config": t.config.to_dict(),
            "metric": spec.metric.name, "scheduler_state": state}


def _prepare_data(trials: list[Trial], show_progress: bool) -> None:
    """Prepare every distinct data set once, here, so concurrent trials never prepare the same one."""
    from raysmol.data.prepare import prepare, token_budgets
    from raysmol.data.tokenizer import tokenizer_for

    seen = set()
    for t in trials:
        # The budgets too: trials of different lengths or batch sizes need different prefixes of the same folders,
        # and a larger one prepared here only appends to a smaller one.
        key = json.dumps([t.config.to_dict()[k] for k in ("data", "tokenizer")] + [token_budgets(t.config)],
                         sort_keys=True)
        if key not in seen:
            seen.add(key)
            prepare(t.config, tokenizer_for(t.config), show_progress=show_progress)


def _outcomes(spec: AblationSpec, trials: list[Trial], grid) -> list[dict[str, Any]]:
    """Per trial: completed, stopped early by the scheduler (and at which step), interrupted (the driver went
    away: run `raysmol ablate` again to resume it) or failed, with the metric history Tune saw. Only a trial
    that completes reaches the end of `pretrain`, which books its compute; the others are booked here."""
    by_name = {t.name: t for t in trials}
    stops = asha_stops(storage.join(spec.sweep_dir(), ASHA_STATE))
    out = []
    for trial in grid._experiment_analysis.trials:  # ResultGrid hides each trial's final status
        res = grid._trial_to_result(trial)
        t = by_name[trial.config["trial"]]
        rd = storage.join(t.config.run.output_dir, t.config.run.name)
        df = res.metrics_dataframe
        hist = [] if df is None or spec.metric.name not in df else [
            [int(s), float(v)] for s, v in zip(df["step"], df[spec.metric.name]) if v == v]
        if storage.exists(storage.join(rd, "summary.json")):
            status = "completed"
        elif trial.status == "ERROR":
            status = "error"
        elif trial.status == "TERMINATED":
            status = "stopped"
        else:
            status = "interrupted"
        stopped_at = None
        if status == "stopped":
            # ASHA's record first: Tune's copy of a trial's results may end before the step it was stopped at.
            stopped_at = stops.get(trial.trial_id, hist[-1][0] if hist else None)
        seconds = float((res.metrics or {}).get("time_total_s") or 0.0)
        if status != "completed":
            _book_attempt(t, rd, status, stopped_at, seconds)
        if status in ("stopped", "error"):  # an interrupted trial's run goes on when the sweep resumes
            trackers.end_mlflow_run(rd, "KILLED" if status == "stopped" else "FAILED")
        out.append({"name": t.name, "variant": t.variant, "seed": t.seed, "run_dir": rd, "status": status,
                    "stopped_at_step": stopped_at, "steps": t.config.train.steps, "seconds": seconds,
                    "error": str(res.error) if res.error is not None else None, "history": hist})
    order = {t.name: i for i, t in enumerate(trials)}
    return sorted(out, key=lambda o: order[o["name"]])


def _book_attempt(t: Trial, rd: str, status: str, stopped_at: int | None, trial_seconds: float) -> None:
    """Book the last attempt of a trial that did not complete, once (a re-run of `raysmol ablate` does not
    book it again): Tune's wall time of the trial when it ran in one attempt, else the attempt's span in
    metrics.jsonl (from its start event, so the worker start-up before it is not counted)."""
    from raysmol.rundir import MetricsFile

    rows = MetricsFile(storage.join(rd, "metrics.jsonl")).rows
    starts = [r["time"] for r in rows if r.get("event") == "start"]
    attempt = starts[-1] if starts else None
    seconds = trial_seconds if len(starts) <= 1 else max(r["time"] for r in rows) - attempt
    uri = storage.join(rd, ledger.LEDGER_FILE)
    booked = storage.read_text(uri) if storage.exists(uri) else ""
    if seconds <= 0 or any(json.loads(x).get("attempt_start") == attempt for x in booked.splitlines() if x.strip()):
        return
    c = t.config.train
    ledger.record(rd, "ablation", c.num_workers * (1 if c.use_gpu else c.cpu_threads_per_worker),
                  "gpu" if c.use_gpu else "cpu", seconds,
                  {"run": t.name, "status": status, "stopped_at_step": stopped_at, "attempt_start": attempt})


class ReleaseStoppedRuns(Callback):
    """Give back the workers' resources of trials Tune stopped.

    Ray Train V2 reserves a run's workers in a placement group that lives as long as the job, not the Train
    controller; when Tune kills a stopped trial (and with it the controller), a detached cleaner of Train's is
    meant to remove the group, but it finds the cluster through the State API, which fails when several Ray
    instances run on one machine: the CPUs stay reserved and the next trials wait forever. So the sweep's driver
    removes every placement group whose creator actor is dead, a few seconds after it happens."""

    def __init__(self, every_s: float = 2.0):
        self.every_s, self.last = every_s, 0.0

    def on_step_begin(self, iteration, trials, **info):
        if time.time() - self.last >= self.every_s:
            self.last = time.time()
            release_orphaned_placement_groups()


def release_orphaned_placement_groups() -> int:
    """Remove the placement groups made by an actor that has died (none of them can be used any more)."""
    from ray._private.state import state
    from ray._raylet import ActorID, PlacementGroupID
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    removed = 0
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        # Groups a driver made (Tune's, one per trial) have no creator actor, and GCS reports it as dead.
        by_actor = not ActorID(pg.creator_actor_id).is_nil()
        if by_actor and pg.creator_actor_dead and not pg.is_detached and pg.state != gcs_pb2.PlacementGroupTableData.REMOVED:
            remove_placement_group(PlacementGroup(PlacementGroupID(pg.placement_group_id)))
            removed += 1
    return removed


class _MarginBracket(_Bracket):
    def __init__(self, *args, margin: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.margin = margin

    def cutoff(self, recorded):
        # Rewards are sign-adjusted (higher is better): lowering the cutoff by the margin stops only trials
        # clearly behind the rung's survivors, never one within noise of them.
        c = super().cutoff(recorded)
        return None if c is None else c - self.margin


class MarginASHA(AsyncHyperBandScheduler):
    """ASHA (one bracket) that stops a trial at a rung only when it is worse than the rung's cutoff by more
    than `margin` in metric units.

    With `state_uri`, its rung records and the trials it stopped (at which step) are written there whenever they
    change, and read back before the first trial is added: `Tuner.restore` builds the scheduler afresh from
    `tuner.pkl` (a copy made before the first trial) and never calls its `save`/`restore`, so without this a
    restored sweep's rungs are empty and the trials after it are compared with nothing."""

    def __init__(self, *, margin: float = 0.0, grace_period: int = 1, max_t: int = 100,
                 reduction_factor: float = 4, state_uri: str | None = None, **kwargs):
        super().__init__(grace_period=grace_period, max_t=max_t, reduction_factor=reduction_factor, **kwargs)
        self._brackets = [_MarginBracket(grace_period, max_t, reduction_factor, 0,
                                         stop_last_trials=self._stop_last_trials, margin=margin)]
        self.state_uri = state_uri
        self.stopped: dict[str, int] = {}  # trial id -> step
        self._loaded = state_uri is None

    def on_trial_add(self, tune_controller, trial):
        if not self._loaded:
            self._loaded = True
            self._load()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        n = self._recorded()
        action = super().on_trial_result(tune_controller, trial, result)
        if action == self.STOP and result[self._time_attr] < self._max_t:
            self.stopped[trial.trial_id] = result[self._time_attr]
        if self._recorded() != n:  # also the case for every stop at a rung
            self._save()
        return action

    def on_trial_complete(self, tune_controller, trial, result):
        n = self._recorded()
        super().on_trial_complete(tune_controller, trial, result)
        if self._recorded() != n:
            self._save()

    def _recorded(self) -> int:
        return sum(len(recorded) for _, recorded in self._brackets[0]._rungs)

    def _save(self) -> None:
        if self.state_uri:
            storage.write_text(self.state_uri, json.dumps(
                {"rungs": [[milestone, recorded] for milestone, recorded in self._brackets[0]._rungs],
                 "stopped": self.stopped}))

    def _load(self) -> None:
        if not storage.exists(self.state_uri):
            return
        state = json.loads(storage.read_text(self.state_uri))
        saved = {milestone: recorded for milestone, recorded in state["rungs"]}
        for milestone, recorded in self._brackets[0]._rungs:
            recorded.update(saved.get(milestone, {}))
        self.stopped.update(state["stopped"])


def asha_stops(state_uri: str) -> dict[str, int]:
    """Trial id -> the step at which MarginASHA stopped it, from its state file (empty without one)."""
    return json.loads(storage.read_text(state_uri))["stopped"] if storage.exists(state_uri) else {}


def cmd_ablate(args) -> int:
    if args.report_only:
        spec = load_ablation(args.file)
        print(report.write(spec.sweep_dir()), end="")
        return 0
    print(ablate(args.file, show_progress=not args.quiet), end="")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("ablate", help="run an ablation sweep (jobs/ablations/*.yaml) with Ray Tune; "
                                             "resumes an interrupted one; writes report.md and plots")
    p.add_argument("file", help="ablation file (see jobs/ablations/)")
    p.add_argument("--report-only", action="store_true", help="rewrite the report of an existing sweep")
    p.add_argument("--quiet", action="store_true", help="no Tune progress output")
    p.set_defaults(fn=cmd_ablate)
