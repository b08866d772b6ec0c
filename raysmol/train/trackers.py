"""Experiment trackers (issue 17 item 1): every metrics row rank 0 logs, mirrored into TensorBoard, MLflow or
Weights & Biases, as one loop hook (raysmol/train/hooks.py) that acts on rank 0 only.

What lands in a tracker is exactly what lands in metrics.jsonl: the rows the loop, the objective (DPO's
margins, GRPO's rewards), validation and an in-training eval suite (`eval/<task>`) log through `ctx.log`,
including the one after the last step. Rows that record an event (`start`, `spike`, `export`, ...) are not
scalars and stay in metrics.jsonl only. Keys are kept as they are (`loss`, `val_loss`, `eval/arc`); nested
mappings (`source_tokens`) become `source_tokens/<name>`; booleans, strings and None are left out.

One tracked run per run directory: its ids (MLflow's run id, W&B's run id) are kept in `<run_dir>/tracking.json`
from the first attempt on, so a restarted worker, a resumed re-submission or an ablation trial resumed after its
sweep's driver restarted continues the same tracked run. A resume reruns the steps after its checkpoint:
TensorBoard purges them (a SessionLog START at the first rerun step, what `SummaryWriter(purge_step=)` writes)
and the rerun's values replace them, like metrics.jsonl's last row of a step; MLflow and W&B cannot take a point
back, so they skip the steps an earlier attempt logged (`logged_through` in tracking.json) and keep that
attempt's values (the same up to nondeterminism: resume is exact; a spike rollback's rerun differs, and they keep
the values before it).

Why a loop hook rather than Ray Tune's MLflowLoggerCallback/WandbLoggerCallback: Tune's callbacks see only what a
trial reports to Tune (the sweep's metric at validation points), and plain `raysmol pretrain|sft|dpo|grpo` runs no
Tune at all. Every sweep trial is a raysmol run, so each gets its own tracked run from this hook.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
import time
import uuid
from typing import Any

from raysmol import storage
from raysmol.config import Config, ConfigError
from raysmol.train.hooks import Context, Hook

STATE_FILE = "tracking.json"
# Environment the driver passes on to the rank-0 worker: on a cluster, workers do not share the driver's shell.
ENV_PREFIXES = ("WANDB_", "MLFLOW_")


def scalars(row: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a metrics row (not `step`/`time`), nested mappings flattened with "/"."""
    out: dict[str, float] = {}
    for k, v in row.items():
        if not prefix and k in ("step", "time"):
            continue
        if isinstance(v, dict):
            out.update(scalars(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


class Tracker:
    """One backend. `open` learns the step the run continues from; `write` gets one row's scalars."""

    package = ""  # the import name this backend needs
    extra = "tracking"  # the pip extra that installs it

    def __init__(self, cfg: Config, run_dir: str):
        self.cfg, self.run_dir = cfg, run_dir

    def open(self, state: dict[str, Any], step: int) -> None: ...

    def restart(self, step: int) -> None:
        """The loop went back to `step` (a spike rollback): steps after it come again."""

    def write(self, step: int, values: dict[str, float]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class TensorBoard(Tracker):
    """Event files in the run directory itself, so `tensorboard --logdir runs` names each run by its directory.
    A run directory on object storage gets them at each checkpoint and at the end (written locally first)."""

    package, extra = "tensorboard", "raysmol (a core dependency)"

    def open(self, state: dict[str, Any], step: int) -> None:
        self.local = self.run_dir
        if storage.is_remote(self.run_dir):
            import hashlib

            key = hashlib.sha256(self.run_dir.encode()).hexdigest()[:16]
            self.local = os.path.join(tempfile.gettempdir(), "raysmol-tensorboard", key, str(os.getpid()))
        self.writer = None
        self.restart(step)

    def restart(self, step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        if self.writer is not None:
            self.writer.close()
        # Steps after `step` may hold an earlier attempt's values: TensorBoard's readers drop them on this marker.
        self.writer = SummaryWriter(self.local, purge_step=step + 1 if step > 0 else None, flush_secs=30)

    def write(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def flush(self) -> None:
        self.writer.flush()
        if self.local != self.run_dir:
            for name in os.listdir(self.local):
                storage.upload_file(os.path.join(self.local, name), storage.join(self.run_dir, name))

    def close(self) -> None:
        self.flush()
        self.writer.close()


class MLflow(Tracker):
    """A run in experiment `run.project` at `run.mlflow_uri` (default: a file store at <output_dir>/mlruns), named
    run.name, with the resolved config as its parameters."""

    package = "mlflow"

    @staticmethod
    def uri(cfg: Config) -> str:
        if cfg.run.mlflow_uri:
            return cfg.run.mlflow_uri
        if storage.is_remote(cfg.run.output_dir):
            raise ConfigError(f"{cfg.origin}: run.mlflow_uri: needed with run.trackers: [mlflow] when run.output_dir "
                              f"is object storage ({cfg.run.output_dir}): a tracking server's URI (http://host:5000)")
        return "file://" + os.path.join(os.path.abspath(os.path.expanduser(cfg.run.output_dir)), "mlruns")

    @staticmethod
    def client_for(uri: str):
        from mlflow import MlflowClient

        if uri.startswith("file:"):
            # MLflow 3 keeps its file store only on request; it needs no server, which a laptop or CI run lacks.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        return MlflowClient(uri)

    def open(self, state: dict[str, Any], step: int) -> None:
        uri = self.uri(self.cfg)
        self.client = self.client_for(uri)
        self.logged_through = state.get("logged_through", -1)
        if state.get("run_id") and state.get("uri") == uri:
            self.run_id = state["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        exp = self._experiment(self.cfg.run.project)
        run = self.client.create_run(exp, run_name=self.cfg.run.name, tags={"raysmol.run_dir": self.run_dir})
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        params = [Param(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in _flat(self.cfg.to_dict()).items()]
        for i in range(0, len(params), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=[Param(p.key, p.value[:6000]) for p in params[i:i + 100]])

    def _experiment(self, name: str) -> str:
        e = self.client.get_experiment_by_name(name)
        if e is not None:
            return e.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # a concurrent sweep trial created it first
            return self.client.get_experiment_by_name(name).experiment_id

    def write(self, step: int, values: dict[str, float]) -> None:
        if step <= self.logged_through:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])
        self.logged_through = step

    def state(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "uri": self.uri(self.cfg), "logged_through": self.logged_through}

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandB(Tracker):
    """A W&B run in project `run.project`, named run.name, with the config. WANDB_MODE is respected; without it
    the run is offline unless WANDB_API_KEY is set (offline runs sync later: `wandb sync <run_dir>/wandb/offline-*`).
    Its files go in <run_dir>/wandb (a local temp folder when the run directory is on object storage)."""

    package = "wandb"

    @staticmethod
    def mode() -> str:
        return os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")

    def open(self, state: dict[str, Any], step: int) -> None:
        import wandb

        self.logged_through = state.get("logged_through", -1)
        self.id = state.get("id") or uuid.uuid4().hex[:12]
        folder = tempfile.gettempdir() if storage.is_remote(self.run_dir) else self.run_dir
        self.run = wandb.init(project=self.cfg.run.project, name=self.cfg.run.name, id=self.id, resume="allow",
                              dir=folder, mode=self.mode(), config=self.cfg.to_dict(),
                              settings=wandb.Settings(console="off", silent=True, x_disable_stats=True,
                                                      x_save_requirements=False))

    def write(self, step: int, values: dict[str, float]) -> None:
        if step <= self.logged_through:
            return
        self.run.log(values, step=step)
        self.logged_through = step

    def state(self) -> dict[str, Any]:
        return {"id": self.id, "mode": self.mode(), "logged_through": self.logged_through}

    def close(self) -> None:
        self.run.finish()


TRACKERS: dict[str, type[Tracker]] = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB}


def check(cfg: Config) -> None:
    """On the driver, before any worker starts: known names, installed packages, a usable MLflow URI."""
    for i, name in enumerate(cfg.run.trackers):
        if name not in TRACKERS:
            raise ConfigError(f"{cfg.origin}: run.trackers.{i}: unknown tracker {name!r}; valid: {', '.join(TRACKERS)}")
        t = TRACKERS[name]
        if importlib.util.find_spec(t.package) is None:
            how = "pip install 'raysmol[tracking]'" if t.extra == "tracking" else "reinstall raysmol"
            raise ConfigError(f"{cfg.origin}: run.trackers.{i}: {name} needs the {t.package} package, which is not "
                              f"installed: {how} (or remove {name} from run.trackers)")
        if name == "mlflow":
            MLflow.uri(cfg)


class Trackers(Hook):
    """The loop hook: opens the configured trackers on rank 0 once the step is known, mirrors every logged row,
    flushes at checkpoints and closes them at the end."""

    def __init__(self, cfg: Config):
        check(cfg)
        self.names = list(cfg.run.trackers)
        self.env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}
        self.trackers: dict[str, Tracker] = {}

    def __getstate__(self):
        return {**self.__dict__, "trackers": {}}

    def setup(self, ctx: Context) -> None:
        if ctx.rank == 0:
            for k, v in self.env.items():
                os.environ.setdefault(k, v)

    def after_restore(self, ctx: Context) -> None:
        if ctx.rank != 0 or not self.names:
            return
        if self.trackers:  # a rollback: the steps after ctx.step come again
            for t in self.trackers.values():
                t.restart(ctx.step)
            return
        uri = storage.join(ctx.run_dir, STATE_FILE)
        saved = json.loads(storage.read_text(uri)) if storage.exists(uri) else {}
        for name in self.names:
            t = TRACKERS[name](ctx.cfg, ctx.run_dir)
            t.open(saved.get(name, {}), ctx.step)
            self.trackers[name] = t
        self._save(ctx)

    def logged(self, ctx: Context, row: dict[str, Any]) -> None:
        if not self.trackers or "event" in row or "step" not in row:
            return
        values = scalars(row)
        for t in self.trackers.values():
            t.write(row["step"], values)
        self._save(ctx)

    def after_checkpoint(self, ctx: Context) -> None:
        for t in self.trackers.values():
            t.flush()

    def teardown(self, ctx: Context) -> None:
        for t in self.trackers.values():
            t.close()
        self._save(ctx)
        self.trackers = {}

    def _save(self, ctx: Context) -> None:
        """tracking.json: the tracked runs' ids (and how far MLflow and W&B got), for the next attempt."""
        state = {n: t.state() for n, t in self.trackers.items() if hasattr(t, "state")}
        if state:
            storage.write_text(storage.join(ctx.run_dir, STATE_FILE), json.dumps(state, indent=1))


def end_mlflow_run(run_dir: str, status: str) -> None:
    """Give the MLflow run of a run ended from outside its loop its final status (KILLED, FAILED): a sweep trial
    ASHA stopped has its workers killed, so `teardown` never closed the run, and MLflow would show it RUNNING."""
    uri = storage.join(run_dir, STATE_FILE)
    state = json.loads(storage.read_text(uri)).get("mlflow") if storage.exists(uri) else None
    if not state:
        return
    client = MLflow.client_for(state["uri"])
    if client.get_run(state["run_id"]).info.status == "RUNNING":
        client.set_terminated(state["run_id"], status)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
