"""Engines in Ray actors behind a round-robin pool, with a timeout on every call.

A stuck engine (a hung collective, a runaway generation, a weight sync that never completes) must fail loudly and
never hang a run: every call waits at most its timeout, then the pool kills the actor, starts a replacement with
the same model and version, and raises EngineTimeout. An actor that died (node lost, OOM) is replaced the same way
on the next call.

Weights reach the engines either as a folder (`load`) or through Ray's object store (`sync`: buckets of named
tensors, one ObjectRef each, loaded in order by every engine). The pool keeps the latest synced version's bucket
refs until the next sync, so a replacement engine (started from the pool's folder) is synced to it before it
serves anything.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import ray

from raysmol import storage
from raysmol.serve.engines import EngineError, Sample, Sampling, make_engine

logger = logging.getLogger(__name__)


class EngineTimeout(TimeoutError):
    """An engine call ran past its timeout; the engine was killed and replaced."""


@dataclass
class Pending:
    """A generation in flight (`EnginePool.submit`): one ObjectRef per engine slot, and the actors they went to
    (a slot whose actor was replaced since is not killed again when its old call fails)."""

    refs: list
    slots: list[int]
    actors: list
    what: str


class EngineActor:
    """The Ray actor body: one engine, built inside the actor's own process (and GPU, if it has one)."""

    def __init__(self, kind: str, model_path: str, version: int, options: dict[str, Any]):
        import os

        if not ray.get_gpu_ids():
            import torch

            torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.engine = make_engine(kind, storage.model_folder(model_path), version, options)

    def generate(self, prompts: list[str], sampling: Sampling) -> list[list[Sample]]:
        return self.engine.generate(prompts, sampling)

    def load(self, path: str, version: int, hang: bool = False) -> int:
        if hang:  # the fault drill faults.hang_sync_at_step
            threading.Event().wait()
        return self.engine.load(storage.model_folder(path), version)

    def sync(self, refs: list, version: int, hang: bool = False) -> int:
        """Load the buckets behind `refs` (ObjectRefs, fetched one at a time) in order as `version`. `hang`: the
        fault drill faults.hang_sync_at_step, a sync that never completes."""
        self.engine.begin_update(version)
        if hang:
            threading.Event().wait()  # forever: only the pool's timeout (kill and replace) gets this engine out
        for ref in refs:
            bucket = ray.get(ref)
            self.engine.load_bucket(bucket)
            del bucket
        return self.engine.end_update(version)

    def version(self) -> int:
        return self.engine.version


