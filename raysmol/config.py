"""Typed configuration: dataclasses are the source of truth, YAML only supplies values.

A config file is a YAML mapping whose keys mirror the dataclasses below. `key.sub=value` overrides
(values parsed as YAML) are applied on top. Unknown keys, wrong types and impossible values raise
`ConfigError` naming the key and where it came from (the file, or "command line"). Values that follow
from others (gradient accumulation, samples per step, vocabulary size of the built-in tokenizer) are
derived here, never written twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "jobs" / "tiny.yaml"


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type or impossible; the message names key and origin."""


@dataclass
class RunSection:
    name: str = "tiny"
    # Run directory is <output_dir>/<name>/: a local path or an object-store URI (s3://...).
    output_dir: str = "runs"
    # What the compute-ledger books this run under (raysmol/ledger.py); time lost to restarts is always debugging.
    category: Literal["main", "ablation", "evaluation", "debugging"] = "main"


@dataclass
class ModelConfig:
    arch: Literal["llama", "smollm3"] = "llama"
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    # num_kv_heads == num_heads is MHA, 1 is MQA, anything in between GQA.
    num_kv_heads: int = 2
    intermediate_size: int = 512
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    # SmolLM3: every k-th layer has no rotary embedding (NoPE). 0 = RoPE everywhere. Needs arch=smollm3.
    nope_every: int = 0
    # None = the tokenizer's size (known without loading it for the built-in tokenizer).
    vocab_size: int | None = None
    rms_norm_eps: float = 1e-5
    init_std: float = 0.02
    # auto: on GPUs in bf16 flash-attn's varlen kernel if installed, else `varlen` (PyTorch's own flash varlen
    # kernel); on CPUs sdpa. Packed documents never attend to each other under any of them (see raysmol/model).
    attn_implementation: Literal["auto", "sdpa", "eager", "varlen", "flash_attention_2", "flash_attention_3"] = "auto"


@dataclass
class TokenizerConfig:
    # "builtin" (byte-level BPE trained on the embedded corpus), a local folder/tokenizer.json, or a hub repo id.
    name: str = "builtin"
    # Only used for the built-in tokenizer.
    vocab_size: int = 8192


@dataclass
class SourceConfig:
    name: str = ""
    # A file, folder or glob; local, s3://, hf://; or builtin:prose|builtin:code|builtin:arithmetic.
    path: str = ""
    weight: float = 0.0
    format: Literal["auto", "jsonl", "parquet", "text"] = "auto"
    text_field: str = "text"


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    # Seed of the mixture order and of the per-epoch document orders of sources that wrap.
    seed: int = 1234
    # Prepared token shards live under <cache_dir>/prepared/<hash of inputs>/ (local path or s3://).
    cache_dir: str = "~/.cache/raysmol"
    # Share of documents (by content hash) held out for validation loss.
    val_fraction: float = 0.01
    # Attention never crosses a document boundary and positions restart per document (SmolLM3).
    intra_doc_masking: bool = True


@dataclass
class SFTConfig:
    # Chat conversations (jsonl or parquet rows with a list of {role, content} messages under `messages_key`,
    # local or s3://). Set, the run is supervised fine-tuning: data.sources are not read, only assistant tokens
    # carry loss, and conversations are packed whole (raysmol/post/chat.py).
    data: str | None = None
    messages_key: str = "messages"
    # The base model: a Hugging Face folder or a raysmol run directory (its hf/); its tokenizer is used.
    init_from: str | None = None
    # Share of conversations (by content hash) held out for validation loss.
    val_fraction: float = 0.05


@dataclass
class DPOConfig:
    # Preference pairs (jsonl or parquet rows {prompt, chosen, rejected}; prompt: text or a list of messages,
    # chosen/rejected: the assistant's reply as text), local, s3:// or hf://. Set, the run is DPO: the model
    # learns to prefer `chosen` over `rejected` relative to the frozen reference (the init_from model).
    data: str | None = None
    # The starting model and the frozen reference: a Hugging Face folder or a raysmol run directory (its hf/).
    init_from: str | None = None
    # Strength of the pull towards the reference (the sigmoid loss's beta): small = far from it.
    beta: float = 0.1
    val_fraction: float = 0.05


