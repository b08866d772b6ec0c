"""Typed configuration: dataclasses are the source of truth, YAML only supplies values.

A config file is a YAML mapping whose keys mirror the dataclasses below (each field's docstring says what it
means). `key.sub=value` overrides (values parsed as YAML) are applied on top. Unknown keys, wrong types and
impossible values raise `ConfigError` naming the key and where it came from (the file, or "command line").
Each section checks its own fields (its `check` method); rules between sections live in `_cross_check`.
Values that follow from others (gradient accumulation, samples per step, vocabulary size of the built-in
tokenizer) are derived here, never written twice.

Post-training (sft, dpo, grpo) takes the model's shape from the starting model: `Config.adopt_model` reads its
Hugging Face config.json; a `model:` key the user set (`Config.explicit`) must agree with it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

DEFAULT_CONFIG = Path(__file__).resolve().parent / "jobs" / "tiny.yaml"


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type or impossible; the message names key and origin."""


# need(ok, key, message): raise ConfigError naming the origin and the key (relative to the section) unless ok.
Need = Callable[[bool, str, str], None]


def _positive(need: Need, section: Any, *keys: str) -> None:
    for key in keys:
        need(getattr(section, key) > 0, key, f"must be positive, got {getattr(section, key)}")


@dataclass
class RunSection:
    name: str = "tiny"
    """The run's name: its directory is <output_dir>/<name>/."""
    output_dir: str = "runs"
    """Where run directories live: a local path or an object-store URI (s3://...)."""
    category: Literal["main", "ablation", "evaluation", "debugging"] = "main"
    """What the compute-ledger books this run under (raysmol/ledger.py); time lost to restarts is always
    debugging."""
    trackers: list[Literal["tensorboard", "mlflow", "wandb"]] = field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers that mirror every metrics row rank 0 logs (raysmol/train/trackers.py): tensorboard
    (event files in the run directory), mlflow, wandb (pip install 'raysmol[tracking]' for the last two). []: none."""
    mlflow_uri: str = ""
    """MLflow tracking URI (http://host:5000, file:///path/mlruns, databricks, ...). Empty: a file store at
    <output_dir>/mlruns, shared by the runs beside this one (a sweep's trials share one)."""
    project: str = "raysmol"
    """The MLflow experiment and W&B project the run is tracked under (its run name: run.name)."""

    def check(self, need: Need) -> None:
        dup = sorted({t for t in self.trackers if self.trackers.count(t) > 1})
        need(not dup, "trackers", f"{', '.join(dup)} listed twice")
        need(bool(self.project), "project", "must not be empty")


@dataclass
class ModelConfig:
    arch: Literal["llama", "smollm3"] = "llama"
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    """num_kv_heads == num_heads is MHA, 1 is MQA, anything in between GQA."""
    intermediate_size: int = 512
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    nope_every: int = 0
    """SmolLM3: every k-th layer has no rotary embedding (NoPE). 0 = RoPE everywhere. Needs arch=smollm3."""
    vocab_size: int | None = None
    """None = the tokenizer's size (known without loading it for the built-in tokenizer)."""
    rms_norm_eps: float = 1e-5
    init_std: float = 0.02
    attn_implementation: Literal["auto", "sdpa", "eager", "varlen", "flash_attention_2", "flash_attention_3"] = "auto"
    """auto: on GPUs in bf16 flash-attn's varlen kernel if installed, else `varlen` (PyTorch's own flash varlen
    kernel); on CPUs sdpa. Packed documents never attend to each other under any of them (see raysmol/model)."""

    def check(self, need: Need) -> None:
        _positive(need, self, "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                  "max_position_embeddings")
        need(self.hidden_size % self.num_heads == 0, "num_heads",
             f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        need(self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
             f"num_heads {self.num_heads} must be divisible by num_kv_heads {self.num_kv_heads} "
             "(1 = MQA, num_heads = MHA)")
        need(self.nope_every >= 0, "nope_every", f"must be >= 0, got {self.nope_every}")
        need(self.nope_every == 0 or self.arch == "smollm3", "nope_every", "NoPE layers need model.arch: smollm3")
        need(self.rope_theta > 0, "rope_theta", f"must be positive, got {self.rope_theta}")
        need(self.vocab_size is None or self.vocab_size > 0, "vocab_size", f"must be positive, got {self.vocab_size}")


@dataclass
class TokenizerConfig:
    name: str = "builtin"
    """"builtin" (byte-level BPE trained on the embedded corpus), a local folder/tokenizer.json, or a hub repo id."""
    vocab_size: int = 8192
    """Only used for the built-in tokenizer."""

    def check(self, need: Need) -> None:
        need(self.vocab_size >= 256 + 1, "vocab_size",
             f"a byte-level BPE needs at least 257 entries, got {self.vocab_size}")


@dataclass
class SourceConfig:
    name: str = ""
    path: str = ""
    """A file, folder or glob; local, s3://, hf://; or builtin:prose|builtin:code|builtin:arithmetic."""
    weight: float = 0.0
    """Share of the mixture (weights are normalised; >= 0, at least one > 0)."""
    format: Literal["auto", "jsonl", "parquet", "text"] = "auto"
    text_field: str = "text"
    max_tokens: int | None = None
    """Prepare this many training tokens of the source (its first work items, in stream order) instead of what
    data.budget says; unset: data.budget decides."""


@dataclass
class StageConfig:
    """One stage of a staged mixture (SmolLM3: three stages, new math and code sources entering late)."""

    weights: dict[str, float] = field(default_factory=dict)
    """Source name -> share in this stage (normalised; a source left out, or at 0, is not read in it)."""
    until_step: int | None = None
    """The stage ends after this step (the last stage: train.steps, when neither end is given)."""
    until_tokens: int | None = None
    """Or: the stage ends once this many tokens have been trained on (rounded up to a whole step)."""
    name: str = ""
    """Shown in metrics, the summary and the loss plot (default stage<i>)."""


@dataclass(frozen=True)
class Stage:
    """A resolved stage: steps [start, end) of the run read `weights` (one per data.sources entry, normalised)."""

    name: str
    start: int
    end: int
    weights: tuple[float, ...]


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    """The pretraining mixture (not read by post-training runs). With `stages`, each source's weight comes from
    the stages and the `weight` here stays unset."""
    stages: list[StageConfig] = field(default_factory=list)
    """A staged mixture: each stage ends at a step or a token count and has its own weights; a source's stream
    continues across stages where it stopped (nothing repeated, nothing skipped). Empty: one stage, the sources'
    weights, for the whole run."""
    shuffle: bool = True
    """Shuffle documents in every epoch (the first included) and the order in which a source's windows are read,
    so a global batch draws from far-apart parts of each source. false: prepared order (for comparisons)."""
    seed: int = 1234
    """Seed of the mixture order, the document orders and the window order."""
    cache_dir: str = "~/.cache/raysmol"
    """Prepared token shards live under <cache_dir>/prepared/<hash of inputs>/ (local path or s3://)."""
    val_fraction: float = 0.01
    """Share of documents (by content hash) held out for validation loss."""
    intra_doc_masking: bool = True
    """Attention never crosses a document boundary and positions restart per document (SmolLM3)."""
    budget: Literal["run", "all"] = "run"
    """How much of each source to prepare (a source's max_tokens overrides it): "run" = the training tokens this
    run reads from it (sum over stages of steps x train.global_batch_tokens x the source's weight), times
    1 + budget_margin; "all" = the whole source. A larger budget later prepares only the difference."""
    budget_margin: float = 0.1
    """Extra share of the derived budget. Realised mixture shares stay within a fraction of a percent of the
    weights, but not exactly on them; a window reads one token past its end and a prefix of a source stops at a
    work item's end, not mid-document. The budget counts training-split tokens, so the validation split
    (val_fraction of documents) comes on top and needs no margin."""

    def check(self, need: Need) -> None:
        names = set()
        for i, s in enumerate(self.sources):
            k = f"sources.{i}"
            need(bool(s.name), f"{k}.name", "every source needs a name")
            need(s.name not in names, f"{k}.name", f"duplicate source name {s.name!r}")
            names.add(s.name)
            need(bool(s.path), f"{k}.path", f"source {s.name!r} needs a path")
            need(s.weight >= 0, f"{k}.weight",
                 f"source {s.name!r} has a negative weight {s.weight}; weights must be >= 0")
            need(s.max_tokens is None or s.max_tokens > 0, f"{k}.max_tokens",
                 f"must be a positive token count (or unset: data.budget decides), got {s.max_tokens}")
        if self.stages:
            set_here = [s.name for s in self.sources if s.weight]
            need(not set_here, "sources.*.weight", f"{set_here} have a weight here and data.stages is set: give "
                 "weights per stage (data.stages.<i>.weights) and leave sources' weights unset")
            for i, st in enumerate(self.stages):
                k = f"stages.{i}"
                unknown = sorted(set(st.weights) - names)
                need(not unknown, f"{k}.weights", f"unknown source(s) {unknown}; sources: {sorted(names)}")
                need(all(w >= 0 for w in st.weights.values()), f"{k}.weights", "weights must be >= 0")
                need(sum(st.weights.values()) > 0, f"{k}.weights", "weights sum to zero; at least one must be > 0")
                need(st.until_step is None or st.until_tokens is None, k, "give until_step or until_tokens, not both")
                need(st.until_step is None or st.until_step > 0, f"{k}.until_step", f"must be positive, got {st.until_step}")
                need(st.until_tokens is None or st.until_tokens > 0, f"{k}.until_tokens",
                     f"must be positive, got {st.until_tokens}")
                last = i == len(self.stages) - 1
                need(last or st.until_step is not None or st.until_tokens is not None, k,
                     "every stage but the last needs until_step or until_tokens")
        else:
            need(not self.sources or sum(s.weight for s in self.sources) > 0, "sources.*.weight",
                 "weights sum to zero; at least one must be > 0")
        need(0 <= self.val_fraction < 0.5, "val_fraction", f"must be in [0, 0.5), got {self.val_fraction}")
        need(0 <= self.budget_margin <= 10, "budget_margin", f"must be in [0, 10] (0.1 = 10%), got {self.budget_margin}")

    def stage_plan(self, train: "TrainConfig") -> list[Stage]:
        """The resolved stages of a run of train.steps steps (one stage when data.stages is empty): consecutive,
        covering [0, train.steps); a token end is rounded up to a whole step. Raises ConfigError when the ends are
        not increasing or past the run. Stages that start at or after train.steps are dropped."""
        names = [s.name for s in self.sources]
        if not self.stages:
            w = [s.weight for s in self.sources]
            return [Stage("all", 0, train.steps, tuple(x / sum(w) for x in w))]
        out, start = [], 0
        for i, st in enumerate(self.stages):
            if st.until_step is not None:
                end = st.until_step
            elif st.until_tokens is not None:
                end = -(-st.until_tokens // train.global_batch_tokens)
            else:
                end = train.steps
            if end <= start:
                raise ConfigError(f"data.stages.{i}: ends at step {end}, not after the previous stage's end {start}")
            w = [st.weights.get(n, 0.0) for n in names]
            out.append(Stage(st.name or f"stage{i}", start, end, tuple(x / sum(w) for x in w)))
            start = end
            if end >= train.steps:
                break
        if start < train.steps:
            raise ConfigError(f"data.stages: the last stage ends at step {start}, before train.steps={train.steps}; "
                              "leave the last stage's end unset (it runs to the end) or raise it")
        last = out[-1]
        out[-1] = Stage(last.name, last.start, train.steps, last.weights)
        return out


def _check_post_section(s: Any, mode: str, need: Need) -> None:
    """What every post-training section needs once its data is set: a starting model and a sane hold-out."""
    if s.data is None:
        return
    need(s.init_from is not None, "init_from", f"{mode} starts from a model: set it to a Hugging Face folder "
         "or a run directory")
    vf = getattr(s, "val_fraction", 0)
    need(0 <= vf < 1, "val_fraction", f"must be in [0, 1), got {vf}")


@dataclass
class SFTConfig:
    data: str | None = None
    """Chat conversations (jsonl or parquet rows with a list of {role, content} messages under `messages_key`,
    local or s3://). Set, the run is supervised fine-tuning: data.sources are not read, only assistant tokens
    carry loss, and conversations are packed whole (raysmol/post/chat.py)."""
    messages_key: str = "messages"
    init_from: str | None = None
    """The base model: a Hugging Face folder or a raysmol run directory (its hf/); its tokenizer is used, and its
    shape is the run's model section."""
    val_fraction: float = 0.05
    """Share of conversations (by content hash) held out for validation loss."""

    def check(self, need: Need) -> None:
        _check_post_section(self, "sft", need)


@dataclass
class DPOConfig:
    data: str | None = None
    """Preference pairs (jsonl or parquet rows {prompt, chosen, rejected}; prompt: text or a list of messages,
    chosen/rejected: the assistant's reply as text), local, s3:// or hf://. Set, the run is DPO: the model
    learns to prefer `chosen` over `rejected` relative to the frozen reference (the init_from model)."""
    init_from: str | None = None
    """The starting model and the frozen reference: a Hugging Face folder or a raysmol run directory (its hf/)."""
    beta: float = 0.1
    """Strength of the pull towards the reference (the sigmoid loss's beta): small = far from it."""
    loss: Literal["sigmoid", "ipo", "apo_zero", "apo_down"] = "sigmoid"
    """The preference loss (raysmol/post/preference_losses.py): sigmoid (DPO), ipo (a squared loss that pulls the
    margin to 1/(2 beta) instead of infinity), apo_zero (SmolLM3's: raise the chosen reply's likelihood, lower the
    rejected one's; when the chosen replies are better than the model's own) or apo_down (lower both, the rejected
    more; when the model is already better than the chosen replies)."""
    val_fraction: float = 0.05

    def check(self, need: Need) -> None:
        _check_post_section(self, "dpo", need)
        need(self.beta > 0, "beta", f"must be positive, got {self.beta}")


@dataclass
class GRPOConfig:
    data: str | None = None
    """Prompts with reference answers (jsonl or parquet rows {prompt, answer}; code rows {prompt, test,
    entry_point}), local, s3:// or hf://, or builtin:arithmetic / builtin:arithmetic-small. Set, the run is GRPO."""
    init_from: str | None = None
    """The starting policy: a Hugging Face folder or a raysmol run directory (its hf/)."""
    prompt_key: str = "prompt"
    """Column name of the prompt (GSM8K: question)."""
    answer_key: str = "answer"
    """Column name of the reference answer (GSM8K: answer; "#### N" answers are reduced to N)."""
    reward: str = "exact"
    """exact (the last number equals the answer), math (math-verify), code (tests pass in the sandbox), or
    "module:function" called as function(completion: str, row: dict) -> float."""
    group_size: int = 8
    """Completions per prompt (the group whose rewards normalise each other)."""
    prompts_per_step: int = 8
    """Prompts per optimizer step; prompts_per_step * group_size * train.seq_len must equal global_batch_tokens."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 48
    clip: float = 0.2
    """PPO-style clipping of the probability ratio between the trained policy and the one that sampled."""
    kl_beta: float = 0.0
    """Weight of the KL penalty to the init_from model (0 = none, and no reference model is kept)."""
    logprobs: Literal["trainer", "engine"] = "trainer"
    """The ratio's denominator. trainer: the trainer's own log-probs of the sampled tokens under the weights that
    sampled them (verl's way: the ratio is exactly 1 on-policy whatever the engine's kernels and precision; see
    recompute_logps); engine: the log-probs the engine reported while sampling."""
    recompute_logps: bool = False
    """Where logprobs: trainer takes the denominator. raysmol makes one update per rollout, so the weights that
    sampled (overlapped: the current ones) are those of the loss's own forward: false takes that forward's
    log-probs, detached (TRL's way with num_iterations=1); true recomputes them in a second forward (no grad)
    before the step's update, as verl does for its several updates per rollout. The same loss and gradients bit
    for bit (tested); false saves one forward per step."""
    tis_cap: float | None = None
    """Truncated importance sampling (Yao et al. 2025): weight each token's surrogate by
    min(exp(trainer - engine log-prob), tis_cap), correcting for the engine sampling from a slightly different
    distribution than the trainer's weights give; None: off. Needs logprobs: trainer (with engine the ratio
    already carries that weight, untruncated)."""
    max_staleness: int = 0
    """Rollouts in flight while a step trains: the engines generate the next max_staleness steps' completions
    during the update, so a step may train on samples of a policy up to this many updates old (every sample's
    version is checked and logged). 0: each step's rollout comes from the current weights (the synchronous
    loop). Above 0 it needs tis_cap (the off-policy samples' importance weight). A restart refills the pipeline
    on-policy."""
    engine: Literal["transformers", "vllm"] = "transformers"
    engine_dtype: Literal["float32", "bfloat16", "float16", "auto"] | None = None
    """The engines' dtype; None: the trainer's precision (float32, or bfloat16 when train.precision is bf16),
    so that engine and trainer compute the same probabilities. auto (vllm only): vLLM's choice, 16-bit for a
    float32 checkpoint."""
    num_engines: int = 1
    gpus_per_engine: float = 1.0
    """GPUs per engine actor when train.use_gpu (CPU engines take cpus_per_engine)."""
    cpus_per_engine: float = 1.0
    reward_tasks: int = 4
    """A step's groups are scored by up to `reward_tasks` Ray tasks, each reserving `reward_cpus` CPUs."""
    reward_cpus: float = 0.0
    """0: none, so scoring never waits for a CPU that trainers and engines hold; raise both for heavy code
    rewards."""
    rollout_timeout_s: float = 300.0
    sync_timeout_s: float = 300.0
    """A weight sync (every engine loading the new weights) that runs past this counts as a lost engine: it is
    replaced (re-synced) and the sync retried once."""
    weight_sync: Literal["object_store", "files"] = "object_store"
    """How each update's weights reach the engines. object_store: rank 0 puts the gathered state dict into Ray's
    object store in buckets of sync_bucket_mb and every engine loads them in order, no files; files: rank 0 writes
    a Hugging Face folder under the run directory (`policy/`) and every engine reads it (object storage or a
    shared disk must reach every node)."""
    sync_bucket_mb: float = 256.0
    """object_store: the most MiB of named tensors in one ray.put (one tensor larger than this is a bucket alone)."""
    eval_prompts: int = 200
    """Prompts held out (the first of a seeded permutation) and scored greedily through the reward at every
    validation: `eval/accuracy` (exact match with reward: exact)."""
    verify_sync: bool = False
    """After every weight sync, check that the engines report the new version and that their greedy completions
    equal the trained weights' own (slow: a debugging and test aid)."""

    def check(self, need: Need) -> None:
        _check_post_section(self, "grpo", need)
        if self.data is None:
            return
        need(self.group_size >= 2, "group_size", f"a group needs >= 2 completions to normalise, got {self.group_size}")
        need(self.temperature > 0, "temperature", f"sampling needs a positive temperature, got {self.temperature}")
        need(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        need(self.clip > 0, "clip", f"must be positive, got {self.clip}")
        need(self.kl_beta >= 0, "kl_beta", f"must be >= 0, got {self.kl_beta}")
        need(self.tis_cap is None or self.tis_cap > 0, "tis_cap", f"must be positive (null: off), got {self.tis_cap}")
        need(self.max_staleness >= 0, "max_staleness", f"must be >= 0 (0: the synchronous loop), got {self.max_staleness}")
        need(self.max_staleness == 0 or (self.tis_cap is not None and self.logprobs == "trainer"), "max_staleness",
             f"{self.max_staleness} trains on samples of older weights: it needs logprobs: trainer and tis_cap (e.g. "
             "2.0), which weights each token by pi_current / pi_sampling (capped); got logprobs: "
             f"{self.logprobs}, tis_cap: {self.tis_cap}")
        need(self.tis_cap is None or self.logprobs == "trainer", "tis_cap",
             "needs logprobs: trainer (with logprobs: engine the ratio already weights by trainer/engine)")
        need(self.engine_dtype != "auto" or self.engine == "vllm", "engine_dtype",
             "auto is vLLM's choice; the transformers engine needs float32, bfloat16 or float16 (or null)")
        need(self.num_engines >= 1, "num_engines", f"must be >= 1, got {self.num_engines}")
        need(self.reward_cpus >= 0, "reward_cpus", f"must be >= 0, got {self.reward_cpus}")
        need(self.reward_tasks >= 1, "reward_tasks", f"must be >= 1, got {self.reward_tasks}")
        need(self.rollout_timeout_s > 0 and self.sync_timeout_s > 0, "rollout_timeout_s/sync_timeout_s",
             "must be positive")
        need(self.eval_prompts >= 0, "eval_prompts", f"must be >= 0, got {self.eval_prompts}")
        need(self.sync_bucket_mb > 0, "sync_bucket_mb", f"must be positive, got {self.sync_bucket_mb}")


@dataclass
class OptimConfig:
    lr: float = 3e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Gradient-norm clipping (0 = off)."""
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 30
    """Linear warm-up; fewer than train.steps."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr (cosine and wsd)."""
    decay_fraction: float = 0.2
    """wsd only: the share of steps spent in the final linear decay."""

    def check(self, need: Need) -> None:
        need(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        need(0 < self.decay_fraction <= 1, "decay_fraction", f"must be in (0, 1], got {self.decay_fraction}")
        need(self.grad_clip >= 0, "grad_clip", f"must be >= 0 (0 = off), got {self.grad_clip}")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1/beta2", "must be in [0, 1)")


@dataclass
class TrainConfig:
    steps: int = 300
    global_batch_tokens: int = 2048
    """Tokens per optimizer step, whatever the world size: a whole number of micro_batch_size x seq_len x
    workers passes (gradient accumulation makes up the rest)."""
    micro_batch_size: int = 8
    seq_len: int = 128
    num_workers: int = 2
    min_workers: int | None = None
    """Elastic training: with min_workers < num_workers Ray Train starts with as many workers as fit (at least
    min_workers) and restarts at a new size when nodes come or go; the global batch stays the same."""
    elastic_resize_interval_s: float = 60.0
    """Elastic training: how often Ray Train looks for room to grow (nodes that joined since the start)."""
    use_gpu: bool = False
    zero_stage: int = 2
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto = bf16 on GPUs, fp32 on CPUs."""
    seed: int = 0
    log_every: int = 1
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    keep_every: int = 0
    """Checkpoints whose step is a multiple of this are kept for good (never pruned, by raysmol or by Ray Train), in
    addition to the newest keep_checkpoints: a multiple of checkpoint_every (only saved steps can be kept). 0: off."""
    export_every: int = 0
    """A Hugging Face folder (weights and tokenizer) every N steps at <run_dir>/exports/step_<step, 8 digits>/, in
    addition to the final hf/ (the last step gets one too when it is a multiple). Any N >= 1; 0: off."""
    sample_prompts: str | None = None
    """A prompts file (local or a URI; .jsonl with "prompt", or one prompt per line) read when the run starts: at
    every export (needs export_every) rank 0 writes greedy completions of them, through the chat template where the
    tokenizer has one, to <run_dir>/samples/step_<step, 8 digits>.jsonl. None: off."""
    sample_max_tokens: int = 64
    eval_every: int = 0
    """Validation loss every N steps (0 = only before the first and after the last step)."""
    eval_batches: int = 4
    eval_suite: str | None = None
    """A CF/MCF suite (e.g. eval/suites/tiny.yaml) scored in-process with validation loss at every eval (the
    first eval_suite_samples samples of each task; accuracy as metrics eval/<task>). None: loss only."""
    eval_suite_samples: int = 64
    peak_flops: float | None = None
    """Peak FLOP/s per device for MFU; None = looked up from the GPU name (no MFU on CPU)."""
    cpu_threads_per_worker: int = 1
    """torch threads per worker on CPU: logical Ray CPUs may exceed physical cores."""
    max_failures: int = 3
    """Worker failures Ray Train recovers from (restart from the newest committed checkpoint) before giving up."""
    allow_changes: list[str] = field(default_factory=list)
    """Resuming (the same run.name with checkpoints): config changes that alter the training trajectory that are
    allowed anyway, as dotted keys or key prefixes (e.g. [data.sources, optim.lr]); without them such a change
    stops the run. Harmless keys (train.steps, eval and logging cadence, workers, faults, guard, ...) need no
    entry; raysmol/train/resume_check.py lists them. The changes go into summary.json's `resume`."""
    liger: bool = False
    """GPU path (raysmol.model.prepare_for_training): Liger kernels for RMSNorm, SwiGLU, RoPE and the fused
    linear cross-entropy (needs the liger-kernel package and GPUs)."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass: less memory, ~1/3 more compute."""
    compile: bool = False
    """torch.compile the model's forward (first steps pay the compilation)."""
    init_from: str | None = None
    """Continued pretraining: start from a Hugging Face model folder, a raysmol run directory or one of its
    checkpoints (<run>/checkpoints/checkpoint_<step>) instead of random weights. The model's shape and tokenizer
    come from it (a model: key that disagrees is an error). None: from scratch."""
    init_carry: list[Literal["optimizer", "schedule", "data"]] = field(default_factory=list)
    """What else to carry over from init_from's checkpoint (a run directory: its newest): optimizer (AdamW
    moments), schedule (the step count, so the lr schedule and train.steps continue from its step) and data (the
    data position: reading continues where it stopped). Empty: the weights only, a fresh run."""

    def samples_per_step(self) -> int:
        return self.global_batch_tokens // self.seq_len

    def eval_due(self, step: int) -> bool:
        """Validation (and the eval suite) follows this step: every eval_every steps and after the last."""
        return bool(self.eval_every and step % self.eval_every == 0) or step == self.steps

    def checkpoint_due(self, step: int) -> bool:
        return step % self.checkpoint_every == 0 or step == self.steps

    def export_due(self, step: int) -> bool:
        return bool(self.export_every and step % self.export_every == 0)

    def tokens_per_pass(self, world_size: int) -> int:
        """Tokens of one forward/backward pass over all workers: micro_batch_size x seq_len x world_size."""
        return self.micro_batch_size * self.seq_len * world_size

    def splits_over(self, world_size: int) -> bool:
        """The global-batch rule: global_batch_tokens is a whole number of passes at this world size."""
        return self.global_batch_tokens % self.tokens_per_pass(world_size) == 0

    def grad_accum(self, world_size: int) -> int:
        """Gradient accumulation that keeps the global batch fixed at this world size."""
        per_pass = self.tokens_per_pass(world_size)
        if not self.splits_over(world_size):
            raise ConfigError(
                f"train.global_batch_tokens={self.global_batch_tokens} is not a multiple of "
                f"micro_batch_size*seq_len*world_size = {self.micro_batch_size}*{self.seq_len}*{world_size} = "
                f"{per_pass}"
            )
        return self.global_batch_tokens // per_pass

    def check(self, need: Need) -> None:
        _positive(need, self, "steps", "global_batch_tokens", "micro_batch_size", "seq_len", "num_workers",
                  "log_every", "checkpoint_every", "keep_checkpoints", "eval_batches", "cpu_threads_per_worker")
        need(self.eval_every >= 0, "eval_every", f"must be >= 0, got {self.eval_every}")
        need(self.keep_every >= 0, "keep_every", f"must be >= 0 (0: off), got {self.keep_every}")
        need(self.keep_every % self.checkpoint_every == 0, "keep_every",
             f"{self.keep_every} is not a multiple of train.checkpoint_every={self.checkpoint_every}: only saved steps "
             f"can be kept (e.g. {self.checkpoint_every * max(1, round(self.keep_every / self.checkpoint_every))})")
        need(self.export_every >= 0, "export_every", f"must be >= 0 (0: off), got {self.export_every}")
        need(self.sample_max_tokens > 0, "sample_max_tokens", f"must be positive, got {self.sample_max_tokens}")
        need(not self.sample_prompts or self.export_every > 0, "sample_prompts",
             "completions are written at every export: set train.export_every too (e.g. train.export_every=100)")
        need(self.eval_suite_samples > 0, "eval_suite_samples", f"must be positive, got {self.eval_suite_samples}")
        need(self.eval_suite is None or os.path.isfile(self.eval_suite), "eval_suite",
             f"no such suite file {self.eval_suite!r} (e.g. eval/suites/tiny.yaml)")
        need(self.zero_stage in (0, 1, 2, 3), "zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        need(not (self.precision == "bf16" and not self.use_gpu), "precision",
             "bf16 needs train.use_gpu: true; use auto or fp32")
        need(self.min_workers is None or 1 <= self.min_workers <= self.num_workers, "min_workers",
             f"must be in [1, train.num_workers={self.num_workers}], got {self.min_workers}")
        need(self.max_failures >= 0, "max_failures", f"must be >= 0, got {self.max_failures}")
        need(self.elastic_resize_interval_s > 0, "elastic_resize_interval_s",
             f"must be positive, got {self.elastic_resize_interval_s}")
        need(not (self.liger and not self.use_gpu), "liger",
             "Liger kernels are Triton GPU kernels: needs train.use_gpu: true")
        need(self.peak_flops is None or self.peak_flops > 0, "peak_flops", f"must be positive, got {self.peak_flops}")
        need(not self.init_carry or self.init_from is not None, "init_carry",
             f"{self.init_carry} carries state from train.init_from, which is not set")
        need(len(set(self.init_carry)) == len(self.init_carry), "init_carry", f"duplicates in {self.init_carry}")


@dataclass
class GuardConfig:
    """Loss-spike guard (see raysmol/train/guard.py)."""

    action: Literal["off", "log", "skip", "rollback"] = "log"
    """off | log (record only) | skip (drop the update) | rollback (reload the last checkpoint, skip data)."""
    window: int = 50
    min_steps: int = 20
    """Steps of healthy statistics needed before anything is flagged (non-finite values always are)."""
    loss_zscore: float = 6.0
    grad_norm_factor: float = 10.0
    skip_batches: int = 10
    """rollback: data batches skipped at the spike."""
    lr_factor: float = 1.0
    """rollback: lr multiplier for the next lr_steps steps."""
    lr_steps: int = 0
    max_rollbacks: int = 3

    def check(self, need: Need) -> None:
        _positive(need, self, "window", "min_steps", "max_rollbacks")
        need(self.min_steps <= self.window, "min_steps", f"must be <= guard.window={self.window}, got {self.min_steps}")
        _positive(need, self, "loss_zscore", "grad_norm_factor", "lr_factor")
        need(self.skip_batches >= 0 and self.lr_steps >= 0, "skip_batches/lr_steps", "must be >= 0")


@dataclass
class WatchdogConfig:
    """Hang detection (see raysmol/train/watchdog.py): a rank that makes no progress within the bound is dumped
    (its stack, into <run>/hangs/) and exits, so Ray Train restarts the group from the newest checkpoint instead
    of waiting out the process group's 30-minute timeout."""

    enabled: bool = True
    step_timeout_s: float = 60.0
    """The least a step may take before it counts as hung."""
    step_multiple: float = 20.0
    """...or this multiple of the median of the last steps' times, whichever is larger (a slow model is not hung)."""
    other_timeout_s: float = 1800.0
    """Outside the steps: start-up to the first step (loading, resharding) and a checkpoint or export (upload)."""

    def check(self, need: Need) -> None:
        _positive(need, self, "step_timeout_s", "step_multiple", "other_timeout_s")


@dataclass
class FaultsConfig:
    """Fault drills for tests and rehearsals; all off unless set. Each fires once per run (a marker in
    the run directory remembers it), so the restarted run gets past it. Steps are in [1, train.steps]; each
    *_at_step key takes one step or a list of them (a chaos rehearsal fires the same drill more than once)."""

    crash_at_step: int | list[int] | None = None
    """Crash `crash_rank` right after this step's update."""
    crash_rank: int = 0
    crash_mode: Literal["exception", "exit"] = "exception"
    """exit = os._exit, no cleanup (like a segfault)."""
    crash_after_report_at_step: int | list[int] | None = None
    """Hard exit right after reporting this step's checkpoint (a checkpoint step)."""
    kill_during_save_at_step: int | list[int] | None = None
    """crash_rank dies mid-checkpoint: the others' files land (a checkpoint step)."""
    spike_at_step: int | list[int] | None = None
    """Multiply the loss (and so the gradients) by spike_factor."""
    spike_factor: float = 50.0
    nan_at_step: int | list[int] | None = None
    """Make the loss NaN."""
    pause_at_step: int | list[int] | None = None
    """Every rank sleeps pause_seconds after this step (once): a window to kill a worker from outside."""
    pause_seconds: float = 30.0
    kill_engine_at_step: int | list[int] | None = None
    """GRPO: kill engine actor 0 just before this step's rollout (once); the rollout must go on on its
    replacement."""
    hang_at_step: int | list[int] | None = None
    """crash_rank blocks forever right after this step's update (once): the watchdog must catch it."""
    hang_sync_at_step: int | list[int] | None = None
    """GRPO: engine actor 0 blocks forever in the weight sync after this step's update (once, either
    grpo.weight_sync); the sync must time out (grpo.sync_timeout_s), the engine be replaced and re-synced, and
    the run go on."""

    # No check of its own: every drill is checked against train (steps, ranks, checkpoints) in _cross_check.

    def steps(self, key: str) -> list[int]:
        """The steps the drill `key` (one of FAULT_STEPS) fires at."""
        v = getattr(self, key)
        return [] if v is None else [v] if isinstance(v, int) else list(v)

    def at(self, key: str, step: int) -> bool:
        return step in self.steps(key)


FAULT_STEPS = ("crash_at_step", "crash_after_report_at_step", "kill_during_save_at_step", "spike_at_step",
               "nan_at_step", "pause_at_step", "kill_engine_at_step", "hang_at_step",
               "hang_sync_at_step")
POST_TRAINING = ("sft", "dpo", "grpo")


def _meta(default_factory: Callable[[], Any] | None = None, **kw: Any) -> Any:
    """A field that describes the config (where it came from) but is not part of it: not a YAML key, not in
    to_dict() or hash(), not compared."""
    if default_factory is not None:
        kw["default_factory"] = default_factory
    return field(compare=False, repr=False, metadata={"meta": True}, **kw)


def _keys(cls: type) -> list[str]:
    """The YAML keys of a config dataclass (its fields, less the meta fields)."""
    return [f.name for f in dataclasses.fields(cls) if not f.metadata.get("meta")]


@dataclass
class Config:
    run: RunSection = field(default_factory=RunSection)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    origin: str = _meta(default="<defaults>")
    """Where the values came from, for error messages."""
    explicit: set[str] = _meta(default_factory=set)
    """Dotted keys the user gave (in the YAML, an override or a dict), e.g. "model.hidden_size"; the others hold
    their defaults (or, after adopt_model, the base model's values)."""
    model_from: str | None = _meta(default=None)
    """After adopt_model: the model section came from this base model (e.g. "sft.init_from='runs/tiny'")."""

    def vocab_size(self) -> int:
        if self.model.vocab_size is not None:
            return self.model.vocab_size
        if self.tokenizer.name == "builtin":
            return self.tokenizer.vocab_size
        raise ConfigError(
            f"{self.origin}: model.vocab_size is required when tokenizer.name is not 'builtin' "
            f"(set it to the size of {self.tokenizer.name!r})"
        )

    def post_training(self) -> str | None:
        """"sft", "dpo" or "grpo" when that section has data (at most one may), else None (pretraining)."""
        modes = [m for m in POST_TRAINING if getattr(self, m).data is not None]
        return modes[0] if modes else None

    def adopt_model(self, hf: dict[str, Any], source_key: str) -> None:
        """Take the model section from a base model's Hugging Face config.json `hf` (llama or smollm3), the model
        named by the config key `source_key` (e.g. "sft.init_from"), then validate again.

        Model keys the user set explicitly must agree with the base model (ConfigError naming the key, both
        values, the origin and source_key); the others take the base model's values. attn_implementation (a
        runtime choice) is kept, as is any key the base's config cannot express exactly.
        """
        source = _describe_key(self, source_key)
        shape = hf_model_shape(hf, f"{self.origin}: {source}")
        m = self.model
        wrong = [f"model.{k}: config {getattr(m, k)!r} vs model {v!r}" for k, v in shape.items()
                 if f"model.{k}" in self.explicit and getattr(m, k) is not None and getattr(m, k) != v]
        if wrong:
            raise ConfigError(f"{self.origin}: {source} does not have the config's model shape ({'; '.join(wrong)}); "
                              f"remove the model section (post-training takes the shape from {source_key}) or make "
                              "it agree")
        for k, v in shape.items():
            setattr(m, k, v)
        self.model_from = source
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return {k: dataclasses.asdict(getattr(self, k)) for k in _keys(Config)}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def _describe_key(cfg: Config, key: str) -> str:
    """`key=value` for a dotted config key (just `key` when it names no value)."""
    obj: Any = cfg
    for part in key.split("."):
        if not dataclasses.is_dataclass(obj) or part not in _keys(type(obj)):
            return key
        obj = getattr(obj, part)
    return f"{key}={obj!r}"


def hf_model_shape(hf: dict[str, Any], what: str = "the base model") -> dict[str, Any]:
    """The model-section values of a Hugging Face config.json (the reverse of raysmol.model.hf_config).

    Keys the file leaves out take the model type's defaults (transformers fills them in). Only keys with an
    exact counterpart are returned: nope_every only when the NoPE layers are every k-th one (or none).
    """
    kind = hf.get("model_type")
    if kind not in ("llama", "smollm3"):
        raise ConfigError(f"{what} is a {kind!r} model; raysmol's model section describes llama and smollm3 models")
    import transformers

    full = transformers.AutoConfig.for_model(kind, **{k: v for k, v in hf.items() if k != "model_type"}).to_dict()
    rope = {**(full.get("rope_scaling") or {}), **(full.get("rope_parameters") or {})}
    shape: dict[str, Any] = {
        "arch": kind,
        "hidden_size": full.get("hidden_size"),
        "num_layers": full.get("num_hidden_layers"),
        "num_heads": full.get("num_attention_heads"),
        "num_kv_heads": full.get("num_key_value_heads") or full.get("num_attention_heads"),
        "intermediate_size": full.get("intermediate_size"),
        "max_position_embeddings": full.get("max_position_embeddings"),
        "rope_theta": full.get("rope_theta") or rope.get("rope_theta"),
        "tie_embeddings": full.get("tie_word_embeddings"),
        "vocab_size": full.get("vocab_size"),
        "rms_norm_eps": full.get("rms_norm_eps"),
        "init_std": full.get("initializer_range"),
        "nope_every": 0 if kind == "llama" else _nope_every(full.get("no_rope_layers"), full.get("num_hidden_layers")),
    }
    hints = typing.get_type_hints(ModelConfig)
    return {k: _convert(hints[k], v, f"model.{k}", what) for k, v in shape.items() if v is not None}


def _nope_every(layers: list[int] | None, n: int | None) -> int | None:
    """k when exactly every k-th layer (1-based) has no RoPE, 0 when none, None when another pattern."""
    if not isinstance(layers, list) or len(layers) != n:
        return None
    return next((k for k in range(n + 1) if layers == [int(k == 0 or (i + 1) % k != 0) for i in range(n)]), None)


# ---------------------------------------------------------------- loading


def read_yaml_mapping(path: str | Path, what: str = "config", error: type[ConfigError] = ConfigError) -> dict:
    """A YAML file whose top level is a mapping (empty file: {}); `error` names the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise error(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML file (default: the embedded `raysmol/jobs/tiny.yaml`), apply `key.sub=value` overrides,
    validate."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    raw = read_yaml_mapping(path)
    explicit: set[str] = set()
    cfg = build_section(Config, raw, "", str(path), explicit)
    cfg.explicit = explicit
    for item in overrides:
        apply_override(cfg, item)
    cfg.origin = str(path)
    validate(cfg)
    return cfg


def from_dict(raw: dict[str, Any], origin: str = "<dict>") -> Config:
    """A config from a mapping (every key given counts as explicit), validated."""
    explicit: set[str] = set()
    cfg = build_section(Config, raw, "", origin, explicit)
    cfg.explicit = explicit
    cfg.origin = origin
    validate(cfg)
    return cfg


def apply_override(cfg: Config, item: str) -> None:
    """Apply one `a.b.c=value` (list items by index: `data.sources.0.weight=0.5`); the key becomes explicit."""
    where = "command line"
    if "=" not in item:
        raise ConfigError(f"{where}: override {item!r} must look like key.sub=value")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: {key}: cannot parse value {text!r}: {e}") from e
    parts = key.strip().split(".")
    obj: Any = cfg
    for i, part in enumerate(parts[:-1]):
        obj = _child(obj, part, ".".join(parts[: i + 1]), where)
    last = parts[-1]
    full = key.strip()
    given = {full}
    if isinstance(obj, list):
        idx = _index(obj, last, full, where)
        obj[idx] = build_section(type(obj[idx]), value, full, where, given)
    else:
        hints = typing.get_type_hints(type(obj))
        if last not in _keys(type(obj)):
            raise ConfigError(_unknown(full, type(obj), where))
        setattr(obj, last, _convert(hints[last], value, full, where, given))
    cfg.explicit |= given


def _child(obj: Any, part: str, key: str, where: str) -> Any:
    if isinstance(obj, list):
        return obj[_index(obj, part, key, where)]
    if not dataclasses.is_dataclass(obj) or part not in _keys(type(obj)):
        raise ConfigError(_unknown(key, type(obj), where))
    return getattr(obj, part)


def _index(lst: list, part: str, key: str, where: str) -> int:
    if not part.isdigit() or int(part) >= len(lst):
        raise ConfigError(f"{where}: {key}: list index must be 0..{len(lst) - 1}, got {part!r}")
    return int(part)


def _unknown(key: str, cls: type, where: str) -> str:
    return f"{where}: unknown key {key!r}; valid keys here: {', '.join(_keys(cls))}"


def build_section(cls: type, raw: Any, prefix: str, where: str, explicit: set[str] | None = None) -> Any:
    """A config dataclass `cls` from a mapping: unknown keys and wrong types are ConfigErrors naming `where` and
    the dotted key (`prefix` + key). The dotted keys given are added to `explicit` when one is passed."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {prefix or '<top>'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = _keys(cls)
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(_unknown(full, cls, where))
        kwargs[key] = _convert(hints[key], value, full, where, explicit)
        if explicit is not None:
            explicit.add(full)
    return cls(**kwargs)




def _convert(tp: Any, value: Any, key: str, where: str, explicit: set[str] | None = None) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for tp_ in inner[:-1]:  # the first type the value fits (int | list[int]: a step or a list of steps)
            try:
                return _convert(tp_, value, key, where, explicit)
            except ConfigError:
                pass
        return _convert(inner[-1], value, key, where, explicit)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {key}: expected a list, got {value!r}")
        return [_convert(args[0], v, f"{key}.{i}", where, explicit) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key}: expected a mapping, got {value!r}")
        return {_convert(args[0], k, key, where): _convert(args[1], v, f"{key}.{k}", where) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build_section(tp, value, key, where, explicit)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # YAML reads 3e-4 as a string (no dot in the mantissa); accept it as a number.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} for {key}")


# ---------------------------------------------------------------- validation


def validate(cfg: Config) -> None:
    """Impossible values are errors that say which key and what would be valid: each section's own fields
    first (its `check`), then the rules between sections."""
    for name in _keys(Config):
        section = getattr(cfg, name)
        if hasattr(section, "check"):
            section.check(_need(cfg.origin, f"{name}."))
    _cross_check(cfg, _need(cfg.origin))


def _need(where: str, prefix: str = "") -> Need:
    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{where}: {prefix}{key}: {msg}")

    return need


def _cross_check(cfg: Config, need: Need) -> None:
    """Rules that relate sections (keys are full dotted names here)."""
    m, t, f, r = cfg.model, cfg.train, cfg.faults, cfg.grpo
    modes = [x for x in POST_TRAINING if getattr(cfg, x).data is not None]
    # Post-training takes the model's shape from init_from (adopt_model): until then only explicit keys are known.
    if not modes or cfg.model_from or "model.max_position_embeddings" in cfg.explicit:
        need(t.seq_len <= m.max_position_embeddings, "train.seq_len",
             f"{t.seq_len} exceeds what the model can hold (model.max_position_embeddings={m.max_position_embeddings})")
    per_worker = t.tokens_per_pass(t.num_workers)
    need(t.splits_over(t.num_workers), "train.global_batch_tokens",
         f"{t.global_batch_tokens} is not a multiple of micro_batch_size*seq_len*num_workers = {per_worker}; "
         f"nearest valid: {max(per_worker, round(t.global_batch_tokens / per_worker) * per_worker)}")
    if t.min_workers is not None:
        bad = [w for w in range(t.min_workers, t.num_workers + 1) if not t.splits_over(w)]
        need(not bad, "train.min_workers", f"train.global_batch_tokens={t.global_batch_tokens} does not split over "
             f"{bad} workers x micro_batch_size x seq_len; every size in [min_workers, num_workers] must divide it")
    need(not (m.attn_implementation.startswith("flash_attention") and not t.use_gpu), "model.attn_implementation",
         f"{m.attn_implementation} needs train.use_gpu: true; on CPUs use auto, sdpa, eager or varlen")
    need(not (m.attn_implementation == "varlen" and t.use_gpu and t.precision == "fp32"), "model.attn_implementation",
         "varlen runs flash kernels, which need bf16 on GPUs: set train.precision: bf16 (or auto) or use sdpa")
    need(len(modes) <= 1, f"{modes[-1]}.data" if modes else "sft.data",
         f"{' and '.join(x + '.data' for x in modes)} are all set; a run does one kind of post-training")
    need(bool(cfg.data.sources) or bool(modes), "data.sources",
         "at least one source is needed (or sft.data, dpo.data or grpo.data, for post-training)")
    need(not (modes and t.init_from), "train.init_from",
         f"continued pretraining only; {modes[0] if modes else ''}.init_from is where post-training starts")
    if cfg.data.stages and not modes:
        try:
            cfg.data.stage_plan(t)
        except ConfigError as e:  # stage_plan's message starts with the key
            key, msg = str(e).split(": ", 1)
            need(False, key, msg)
    if r.data is not None:
        need(r.prompts_per_step * r.group_size * t.seq_len == t.global_batch_tokens, "grpo.prompts_per_step",
             f"prompts_per_step x group_size x train.seq_len = {r.prompts_per_step} x {r.group_size} x {t.seq_len} "
             f"must equal train.global_batch_tokens={t.global_batch_tokens} (one row per completion)")
        need(r.prompts_per_step % t.num_workers == 0, "grpo.prompts_per_step",
             f"{r.prompts_per_step} prompts do not split over train.num_workers={t.num_workers} "
             "(a group stays on one rank)")
        need(t.min_workers is None or t.min_workers == t.num_workers, "train.min_workers",
             "GRPO runs at a fixed world size (groups are split over ranks)")
        need(0 < r.max_new_tokens < t.seq_len, "grpo.max_new_tokens", f"must be in (0, train.seq_len={t.seq_len})")
    need(0 <= f.crash_rank < t.num_workers, "faults.crash_rank",
         f"must be a rank in [0, {t.num_workers}), got {f.crash_rank}")
    for key in FAULT_STEPS:
        bad = [v for v in f.steps(key) if not 1 <= v <= t.steps]
        need(not bad, f"faults.{key}", f"must be a step in [1, train.steps={t.steps}] (or a list of them), got {bad[0] if bad else ''}")
    need(not f.steps("hang_at_step") or cfg.watchdog.enabled, "faults.hang_at_step",
         "blocks a rank forever: it needs watchdog.enabled: true to be caught")
    for key in ("crash_after_report_at_step", "kill_during_save_at_step"):
        bad = [v for v in f.steps(key) if not t.checkpoint_due(v)]
        need(not bad, f"faults.{key}",
             f"step {bad[0] if bad else ''} saves no checkpoint (train.checkpoint_every={t.checkpoint_every})")
    need(0 <= cfg.optim.warmup_steps < t.steps, "optim.warmup_steps",
         f"must be in [0, train.steps={t.steps}), got {cfg.optim.warmup_steps}")