class EnginePool:
    """`num_engines` actors serving one model. `generate` splits a batch of prompts across all engines (a single
    prompt goes to the next engine in turn); `load` updates every engine and checks the versions they report."""

    def __init__(self, kind: str, model_path: str, *, num_engines: int = 1, version: int = 0, timeout_s: float = 600.0,
                 load_timeout_s: float = 300.0, start_timeout_s: float | None = None, cpus_per_engine: float = 1,
                 gpus_per_engine: float = 0, options: dict[str, Any] | None = None):
        if num_engines < 1:
            raise EngineError(f"num_engines={num_engines}: must be >= 1")
        self.kind, self.model_path, self.version = kind, model_path, version
        self.path_version = version  # the version of the weights in model_path (what a fresh engine starts with)
        self.refs: list | None = None  # the latest object-store sync's bucket refs (version self.version)
        self.timeout_s, self.load_timeout_s, self.options = timeout_s, load_timeout_s, dict(options or {})
        self._cls = ray.remote(num_cpus=cpus_per_engine, num_gpus=gpus_per_engine)(EngineActor)
        self.actors = [self._start() for _ in range(num_engines)]
        self._next = 0
        self.restarts = 0
        self._wait([a.version.remote() for a in self.actors], start_timeout_s or self.load_timeout_s, "start",
                   range(num_engines))

    def _start(self):
        actor = self._cls.remote(self.kind, self.model_path, self.path_version, self.options)
        if self.refs is not None and self.version != self.path_version:
            # A replacement: synced to the current weights before any later call (an actor runs its calls in
            # order); a failed sync leaves it reporting the folder's version, which every version check catches.
            actor.sync.remote(self.refs, self.version)
        return actor

    def _wait(self, refs: list, timeout: float, what: str, slots, actors: list | None = None) -> list:
        """ray.get with a deadline; engines that time out or died are replaced before the error is raised.
        `actors`: the actors the calls went to, where they may have been replaced since."""
        slots = list(slots)
        actors = actors or [self.actors[i] for i in slots]
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        failed = {i: "timed out" for i, r in zip(slots, refs) if r in pending}
        results = []
        for i, r in zip(slots, refs):
            if i in failed:
                continue
            try:
                results.append(ray.get(r))
            except ray.exceptions.RayActorError as e:
                # A failed start carries the engine's own error (a bad model folder, too little memory): show it.
                cause = " ".join(str(e).split())
                failed[i] = f"died ({type(e).__name__}: {cause[-800:]})"
            except ray.exceptions.RayTaskError as e:
                raise e.as_instanceof_cause() from None  # the engine's own error (bad request): not a failure of it
        if failed:
            for i, actor in zip(slots, actors):
                if i in failed and self.actors[i] is actor:  # else it was replaced already, after this call left
                    ray.kill(actor, no_restart=True)
                    self.actors[i] = self._start()
                    self.restarts += 1
            detail = ", ".join(f"engine {i} {why}" for i, why in sorted(failed.items()))
            err = EngineTimeout if any(w == "timed out" for w in failed.values()) else EngineError
            raise err(f"{self.kind} engine {what} failed (limit {timeout:.0f} s): {detail}; "
                      f"replaced with fresh engines serving version {self.version}")
        return results

    def generate(self, prompts: list[str], sampling: Sampling, timeout_s: float | None = None) -> list[list[Sample]]:
        return self.collect(self.submit(prompts, sampling), timeout_s) if prompts else []

    def submit(self, prompts: list[str], sampling: Sampling) -> Pending:
        """Starts generating (split across the engines) and returns at once. An engine runs its calls in order, so
        a generation submitted before a weight sync samples from the weights before it."""
        k = min(len(self.actors), len(prompts))
        order = [(self._next + j) % len(self.actors) for j in range(k)]
        self._next = (self._next + k) % len(self.actors)
        bounds = [round(len(prompts) * j / k) for j in range(k + 1)]
        refs = [self.actors[i].generate.remote(prompts[bounds[j]:bounds[j + 1]], sampling) for j, i in enumerate(order)]
        return Pending(refs, order, [self.actors[i] for i in order], f"generate ({len(prompts)} prompts)")

    def collect(self, pending: Pending, timeout_s: float | None = None) -> list[list[Sample]]:
        """A submitted generation's completions, waiting at most the timeout from now (failed engines replaced)."""
        chunks = self._wait(pending.refs, timeout_s or self.timeout_s, pending.what, pending.slots, pending.actors)
        return [s for chunk in chunks for s in chunk]

    def load(self, path: str, version: int, timeout_s: float | None = None, hang: tuple[int, ...] = ()) -> None:
        """Every engine serves `path` as `version` when this returns, or it raises (after replacing failed ones).
        `hang`: the engines whose load the fault drill blocks."""
        t = time.perf_counter()
        got = self._wait([a.load.remote(path, version, i in hang) for i, a in enumerate(self.actors)],
                         timeout_s or self.load_timeout_s,
                         f"load of {path}", range(len(self.actors)))
        self.model_path, self.version, self.path_version, self.refs = path, version, version, None
        if got != [version] * len(got):  # what each engine reports it now serves
            raise EngineError(f"after loading {path} as version {version} the engines report {got}")
        logger.info("engines serve version %d (%s) after %.2f s", version, path, time.perf_counter() - t)

    def sync(self, refs: list, version: int, timeout_s: float | None = None, hang: tuple[int, ...] = ()) -> list[int]:
        """Every engine loads the buckets behind `refs` (in order) as `version`; returns the versions they report
        and raises EngineError unless each reports `version`. An engine that times out or dies is replaced by one
        synced to these refs (EngineTimeout/EngineError raised: retry for a clean check). `hang`: the engines
        whose sync the fault drill blocks."""
        t = time.perf_counter()
        self.refs, self.version = list(refs), version  # what a replacement gets, from now on
        got = self._wait([a.sync.remote(self.refs, version, i in hang) for i, a in enumerate(self.actors)],
                         timeout_s or self.load_timeout_s, f"weight sync of version {version}",
                         range(len(self.actors)))
        if got != [version] * len(got):
            raise EngineError(f"after syncing version {version} the engines report {got}")
        logger.info("engines serve version %d (%d buckets from the object store) after %.2f s", version, len(refs),
                    time.perf_counter() - t)
        return got

    def versions(self, timeout_s: float | None = None) -> list[int]:
        return self._wait([a.version.remote() for a in self.actors], timeout_s or self.load_timeout_s, "version",
                          range(len(self.actors)))

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