@dataclass
class GRPOConfig:
    # Prompts with reference answers (jsonl or parquet rows {prompt, answer}; code rows {prompt, test,
    # entry_point}), local, s3:// or hf://, or builtin:arithmetic / builtin:arithmetic-small. Set, the run is GRPO.
    data: str | None = None
    # The starting policy: a Hugging Face folder or a raysmol run directory (its hf/).
    init_from: str | None = None
    # Column names of the prompt and the reference answer (GSM8K: question, answer; "#### N" answers are reduced
    # to N).
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    # exact (the last number equals the answer), math (math-verify), code (tests pass in the sandbox), or
    # "module:function" called as function(completion: str, row: dict) -> float.
    reward: str = "exact"
    # Completions per prompt (the group whose rewards normalise each other).
    group_size: int = 8
    # Prompts per optimizer step; prompts_per_step * group_size * train.seq_len must equal global_batch_tokens.
    prompts_per_step: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 48
    # PPO-style clipping of the probability ratio between the trained policy and the one that sampled.
    clip: float = 0.2
    # Weight of the KL penalty to the init_from model (0 = none, and no reference model is kept).
    kl_beta: float = 0.0
    engine: Literal["transformers", "vllm"] = "transformers"
    num_engines: int = 1
    # GPUs per engine actor when train.use_gpu (CPU engines take cpus_per_engine).
    gpus_per_engine: float = 1.0
    cpus_per_engine: float = 1.0
    # A step's groups are scored by up to `reward_tasks` Ray tasks, each reserving `reward_cpus` CPUs. 0: none, so
    # scoring never waits for a CPU that trainers and engines hold; raise both for heavy code rewards.
    reward_tasks: int = 4
    reward_cpus: float = 0.0
    rollout_timeout_s: float = 300.0
    sync_timeout_s: float = 300.0
    # Prompts held out (the first of a seeded permutation) and scored greedily through the reward at every
    # validation: `eval/accuracy` (exact match with reward: exact).
    eval_prompts: int = 200
    # After every weight sync, check that the engines report the new version and that their greedy completions
    # equal the trained weights' own (slow: a debugging and test aid).
    verify_sync: bool = False


@dataclass
class OptimConfig:
    lr: float = 3e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 30
    # Final learning rate as a fraction of lr (cosine and wsd).
    min_lr_ratio: float = 0.1
    # wsd only: the share of steps spent in the final linear decay.
    decay_fraction: float = 0.2


@dataclass
class TrainConfig:
    steps: int = 300
    global_batch_tokens: int = 2048
    micro_batch_size: int = 8
    seq_len: int = 128
    num_workers: int = 2
    # Elastic training: with min_workers < num_workers Ray Train starts with as many workers as fit (at least
    # min_workers) and restarts at a new size when nodes come or go; the global batch stays the same.
    min_workers: int | None = None
    use_gpu: bool = False
    zero_stage: int = 2
    # auto = bf16 on GPUs, fp32 on CPUs.
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    seed: int = 0
    log_every: int = 1
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    # Validation loss every N steps (0 = only before the first and after the last step).
    eval_every: int = 0
    eval_batches: int = 4
    # A CF/MCF suite (e.g. eval/suites/tiny.yaml) scored in-process with validation loss at every eval (the
    # first eval_suite_samples samples of each task; accuracy as metrics eval/<task>). None: loss only.
    eval_suite: str | None = None
    eval_suite_samples: int = 64
    # Peak FLOP/s per device for MFU; None = looked up from the GPU name (no MFU on CPU).
    peak_flops: float | None = None
    # torch threads per worker on CPU: logical Ray CPUs may exceed physical cores.
    cpu_threads_per_worker: int = 1
    # Worker failures Ray Train recovers from (restart from the newest committed checkpoint) before giving up.
    max_failures: int = 3
    # GPU path switches (raysmol.model.prepare_for_training). liger: Liger kernels for RMSNorm, SwiGLU, RoPE and
    # the fused linear cross-entropy (needs the liger-kernel package and GPUs).
    liger: bool = False
    # Recompute each decoder layer's activations in the backward pass: less memory, ~1/3 more compute.
    activation_checkpointing: bool = False
    # torch.compile the model's forward (first steps pay the compilation).
    compile: bool = False

    def samples_per_step(self) -> int:
        return self.global_batch_tokens // self.seq_len

    def grad_accum(self, world_size: int) -> int:
        """Gradient accumulation that keeps the global batch fixed at this world size."""
        per_pass = self.micro_batch_size * self.seq_len * world_size
        if self.global_batch_tokens % per_pass:
            raise ConfigError(
                f"train.global_batch_tokens={self.global_batch_tokens} is not a multiple of "
                f"micro_batch_size*seq_len*world_size = {self.micro_batch_size}*{self.seq_len}*{world_size} = {per_pass}"
            )
        return self.global_batch_tokens // per_pass


