"""Loop events: what fault drills, GRPO's weight sync and evaluation, in-training eval suites and experiment
trackers plug into, so the loop itself stays one page.

A hook is a picklable object built on the driver and shipped to every worker (like OLMo-core's callbacks, kept
smaller). Every rank calls every event; a hook that only acts on rank 0 checks `ctx.rank`. The events, in the
order one step meets them:

    setup            once per worker process, before the model exists
    after_restore    the engine holds the weights of `ctx.step` (a fresh start, a resume or a rollback)
    before_step      `ctx.step` is the step about to run; may set `ctx.loss_scale` (a drill's spike or NaN)
    after_update     the optimizer has stepped for `ctx.step`
    metrics          a logging point: what to add to rank 0's row
    evaluate         a validation point: scores to add to the row (every rank takes part: ZeRO-3 forwards)
    before_checkpoint, during_save, after_checkpoint     around each checkpoint of `ctx.step`
    after_export     rank 0 has written the export of `ctx.step` at `ctx.export_dir` (train.export_every)
    logged           rank 0 only: a row `ctx.log` recorded (any event above may log one; trackers mirror them)
    teardown         once per worker process, after the last step (not after a crash)

`state_dict`/`load_state_dict`: state saved in the checkpoint's state.json under `hooks.<name>` and given back
on resume, so a hook's memory survives restarts the way the weights do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from raysmol.config import Config


@dataclass
class Context:
    """What a hook may read (and, for `loss_scale`, set) at an event."""

    cfg: Config
    rank: int
    world: int
    device: Any
    run_dir: str
    log: Callable[[dict[str, Any]], None]  # the one way to record a metric row (rank 0's rows reach metrics.jsonl)
    step: int = 0  # the step an event is about (see the module docstring)
    engine: Any = None  # the DeepSpeed engine, once it exists
    model: Any = None  # the transformers model inside it
    loss_scale: float | None = None
    export_dir: str | None = None  # the newest export's folder (after_export)


class Hook:
    """Override only the events you need."""

    name = ""  # key of this hook's state in state.json (hooks without state need none)

    def setup(self, ctx: Context) -> None: ...

    def after_restore(self, ctx: Context) -> None: ...

    def before_step(self, ctx: Context) -> None: ...

    def after_update(self, ctx: Context) -> None: ...

    def metrics(self, ctx: Context) -> dict[str, Any]:
        return {}

    def evaluate(self, ctx: Context) -> dict[str, Any]:
        return {}

    def before_checkpoint(self, ctx: Context) -> None: ...

    def during_save(self, ctx: Context) -> None: ...

    def after_checkpoint(self, ctx: Context) -> None: ...

    def after_export(self, ctx: Context) -> None: ...

    def logged(self, ctx: Context, row: dict[str, Any]) -> None: ...

    def teardown(self, ctx: Context) -> None: ...

    def state_dict(self) -> dict[str, Any] | None:
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Hooks:
    """The run's hooks, called in order."""

    hooks: list[Hook] = field(default_factory=list)

    def call(self, event: str, ctx: Context) -> None:
        for h in self.hooks:
            getattr(h, event)(ctx)

    def collect(self, event: str, ctx: Context) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for h in self.hooks:
            out.update(getattr(h, event)(ctx))
        return out

    def logged(self, ctx: Context, row: dict[str, Any]) -> None:
        for h in self.hooks:
            h.logged(ctx, row)

    def state_dict(self) -> dict[str, Any]:
        return {h.name: s for h in self.hooks if (s := h.state_dict()) is not None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for h in self.hooks:
            if h.name in state:
                h.load_state_dict(state[h.name])
