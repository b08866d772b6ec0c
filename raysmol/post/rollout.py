"""Ray glue for GRPO: engine actors sample, reward tasks score, the trainer's weights go back to the engines.

Rank 0 of the training workers drives the engines: for step t it samples the step's prompts (n completions
each, seeded by t), checks that every completion was made by the policy version it just pushed, scores each group
in a Ray task, computes group-normalised advantages and broadcasts the rows; every rank trains on its share (whole groups),
the ratio's denominator being its own log-probs under its weights before the update (the loss's forward,
detached, or with grpo.recompute_logps a second forward). After the update all
ranks gather the weights (collective under ZeRO-3) and rank 0 hands them to every engine as version t + 1 before
the next rollout: through Ray's object store in buckets (grpo.weight_sync: object_store) or as a folder under
the run directory (files). Every engine call and reward task has a timeout; a lost or stuck engine
is replaced (serving the current weights) and the call is retried once.

With grpo.max_staleness = k > 0 the rollouts of the next k steps are in flight while a step trains (one-step-off
with k = 1, as NeMo-RL's async GRPO): each engine finishes them on the weights they started with (an actor runs
its calls in order), then takes the update. Every sample carries the policy version that made it; the ratio's
denominator is still the trainer's current weights (the proximal policy of decoupled PPO) and
grpo.tis_cap weights each token by min(pi_proximal / pi_behaviour, cap), the behaviour being the engine's
log-probs of the older weights.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
import torch.distributed as dist

from raysmol import storage
from raysmol.config import Config, ConfigError
from raysmol.data.batches import Batch
from raysmol.model import precision
from raysmol.model.folder import resolve_model
from raysmol.post.base import PostTask
from raysmol.post.grpo import (completion_rows, group_advantages, grpo, read_prompts, render_prompt,
                               reward_function)
from raysmol.rundir import run_dir
from raysmol.serve.engines import EngineError, Sampling
from raysmol.serve.pool import EnginePool, EngineTimeout, Pending
from raysmol.serve.sync import buckets
from raysmol.train import checkpoint as ckpt
from raysmol.train import export
from raysmol.train.hooks import Context, Hook
from raysmol.train.objectives import Objective, to_device, token_logps

log = logging.getLogger(__name__)


@ray.remote
def _score(spec: str, groups: list[list[str]], rows: list[dict]) -> list[list[float]]:
    reward = reward_function(spec)
    return [reward(completions, row) for completions, row in zip(groups, rows)]


class Rollouts(Hook):
    """GRPO's data source for the training loop (`micro_batches`, `position`) and its hook: the weights go to the
    engines after every restore and update, the held-out prompts are scored at every validation. Built on the
    driver; the training workers get a copy holding the same engine actors."""

    def __init__(self, cfg: Config, pool: EnginePool, train: list[dict], held_out: list[dict], run_dir: str,
                 base: str):
        self.cfg, self.pool, self.train, self.held_out = cfg, pool, train, held_out
        self.run_dir, self.base = run_dir, base
        self.version = 0  # the policy version the engines serve (the training step whose weights they hold)
        self.pending: dict[int, Launched] = {}  # rank 0: rollouts in flight, by data step (grpo.max_staleness)
        self.stats: dict[str, Any] = {}

    def attach(self, rank: int, world: int, device) -> "Rollouts":
        """In a training worker: the tokenizer, the prompts' token ids and (kl_beta > 0) the reference model."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.rank, self.world, self.device = rank, world, device
        # The run directory's copy, which the driver wrote before training: this node may not see the driver's disk.
        tok = storage.local_copy(storage.join(self.run_dir, export.TOKENIZER_DIR), "tokenizer_config.json")
        self.tokenizer = AutoTokenizer.from_pretrained(str(tok))
        self.ref = None
        if self.cfg.grpo.kl_beta > 0:
            folder = resolve_model(self.base)
            self.ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
        self.samples_per_step = self.cfg.grpo.prompts_per_step
        return self

    # ------------------------------------------------------------ rollout

    def _row(self, i: int) -> dict:
        """Prompt i of the endless stream: epoch e = i // n is a seeded permutation of the training prompts."""
        n = len(self.train)
        order = np.random.default_rng([self.cfg.data.seed, i // n]).permutation(n)
        return self.train[order[i % n]]

    def micro_batches(self, step: int, rank: int, world: int, micro: int) -> list[Batch]:
        box: list[Any] = [None]
        if rank == 0:
            box[0] = self._next_rollout(step)
        dist.broadcast_object_list(box, src=0)
        packed, engine_lps, adv, rewards, versions = box[0]
        per_rank = len(adv) // world  # whole groups: prompts_per_step % world == 0 (config validation)
        mine = np.arange(rank * per_rank, (rank + 1) * per_rank)
        out = []
        for start in range(0, per_rank, micro):
            rows = mine[start:start + micro]
            b = packed.batch(rows)
            b.extras = {"engine_logps": torch.from_numpy(engine_lps[rows]),
                        "advantages": torch.from_numpy(adv[rows]).float(),
                        "rewards": torch.from_numpy(rewards[rows]).float(),
                        "versions": torch.from_numpy(versions[rows]).float(),
                        "staleness": torch.from_numpy(self.version - versions[rows]).float()}
            out.append(b)
        return self.with_logps(out)

    def with_logps(self, batches: list[Batch]) -> list[Batch]:
        """With grpo.recompute_logps, each row's log-probs under the trainer's current weights (`old_logps`), and
        with kl_beta > 0 the reference's (`ref_logps`). Called before the step's update, when the trainer holds
        exactly the weights the engines sampled with: the ratio's denominator from the trainer's own forward (the
        loss's path, no grad), so engine/trainer numerical differences never reach it (collective under ZeRO-3:
        every rank has the same number of micro-batches). Without it the loss takes its own forward's."""
        t0 = time.perf_counter()
        for b in batches:
            if self.cfg.grpo.recompute_logps:  # else the loss takes its own forward's, detached
                b.extras["old_logps"] = _logps(self.policy, b, self.device)
            if self.ref is not None:
                b.extras["ref_logps"] = _logps(self.ref, b, self.device)
        self.stats["logps_s"] = time.perf_counter() - t0
        return batches

    def _next_rollout(self, step: int):
        """The rows of data step `step`. grpo.max_staleness = k: the rollouts of steps step..step + k are in flight
        (the missing ones start now, on the weights the engines serve), so the engines generate the next steps'
        while this one trains, and this step's samples come from a policy at most k updates old. k = 0: each
        rollout starts and ends here, on the current weights (the synchronous loop)."""
        # self.version updates so far: this is training step version + 1; none launches past the run's last step.
        ahead = min(self.cfg.grpo.max_staleness, self.cfg.train.steps - self.version - 1)
        for s in range(step, step + max(ahead, 0) + 1):
            if s not in self.pending:
                self._launch(s)
        for s in [s for s in self.pending if s < step]:  # skipped by a rollback's data plan: never trained on
            del self.pending[s]
        return self._collect(self.pending.pop(step))

    def _launch(self, step: int) -> None:
        g = self.cfg.grpo
        rows = [self._row(step * g.prompts_per_step + j) for j in range(g.prompts_per_step)]
        prompts = [render_prompt(self.tokenizer, r) for r in rows]
        sampling = Sampling(n=g.group_size, temperature=g.temperature, top_p=g.top_p, max_tokens=g.max_new_tokens,
                            seed=self.cfg.data.seed + step)
        self._drill(step + 1)
        self.pending[step] = Launched(step, rows, prompts, sampling, self.version, self.pool.submit(prompts, sampling))

    def _collect(self, run: Launched):
        """The launched rollout's completions, scored, as training rows. A rollout whose engine was lost or stuck
        is generated again on the current weights (on-policy)."""
        t0 = time.perf_counter()
        try:
            samples = self.pool.collect(run.pending, timeout_s=self.cfg.grpo.rollout_timeout_s)
            made_by = {s.version for group in samples for s in group}
            if made_by != {run.version}:
                raise EngineError(f"rollout of step {run.step}, launched on policy version {run.version}, got "
                                  f"completions of version(s) {sorted(made_by)}: an engine missed a weight update")
        except (EngineTimeout, EngineError) as e:
            log.warning("rollout of step %d failed, generating it again on the current weights: %s", run.step, e)
            samples = self._generate(run.prompts, run.sampling)
        versions = np.asarray([s.version for group in samples for s in group], dtype=np.int64)
        if self.version - versions.min() > self.cfg.grpo.max_staleness:
            raise EngineError(f"rollout of step {run.step} holds samples of policy version {versions.min()}, more than "
                              f"grpo.max_staleness={self.cfg.grpo.max_staleness} behind the trained {self.version}")
        rows, prompts, t1 = run.rows, run.prompts, time.perf_counter()
        self.stats["rollout_s"] = t1 - t0  # this step's wait for generation (a sync's wait for those in flight adds)
        rewards = np.asarray(self._rewards([[s.text for s in group] for group in samples], rows), dtype=np.float64)
        prompt_ids = [self.tokenizer(p)["input_ids"] for p in prompts]
        packed, old = completion_rows(prompt_ids, [[s.token_ids for s in grp] for grp in samples],
                                      [[s.logprobs for s in grp] for grp in samples], self.cfg.train.seq_len,
                                      self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                                      else self.tokenizer.eos_token_id)
        adv = group_advantages(rewards).reshape(-1)
        self.stats.update(reward_s=time.perf_counter() - t1, engine_restarts=self.pool.restarts,
                          groups_with_signal=float((rewards.std(1) > 0).mean()))
        return packed, old, adv, rewards.reshape(-1), versions

    def _drill(self, step: int) -> None:
        """faults.kill_engine_at_step: a lost engine actor (node gone, OOM), once per listed step."""
        marker = storage.join(self.run_dir, "faults", f"kill_engine-{step}")
        if self.cfg.faults.at("kill_engine_at_step", step) and not storage.exists(marker):
            storage.write_text(marker, str(step))
            log.warning("fault drill: killing engine actor 0 before the rollout of step %d", step)
            ray.kill(self.pool.actors[0], no_restart=True)

    def _settle(self) -> None:
        """Waits (rank 0) for the rollouts in flight to finish on the weights they started with, before a sync
        replaces them; the wait is generation time the update did not hide (added to the step's `rollout_s`). A
        failed one is generated again when its step comes (`_collect`)."""
        refs = [r for run in self.pending.values() for r in run.pending.refs]
        if refs:
            t0 = time.perf_counter()
            ray.wait(refs, num_returns=len(refs), timeout=self.cfg.grpo.rollout_timeout_s)
            self.stats["rollout_s"] = self.stats.get("rollout_s", 0.0) + time.perf_counter() - t0

    def _generate(self, prompts: list[str], sampling: Sampling):
        for attempt in (1, 2):
            try:
                samples = self.pool.generate(prompts, sampling, timeout_s=self.cfg.grpo.rollout_timeout_s)
            except (EngineTimeout, EngineError) as e:
                if attempt == 2:
                    raise
                # The pool has replaced the engine with a fresh one serving the current weights: retry once.
                log.warning("rollout failed, retrying on the replacement engine: %s", e)
                continue
            stale = {s.version for group in samples for s in group} - {self.version}
            if stale:
                raise EngineError(f"rollout for policy version {self.version} got completions of version(s) "
                                  f"{sorted(stale)}: an engine missed a weight update")
            return samples
        raise AssertionError("unreachable")

    def _rewards(self, texts: list[list[str]], rows: list[dict]) -> list[list[float]]:
        # A bounded number of tasks, each scoring a contiguous share of the groups: one task per group made Ray
        # start a worker process per task when reward_cpus is 0 (600 held-out prompts: ~100 workers, OOM).
        score = _score.options(num_cpus=self.cfg.grpo.reward_cpus)
        shares = np.array_split(np.arange(len(rows)), min(self.cfg.grpo.reward_tasks, len(rows)))
        refs = [score.remote(self.cfg.grpo.reward, [texts[i] for i in idx], [_plain(rows[i]) for i in idx])
                for idx in shares]
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=self.cfg.grpo.rollout_timeout_s)
        if pending:
            for r in pending:
                ray.cancel(r, force=True)
            raise TimeoutError(f"{len(pending)} of {len(refs)} reward tasks ran past grpo.rollout_timeout_s="
                               f"{self.cfg.grpo.rollout_timeout_s}")
        return [scores for share in ray.get(refs) for scores in share]

    # ------------------------------------------------------------ weight sync

    def after_restore(self, ctx: Context) -> None:
        """After a start, resume or rollback the engines serve the weights being trained, and the rollouts in
        flight (sampled from weights the run no longer follows) are dropped: the next step's rollout is
        on-policy."""
        self.policy = ctx.engine  # what `with_logps` runs: the engine whose forward the loss takes
        self.sync(ctx.engine, ctx.model, ctx.step)
        self.pending.clear()

    def after_update(self, ctx: Context) -> None:
        self.sync(ctx.engine, ctx.model, ctx.step)

    def sync(self, engine, model, step: int) -> None:
        """Every engine serves the weights of `step` (collective: every rank calls it)."""
        sd = ckpt.full_state_dict(engine)
        if self.rank == 0 and not (step == 0 and self.version == 0 and self.pool.version == 0):
            self._settle()
            t0 = time.perf_counter()
            timeout, files = self.cfg.grpo.sync_timeout_s, self.cfg.grpo.weight_sync == "files"
            if files:
                folder = self._write(model, sd, step)
                push = partial(self.pool.load, folder, step, timeout_s=timeout)
            else:
                push = partial(self.pool.sync, self._put(model, sd), step, timeout_s=timeout)
            try:
                push(hang=(0,) if self._hang_drill(step) else ())
            except (EngineTimeout, EngineError) as e:
                # Lost or stuck engines were replaced (object_store: each synced to these weights already); push
                # to all again, so that every engine's version is checked.
                log.warning("weight sync failed, retrying on the replacement engines: %s", e)
                # A replacement first starts (and, object_store, catches up) within rollout_timeout_s, the limit a
                # rollout that starts one has too; the retried push then gets the sync's own limit.
                self.pool.versions(timeout_s=self.cfg.grpo.rollout_timeout_s)
                push()
            versions = self.pool.versions(timeout_s=timeout)
            if versions != [step] * len(versions):
                raise EngineError(f"weight sync of step {step}: the engines report versions {versions}")
            self.stats.update(sync_s=time.perf_counter() - t0, engine_restarts=self.pool.restarts)
            if self.cfg.grpo.verify_sync:
                self.stats["sync_check"] = self._verify(model, sd, step)
            if files:
                self._forget_before(folder)
        self.version = step
        dist.barrier()

    def _put(self, model, sd) -> list:
        """The state dict into Ray's object store, grpo.sync_bucket_mb MiB per ray.put, at the engines' dtype. A
        tied head is left out (the gathered dict holds it as a copy of the embedding; the engines tie it), as
        save_pretrained leaves it out of the files."""
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
            engine_dtype(self.cfg))
        if getattr(model.config, "tie_word_embeddings", False) and "model.embed_tokens.weight" in sd:
            sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
        return [ray.put(b) for b in buckets(sd, self.cfg.grpo.sync_bucket_mb, dtype)]

    def _hang_drill(self, step: int) -> bool:
        """faults.hang_sync_at_step: engine 0's sync of this step's weights never completes (once per run)."""
        marker = storage.join(self.run_dir, "faults", f"hang_sync-{step}")
        if self.cfg.faults.at("hang_sync_at_step", step) and not storage.exists(marker):
            storage.write_text(marker, str(step))
            log.warning("fault drill: engine actor 0's weight sync of step %d blocks forever", step)
            return True
        return False

    def _write(self, model, sd, step: int) -> str:
        """The weights as a Hugging Face folder the engines can read: under the run directory (object storage or
        a shared disk reach every node) with the tokenizer."""
        dest = storage.join(self.run_dir, "policy", f"v{step:08d}")
        with tempfile.TemporaryDirectory(prefix="raysmol-policy-") as d:
            ckpt.export_hf(model, sd, Path(d))
            self.tokenizer.save_pretrained(d)
            storage.upload_dir(d, dest)
        return dest

    def _forget_before(self, keep: str) -> None:
        root = storage.join(self.run_dir, "policy")
        for name in storage.listdir(root):
            if storage.join(root, name) != keep:
                storage.remove_tree(storage.join(root, name))

    def _verify(self, model, sd, step: int) -> dict:
        """The engines report `step` and their greedy completions equal the trained weights' own (transformers
        generate on a CPU copy of the gathered state dict); a mismatch stops the run."""
        from transformers import AutoModelForCausalLM

        probe = [render_prompt(self.tokenizer, r) for r in self.held_out[:4] or self.train[:4]]
        versions = self.pool.versions()
        got = self.pool.generate(probe, Sampling(n=1, temperature=0, max_tokens=self.cfg.grpo.max_new_tokens))
        local = AutoModelForCausalLM.from_config(model.config)
        local.load_state_dict({k: v.float().cpu() for k, v in sd.items()}, strict=False)
        local.tie_weights()
        local.eval()
        tok, want = self.tokenizer, []
        for p in probe:
            ids = tok(p, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                out = local.generate(ids, do_sample=False, max_new_tokens=self.cfg.grpo.max_new_tokens,
                                     eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
                                     use_cache=True)  # as the engines generate
            new = out[0, ids.shape[1]:].tolist()
            want.append(new[:new.index(tok.eos_token_id) + 1] if tok.eos_token_id in new else new)
        match = [g[0].token_ids == w for g, w in zip(got, want)]
        check = {"version": step, "engine_versions": versions, "greedy_match": all(match)}
        if versions != [step] * len(versions) or not all(match):
            raise EngineError(f"weight sync check failed after step {step}: {check}")
        return check

    # ------------------------------------------------------------ evaluation, bookkeeping

    def evaluate(self, ctx: Context) -> dict[str, float]:
        """The held-out prompts scored by the reward (exact: exact match): greedy completions (`eval/accuracy`)
        and 4 sampled ones each at the training temperature, seeded the same every time (`eval/accuracy_sampled`,
        what the policy gradient optimises)."""
        if self.rank != 0 or not self.held_out:
            return {}
        g = self.cfg.grpo
        prompts = [render_prompt(self.tokenizer, r) for r in self.held_out]
        greedy = self._generate(prompts, Sampling(n=1, temperature=0, max_tokens=g.max_new_tokens))
        sampled = self._generate(prompts, Sampling(n=4, temperature=g.temperature, top_p=g.top_p,
                                                   max_tokens=g.max_new_tokens, seed=self.cfg.data.seed + 7))
        r_greedy = self._rewards([[s[0].text] for s in greedy], self.held_out)
        r_sampled = self._rewards([[x.text for x in s] for s in sampled], self.held_out)
        return {"eval/accuracy": float(np.mean(r_greedy)), "eval/accuracy_sampled": float(np.mean(r_sampled))}

    def metrics(self, ctx: Context) -> dict[str, Any]:
        """What rank 0 adds to a logged row: rollout and sync times, engine restarts, the last sync check."""
        return dict(self.stats) if self.rank == 0 else {}

    def position(self, step: int) -> dict[str, Any]:
        return {"epochs": {"grpo": (step + 1) * self.cfg.grpo.prompts_per_step / len(self.train)}}

    def shutdown(self) -> None:
        self.pool.shutdown()


@dataclass
class Launched:
    """A rollout in flight: data step, its rows, prompts and sampling, the policy version the engines served when
    it started (what its samples must report), and the pool's handle on it."""

    step: int
    rows: list[dict]
    prompts: list[str]
    sampling: Sampling
    version: int
    pending: Pending


@torch.no_grad()
def _logps(model, batch: Batch, device) -> torch.Tensor:
    return token_logps(model, to_device(batch, device, model))[0].cpu()


def engine_dtype(cfg: Config) -> str:
    """grpo.engine_dtype, by default the trainer's precision: engines and trainer then compute the same
    probabilities (vLLM's own default serves a float32 checkpoint in 16 bits)."""
    return cfg.grpo.engine_dtype or {"bf16": "bfloat16", "fp32": "float32"}[precision(cfg)]


def _plain(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "where"}


class GRPO(PostTask):
    """Rank 0 of the training workers asks the engine actors for each step's rows (raysmol/post/grpo.py's
    objective trains on them); the Rollouts hook keeps the engines on the trained weights."""

    verb = "grpo"

    def prepare_data(self, cfg: Config) -> None:
        """Prompts (held-out ones first) and the engine actors serving the base model with the chat template."""
        g, hf_tok = cfg.grpo, self.tokenizer
        reward_function(g.reward)  # a bad reward spec fails here, before any actor starts
        rows = read_prompts(g.data, g.prompt_key, g.answer_key)
        order = np.random.default_rng(cfg.data.seed).permutation(len(rows))
        n_eval = min(g.eval_prompts, len(rows) // 2)
        held_out, train = [rows[i] for i in order[:n_eval]], [rows[i] for i in order[n_eval:]]
        longest = max(len(hf_tok(render_prompt(hf_tok, r))["input_ids"]) for r in train + held_out)
        if longest + g.max_new_tokens > cfg.train.seq_len:
            raise ConfigError(f"{cfg.origin}: train.seq_len={cfg.train.seq_len} is shorter than the longest prompt "
                              f"({longest} tokens) + grpo.max_new_tokens={g.max_new_tokens}")
        # The engines start from the base weights with the chat template beside them, written as policy version 0
        # under the run directory like every later version: engines on other nodes resolve it there (a folder in
        # the driver's temp dir exists on the driver's disk only).
        start = storage.join(run_dir(cfg), "policy", f"v{0:08d}")
        with tempfile.TemporaryDirectory(prefix="raysmol-grpo-base-") as d:
            storage.download_dir(str(self.base), d)
            hf_tok.save_pretrained(d)
            storage.upload_dir(d, start)
        pool = EnginePool(g.engine, start, num_engines=g.num_engines, version=0, timeout_s=g.rollout_timeout_s,
                          load_timeout_s=g.sync_timeout_s, start_timeout_s=g.rollout_timeout_s,
                          cpus_per_engine=g.cpus_per_engine,
                          gpus_per_engine=g.gpus_per_engine if cfg.train.use_gpu else 0,
                          options={"dtype": engine_dtype(cfg)})
        self.rollouts = Rollouts(cfg, pool, train, held_out, run_dir(cfg), self.init_uri)

    def objective(self, cfg: Config) -> Objective:
        g = cfg.grpo
        return partial(grpo, clip=g.clip, kl_beta=g.kl_beta, logprobs=g.logprobs, tis_cap=g.tis_cap)

    def batches(self, ctx: Context) -> tuple[Rollouts, None]:
        return self.rollouts.attach(ctx.rank, ctx.world, ctx.device), None

    def hooks(self) -> list[Hook]:
        return [self.rollouts]

    def summarise(self, cfg: Config, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {"grpo": {"data": cfg.grpo.data, "init_from": self.init_uri, **grpo_summary(rows, self.rollouts)}}

    def close(self) -> None:
        self.rollouts.shutdown()


def grpo_summary(rows: list[dict], rollouts: Rollouts) -> dict[str, Any]:
    """Mean reward of the first and last quarter of the steps (one step's reward swings by several points),
    held-out accuracy before and after, engine restarts."""
    train = [r for r in rows if "reward" in r]
    acc = [r for r in rows if "eval/accuracy" in r]
    k = max(1, len(train) // 4)
    return {"prompts": len(rollouts.train), "held_out_prompts": len(rollouts.held_out),
            "reward": {"first_steps": float(np.mean([r["reward"] for r in train[:k]])) if train else None,
                       "last_steps": float(np.mean([r["reward"] for r in train[-k:]])) if train else None,
                       "steps_averaged": k},
            "held_out_accuracy": {"start": acc[0]["eval/accuracy"] if acc else None,
                                  "end": acc[-1]["eval/accuracy"] if acc else None},
            "held_out_accuracy_sampled": {"start": acc[0].get("eval/accuracy_sampled") if acc else None,
                                          "end": acc[-1].get("eval/accuracy_sampled") if acc else None},
            "engine_restarts": max([r.get("engine_restarts", 0) for r in rows] + [0]),
            "sync_checks": sum(1 for r in rows if "sync_check" in r),
            "weight_sync": rollouts.cfg.grpo.weight_sync,
            "max_staleness": rollouts.cfg.grpo.max_staleness,
            "staleness_mean": float(np.mean(st)) if (st := [r["staleness_mean"] for r in train
                                                            if "staleness_mean" in r]) else None,
            "rollout_s_mean": float(np.mean(ro)) if (ro := [r["rollout_s"] for r in rows if "rollout_s" in r]) else None,
            "sync_s_mean": float(np.mean(syncs)) if (syncs := [r["sync_s"] for r in rows if "sync_s" in r]) else None}