@dataclass
class GuardConfig:
    """Loss-spike guard (see raysmol/train/guard.py)."""

    # off | log (record only) | skip (drop the update) | rollback (reload the last checkpoint, skip data)
    action: Literal["off", "log", "skip", "rollback"] = "log"
    window: int = 50
    # Steps of healthy statistics needed before anything is flagged (non-finite values always are).
    min_steps: int = 20
    loss_zscore: float = 6.0
    grad_norm_factor: float = 10.0
    # rollback: data batches skipped at the spike, lr multiplier and for how many steps, and the bound.
    skip_batches: int = 10
    lr_factor: float = 1.0
    lr_steps: int = 0
    max_rollbacks: int = 3


@dataclass
class FaultsConfig:
    """Fault drills for tests and rehearsals; all off unless set. Each fires once per run (a marker in
    the run directory remembers it), so the restarted run gets past it."""

    crash_at_step: int | None = None  # crash `crash_rank` right after this step's update
    crash_rank: int = 0
    crash_mode: Literal["exception", "exit"] = "exception"  # exit = os._exit, no cleanup (like a segfault)
    crash_after_report_at_step: int | None = None  # hard exit right after reporting this step's checkpoint
    kill_during_save_at_step: int | None = None  # crash_rank dies mid-checkpoint: the others' files land
    spike_at_step: int | None = None  # multiply the loss (and so the gradients) by spike_factor
    spike_factor: float = 50.0
    nan_at_step: int | None = None  # make the loss NaN
    # Every rank sleeps this long after this step (once): a window to kill a worker from outside in a rehearsal.
    pause_at_step: int | None = None
    pause_seconds: float = 30.0
    # GRPO: kill engine actor 0 just before this step's rollout (once); the rollout must go on on its replacement.
    kill_engine_at_step: int | None = None


POST_TRAINING = ("sft", "dpo", "grpo")


@dataclass
class Config:
    run: RunSection = field(default_factory=RunSection)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    # Where the values came from, for error messages; not part of the config itself.
    origin: str = field(default="<defaults>", compare=False, repr=False)

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

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("origin")
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


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
    """Read a YAML file (default: the embedded `jobs/tiny.yaml`), apply `key.sub=value` overrides, validate."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    raw = read_yaml_mapping(path)
    cfg = _build(Config, raw, "", str(path))
    for item in overrides:
        apply_override(cfg, item)
    cfg.origin = str(path)
    validate(cfg)
    return cfg


def from_dict(raw: dict[str, Any], origin: str = "<dict>") -> Config:
    cfg = _build(Config, raw, "", origin)
    cfg.origin = origin
    validate(cfg)
    return cfg


def apply_override(cfg: Config, item: str) -> None:
    """Apply one `a.b.c=value` (list items by index: `data.sources.0.weight=0.5`)."""
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
    if isinstance(obj, list):
        idx = _index(obj, last, full, where)
        obj[idx] = _build(type(obj[idx]), value, full, where)
        return
    hints = typing.get_type_hints(type(obj))
    if last not in hints or last == "origin":
        raise ConfigError(_unknown(full, type(obj), where))
    setattr(obj, last, _convert(hints[last], value, full, where))


def _child(obj: Any, part: str, key: str, where: str) -> Any:
    if isinstance(obj, list):
        return obj[_index(obj, part, key, where)]
    if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)} or part == "origin":
        raise ConfigError(_unknown(key, type(obj), where))
    return getattr(obj, part)


def _index(lst: list, part: str, key: str, where: str) -> int:
    if not part.isdigit() or int(part) >= len(lst):
        raise ConfigError(f"{where}: {key}: list index must be 0..{len(lst) - 1}, got {part!r}")
    return int(part)


def _unknown(key: str, cls: type, where: str) -> str:
    valid = ", ".join(f.name for f in dataclasses.fields(cls) if f.name != "origin")
    return f"{where}: unknown key {key!r}; valid keys here: {valid}"


def _build(cls: type, raw: Any, prefix: str, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {prefix or '<top>'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)} - {"origin"}
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(_unknown(full, cls, where))
        kwargs[key] = _convert(hints[key], value, full, where)
    return cls(**kwargs)


def _convert(tp: Any, value: Any, key: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, key, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {key}: expected a list, got {value!r}")
        return [_convert(args[0], v, f"{key}.{i}", where) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, where)
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
    """Impossible values are errors that say which key and what would be valid."""
    w = cfg.origin
    m, t, o, d = cfg.model, cfg.train, cfg.optim, cfg.data

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{w}: {key}: {msg}")

    for key in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "max_position_embeddings"):
        need(getattr(m, key) > 0, f"model.{key}", f"must be positive, got {getattr(m, key)}")
    need(m.hidden_size % m.num_heads == 0, "model.num_heads",
         f"hidden_size {m.hidden_size} must be divisible by num_heads {m.num_heads}")
    need(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads",
         f"num_heads {m.num_heads} must be divisible by num_kv_heads {m.num_kv_heads} (1 = MQA, num_heads = MHA)")
    need(m.nope_every >= 0, "model.nope_every", f"must be >= 0, got {m.nope_every}")
    need(m.nope_every == 0 or m.arch == "smollm3", "model.nope_every",
         "NoPE layers need model.arch: smollm3")
    need(m.rope_theta > 0, "model.rope_theta", f"must be positive, got {m.rope_theta}")
    need(m.vocab_size is None or m.vocab_size > 0, "model.vocab_size", f"must be positive, got {m.vocab_size}")
    need(cfg.tokenizer.vocab_size >= 256 + 1, "tokenizer.vocab_size",
         f"a byte-level BPE needs at least 257 entries, got {cfg.tokenizer.vocab_size}")

    for key in ("steps", "global_batch_tokens", "micro_batch_size", "seq_len", "num_workers",
                "log_every", "checkpoint_every", "keep_checkpoints", "eval_batches", "cpu_threads_per_worker"):
        need(getattr(t, key) > 0, f"train.{key}", f"must be positive, got {getattr(t, key)}")
    need(t.eval_every >= 0, "train.eval_every", f"must be >= 0, got {t.eval_every}")
    need(t.eval_suite_samples > 0, "train.eval_suite_samples", f"must be positive, got {t.eval_suite_samples}")
    need(t.eval_suite is None or os.path.isfile(t.eval_suite), "train.eval_suite",
         f"no such suite file {t.eval_suite!r} (e.g. eval/suites/tiny.yaml)")
    need(t.zero_stage in (0, 1, 2, 3), "train.zero_stage", f"must be 0, 1, 2 or 3, got {t.zero_stage}")
    need(t.seq_len <= m.max_position_embeddings, "train.seq_len",
         f"{t.seq_len} exceeds what the model can hold (model.max_position_embeddings={m.max_position_embeddings})")
    need(not (t.precision == "bf16" and not t.use_gpu), "train.precision", "bf16 needs train.use_gpu: true; use auto or fp32")
    per_worker = t.micro_batch_size * t.seq_len * t.num_workers
    need(t.global_batch_tokens % per_worker == 0, "train.global_batch_tokens",
         f"{t.global_batch_tokens} is not a multiple of micro_batch_size*seq_len*num_workers = {per_worker}; "
         f"nearest valid: {max(per_worker, round(t.global_batch_tokens / per_worker) * per_worker)}")
    if t.min_workers is not None:
        need(1 <= t.min_workers <= t.num_workers, "train.min_workers",
             f"must be in [1, train.num_workers={t.num_workers}], got {t.min_workers}")
        bad = [w for w in range(t.min_workers, t.num_workers + 1)
               if t.global_batch_tokens % (t.micro_batch_size * t.seq_len * w)]
        need(not bad, "train.min_workers", f"train.global_batch_tokens={t.global_batch_tokens} does not split over "
             f"{bad} workers x micro_batch_size x seq_len; every size in [min_workers, num_workers] must divide it")
    need(t.max_failures >= 0, "train.max_failures", f"must be >= 0, got {t.max_failures}")
    need(not (t.liger and not t.use_gpu), "train.liger", "Liger kernels are Triton GPU kernels: needs train.use_gpu: true")
    need(not (m.attn_implementation.startswith("flash_attention") and not t.use_gpu), "model.attn_implementation",
         f"{m.attn_implementation} needs train.use_gpu: true; on CPUs use auto, sdpa, eager or varlen")
    need(not (m.attn_implementation == "varlen" and t.use_gpu and t.precision == "fp32"), "model.attn_implementation",
         "varlen runs flash kernels, which need bf16 on GPUs: set train.precision: bf16 (or auto) or use sdpa")
    modes = [m for m in POST_TRAINING if getattr(cfg, m).data is not None]
    need(len(modes) <= 1, f"{modes[-1]}.data" if modes else "sft.data",
         f"{' and '.join(m + '.data' for m in modes)} are all set; a run does one kind of post-training")
    for m in modes:
        s = getattr(cfg, m)
        need(s.init_from is not None, f"{m}.init_from", f"{m} starts from a model: set it to a Hugging Face folder "
             "or a run directory")
        vf = getattr(s, "val_fraction", 0)
        need(0 <= vf < 1, f"{m}.val_fraction", f"must be in [0, 1), got {vf}")
    need(cfg.dpo.beta > 0, "dpo.beta", f"must be positive, got {cfg.dpo.beta}")
    r = cfg.grpo
    if r.data is not None:
        need(r.group_size >= 2, "grpo.group_size", f"a group needs >= 2 completions to normalise, got {r.group_size}")
        need(r.prompts_per_step * r.group_size * t.seq_len == t.global_batch_tokens, "grpo.prompts_per_step",
             f"prompts_per_step x group_size x train.seq_len = {r.prompts_per_step} x {r.group_size} x {t.seq_len} "
             f"must equal train.global_batch_tokens={t.global_batch_tokens} (one row per completion)")
        need(r.prompts_per_step % t.num_workers == 0, "grpo.prompts_per_step",
             f"{r.prompts_per_step} prompts do not split over train.num_workers={t.num_workers} (a group stays on one rank)")
        need(t.min_workers is None or t.min_workers == t.num_workers, "train.min_workers",
             "GRPO runs at a fixed world size (groups are split over ranks)")
        need(0 < r.max_new_tokens < t.seq_len, "grpo.max_new_tokens", f"must be in (0, train.seq_len={t.seq_len})")
        need(r.temperature > 0, "grpo.temperature", f"sampling needs a positive temperature, got {r.temperature}")
        need(0 < r.top_p <= 1, "grpo.top_p", f"must be in (0, 1], got {r.top_p}")
        need(r.clip > 0, "grpo.clip", f"must be positive, got {r.clip}")
        need(r.kl_beta >= 0, "grpo.kl_beta", f"must be >= 0, got {r.kl_beta}")
        need(r.num_engines >= 1, "grpo.num_engines", f"must be >= 1, got {r.num_engines}")
        need(r.reward_cpus >= 0, "grpo.reward_cpus", f"must be >= 0, got {r.reward_cpus}")
        need(r.reward_tasks >= 1, "grpo.reward_tasks", f"must be >= 1, got {r.reward_tasks}")
        need(r.rollout_timeout_s > 0 and r.sync_timeout_s > 0, "grpo.rollout_timeout_s/sync_timeout_s", "must be positive")
        need(r.eval_prompts >= 0, "grpo.eval_prompts", f"must be >= 0, got {r.eval_prompts}")
    g = cfg.guard
    for key in ("window", "min_steps", "max_rollbacks"):
        need(getattr(g, key) > 0, f"guard.{key}", f"must be positive, got {getattr(g, key)}")
    need(g.min_steps <= g.window, "guard.min_steps", f"must be <= guard.window={g.window}, got {g.min_steps}")
    for key in ("loss_zscore", "grad_norm_factor", "lr_factor"):
        need(getattr(g, key) > 0, f"guard.{key}", f"must be positive, got {getattr(g, key)}")
    need(g.skip_batches >= 0 and g.lr_steps >= 0, "guard.skip_batches/lr_steps", "must be >= 0")
    f = cfg.faults
    need(0 <= f.crash_rank < t.num_workers, "faults.crash_rank", f"must be a rank in [0, {t.num_workers}), got {f.crash_rank}")
    for key in ("crash_at_step", "crash_after_report_at_step", "kill_during_save_at_step", "spike_at_step", "nan_at_step",
                "pause_at_step", "kill_engine_at_step"):
        v = getattr(f, key)
        need(v is None or 1 <= v <= t.steps, f"faults.{key}", f"must be a step in [1, train.steps={t.steps}], got {v}")
    for key in ("crash_after_report_at_step", "kill_during_save_at_step"):
        v = getattr(f, key)
        need(v is None or v % t.checkpoint_every == 0 or v == t.steps, f"faults.{key}",
             f"step {v} saves no checkpoint (train.checkpoint_every={t.checkpoint_every})")
    need(t.peak_flops is None or t.peak_flops > 0, "train.peak_flops", f"must be positive, got {t.peak_flops}")

    need(o.lr > 0, "optim.lr", f"must be positive, got {o.lr}")
    need(0 <= o.warmup_steps < t.steps, "optim.warmup_steps", f"must be in [0, train.steps={t.steps}), got {o.warmup_steps}")
    need(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
    need(0 < o.decay_fraction <= 1, "optim.decay_fraction", f"must be in (0, 1], got {o.decay_fraction}")
    need(o.grad_clip >= 0, "optim.grad_clip", f"must be >= 0 (0 = off), got {o.grad_clip}")
    need(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1/beta2", "must be in [0, 1)")

    need(len(d.sources) > 0 or bool(modes), "data.sources",
         "at least one source is needed (or sft.data, dpo.data or grpo.data, for post-training)")
    names = set()
    for i, s in enumerate(d.sources):
        k = f"data.sources.{i}"
        need(bool(s.name), f"{k}.name", "every source needs a name")
        need(s.name not in names, f"{k}.name", f"duplicate source name {s.name!r}")
        names.add(s.name)
        need(bool(s.path), f"{k}.path", f"source {s.name!r} needs a path")
        need(s.weight >= 0, f"{k}.weight", f"source {s.name!r} has a negative weight {s.weight}; weights must be >= 0")
    need(not d.sources or sum(s.weight for s in d.sources) > 0, "data.sources.*.weight", "weights sum to zero; at least one must be > 0")
    need(0 <= d.val_fraction < 0.5, "data.val_fraction", f"must be in [0, 0.5), got {d.val_fraction}")
