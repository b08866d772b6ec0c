"""The ablation file: a baseline, variants that each change one thing, seeds, a metric, a budget.

```yaml
name: tiny_lr                    # sweep directory: <output_dir>/<name>/ (default: the file's stem)
output_dir: runs/ablations
baseline: ../tiny.yaml           # a config file (relative to this file) or an inline config mapping
overrides: {train.num_workers: 1}  # dotted keys applied to the baseline itself (shared by every trial)
variants:
  - name: lr_x30
    reason: a learning rate 30x too high should diverge
    changes: {optim.lr: 0.09}
  - {name: gqa_and_untied, reason: ..., bundle: true, changes: {model.num_kv_heads: 4, model.tie_embeddings: false}}
seeds: [0, 1, 2]                 # one trial per seed and variant
seeds_vary: both                 # what a seed changes: init (train.seed), data (the data order: data.seed) or both
metric: {name: val_loss, mode: min}
budget: {steps: 150}             # or {tokens: 307200}: steps = tokens / global_batch_tokens, per variant
scheduler: {grace_period: 50, reduction_factor: 2, margin: 0.2}
resources: {workers: 1, max_concurrent_trials: 0}   # 0 = as many as the cluster's CPUs/GPUs hold
noise: {factor: 2.0, floor: 0.01}
```

The playbook's rule: an ablation changes one thing. A variant whose config differs from the baseline in more
than one key is refused unless it says `bundle: true`; the error names the keys. Every trial's config goes
through raysmol's own validation, so a bad value fails here, before any trial starts.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from raysmol.config import (Config, ConfigError, apply_override, build_section, from_dict, load_config,
                            read_yaml_mapping, validate)

BASELINE = "baseline"


@dataclass
class Variant:
    name: str
    reason: str = ""
    changes: dict[str, Any] = field(default_factory=dict)
    bundle: bool = False


@dataclass
class Metric:
    name: str = "val_loss"
    mode: Literal["min", "max"] = "min"  # min: lower is better (a loss); max: higher is better (an accuracy)


@dataclass
class Budget:
    steps: int | None = None
    tokens: int | None = None


@dataclass
class Scheduler:
    # ASHA (Li et al. 2020): a trial reaching rung grace_period * reduction_factor**k is stopped when its metric
    # is in the worst 1 - 1/reduction_factor of the trials recorded at that rung ...
    grace_period: int = 1
    reduction_factor: float = 2.0
    # ... and, unlike plain ASHA, worse than that cutoff by more than `margin` (metric units): plain ASHA stops
    # the worse of any two trials, however close, so it would stop variants that only differ by seed noise.
    margin: float = 0.0
    enabled: bool = True


@dataclass
class Resources:
    workers: int | None = None  # train.num_workers of every trial (None: the baseline's)
    max_concurrent_trials: int = 0  # 0: as many as the cluster's CPUs (GPUs) hold at the trial's size


@dataclass
class Noise:
    factor: float = 2.0  # within noise: |mean - baseline mean| <= max(factor x baseline seed std, floor)
    floor: float = 0.0


@dataclass
class Trial:
    variant: str
    seed: int
    config: Config

    @property
    def name(self) -> str:
        return f"{self.variant}-s{self.seed}"


@dataclass
class AblationSpec:
    path: str
    name: str
    output_dir: str
    baseline: Config
    variants: list[Variant]
    seeds: list[int]
    metric: Metric
    budget: Budget
    scheduler: Scheduler
    resources: Resources
    noise: Noise
    seeds_vary: str = "both"
    # Per variant (baseline first), the dotted keys its config differs in from the baseline.
    diffs: dict[str, list[str]] = field(default_factory=dict)

    def sweep_dir(self) -> str:
        from raysmol import storage

        out = self.output_dir if storage.is_remote(self.output_dir) else str(Path(self.output_dir).expanduser().resolve())
        return storage.join(out, self.name)

    def trials(self) -> list[Trial]:
        """Every (variant, seed) trial, the baseline's seeds first: they start first, so when a variant reaches
        an ASHA rung the baseline's values are usually already recorded there to compare against."""
        return [Trial(v.name, s, trial_config(self, v, s)) for v in self.all_variants() for s in self.seeds]

    def all_variants(self) -> list[Variant]:
        return [Variant(BASELINE, "the baseline"), *self.variants]

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("name", "output_dir", "seeds", "seeds_vary")}
        d.update({k: dataclasses.asdict(getattr(self, k)) for k in ("metric", "budget", "scheduler", "resources", "noise")})
        d["variants"] = [dataclasses.asdict(v) for v in self.variants]
        d["baseline"] = self.baseline.to_dict()
        d["diffs"] = self.diffs
        return d


_TOP = {"name", "output_dir", "baseline", "overrides", "variants", "seeds", "seeds_vary", "metric", "budget",
        "scheduler", "resources", "noise"}
# What a trial's seed changes. Initialisation alone leaves every seed on the same batches (their loss curves wiggle
# in lockstep), so the noise band would hold initialisation noise only; varying the data order as well measures
# the noise a variant's delta must beat when the data order is an accident too.
SEEDS_VARY = {"init": ("train.seed",), "data": ("data.seed",), "both": ("train.seed", "data.seed")}


def load_ablation(path: str | Path) -> AblationSpec:
    """Read and check an ablation file; every trial config is built and validated."""
    path = Path(path)
    where = str(path)
    raw = read_yaml_mapping(path, "ablation")
    for key in raw:
        if key not in _TOP:
            raise ConfigError(f"{where}: unknown key {key!r}; valid keys: {', '.join(sorted(_TOP))}")
    for key in ("baseline", "variants"):
        if key not in raw:
            raise ConfigError(f"{where}: {key}: required")
    baseline = _baseline(raw["baseline"], path)
    for key, value in _mapping(raw.get("overrides") or {}, "overrides", where).items():
        _override(baseline, key, value, f"{where}: overrides")
    spec = AblationSpec(
        path=where, name=str(raw.get("name") or path.stem), output_dir=str(raw.get("output_dir") or "runs/ablations"),
        baseline=baseline, variants=[_variant(v, i, where) for i, v in enumerate(_list(raw["variants"], "variants", where))],
        seeds=_seeds(raw.get("seeds", [0]), where),
        seeds_vary=_seeds_vary(raw.get("seeds_vary", "both"), where),
        metric=_section(Metric, raw.get("metric"), "metric", where),
        budget=_section(Budget, raw.get("budget"), "budget", where),
        scheduler=_section(Scheduler, raw.get("scheduler"), "scheduler", where),
        resources=_section(Resources, raw.get("resources"), "resources", where),
        noise=_section(Noise, raw.get("noise"), "noise", where),
    )
    _check(spec, where)
    return spec


def trial_config(spec: AblationSpec, variant: Variant, seed: int) -> Config:
    """The baseline with the variant's changes, the budget, the trial's resources, seed, name and category."""
    cfg = copy.deepcopy(spec.baseline)
    where = f"{spec.path}: variants: {variant.name}: changes"
    for key, value in variant.changes.items():
        _override(cfg, key, value, where)
    t = cfg.train
    if spec.resources.workers is not None:
        t.num_workers = spec.resources.workers
        t.min_workers = None  # a trial's size is fixed: concurrency is planned from it
    if spec.budget.steps is not None:
        t.steps = spec.budget.steps
    elif spec.budget.tokens is not None:
        t.steps = math.ceil(spec.budget.tokens / t.global_batch_tokens)
    if "train.seed" in SEEDS_VARY[spec.seeds_vary]:
        t.seed = seed
    if "data.seed" in SEEDS_VARY[spec.seeds_vary]:
        cfg.data.seed = spec.baseline.data.seed + seed
    from raysmol import storage

    cfg.run.output_dir = storage.join(spec.sweep_dir(), "trials")
    cfg.run.name = f"{variant.name}-s{seed}"
    cfg.run.category = "ablation"
    cfg.origin = f"{spec.path} (variant {variant.name!r}, seed {seed})"
    validate(cfg)
    return cfg


def differing_keys(a: Config, b: Config) -> list[str]:
    """Dotted keys whose values differ between two configs (list items by index)."""
    fa, fb = _flatten(a.to_dict()), _flatten(b.to_dict())
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k, _MISSING) != fb.get(k, _MISSING))


# ---------------------------------------------------------------- helpers

_MISSING = object()
# Set per trial by the sweep itself: a variant may not change them.
_OWNED = {"train.seed": "seeds", "train.steps": "budget (a token budget gives every variant the same tokens)",
          "run.name": "the variant name", "run.output_dir": "output_dir", "run.category": "the sweep (always ablation)"}


def _check(spec: AblationSpec, where: str) -> None:
    if spec.metric.mode not in ("min", "max"):
        raise ConfigError(f"{where}: metric.mode: {spec.metric.mode!r} is not 'min' or 'max'")
    b = spec.budget
    if (b.steps is None) == (b.tokens is None):
        raise ConfigError(f"{where}: budget: give exactly one of steps or tokens, got {dataclasses.asdict(b)}")
    if (b.steps or b.tokens or 0) <= 0:
        raise ConfigError(f"{where}: budget: must be positive, got {dataclasses.asdict(b)}")
    s = spec.scheduler
    if s.grace_period < 1 or s.reduction_factor <= 1 or s.margin < 0:
        raise ConfigError(f"{where}: scheduler: need grace_period >= 1, reduction_factor > 1 and margin >= 0, "
                          f"got {dataclasses.asdict(s)}")
    r = spec.resources
    if (r.workers is not None and r.workers < 1) or r.max_concurrent_trials < 0:
        raise ConfigError(f"{where}: resources: need workers >= 1 and max_concurrent_trials >= 0 (0 = auto), "
                          f"got {dataclasses.asdict(r)}")
    if spec.noise.factor < 0 or spec.noise.floor < 0:
        raise ConfigError(f"{where}: noise: factor and floor must be >= 0, got {dataclasses.asdict(spec.noise)}")
    names = [v.name for v in spec.variants]
    dup = sorted({n for n in names if names.count(n) > 1} | ({BASELINE} & set(names)))
    if dup:
        raise ConfigError(f"{where}: variants: duplicate or reserved names {dup} ('baseline' is the baseline itself)")
    base = trial_config(spec, Variant(BASELINE), spec.seeds[0])
    spec.diffs[BASELINE] = []
    for i, v in enumerate(spec.variants):
        for key in v.changes:
            if key in _OWNED:
                raise ConfigError(f"{where}: variants.{i} ({v.name}): changes: {key} is set by {_OWNED[key]}")
        keys = [k for k in differing_keys(base, trial_config(spec, v, spec.seeds[0])) if k not in _OWNED]
        if not keys:
            raise ConfigError(f"{where}: variants.{i} ({v.name}): changes {v.changes} leave the baseline unchanged")
        if len(keys) > 1 and not v.bundle:
            raise ConfigError(f"{where}: variants.{i} ({v.name}): changes {len(keys)} keys ({', '.join(keys)}); "
                              "an ablation changes one thing at a time. Split it into one variant per key, or set "
                              "`bundle: true` if these changes only make sense together")
        spec.diffs[v.name] = keys


def _baseline(value: Any, path: Path) -> Config:
    if isinstance(value, dict):
        return from_dict(value, origin=f"{path}: baseline")
    if not isinstance(value, str):
        raise ConfigError(f"{path}: baseline: expected a config file path or a config mapping, got {value!r}")
    here = path.parent / value
    return load_config(here if here.is_file() else Path(value))


def _override(cfg: Config, key: str, value: Any, where: str) -> None:
    try:
        apply_override(cfg, f"{key}={json.dumps(value)}")
    except ConfigError as e:
        raise ConfigError(f"{where}: {str(e).removeprefix('command line: ')}") from None


def _variant(raw: Any, i: int, where: str) -> Variant:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: variants.{i}: expected a mapping, got {raw!r}")
    valid = ("name", "reason", "changes", "bundle")
    for k in raw:
        if k not in valid:
            raise ConfigError(f"{where}: unknown key 'variants.{i}.{k}'; valid keys here: {', '.join(valid)}")
    changes = _mapping(raw.get("changes", {}), f"variants.{i}.changes", where)
    v = build_section(_VariantFields, {k: x for k, x in raw.items() if k != "changes"}, f"variants.{i}", where)
    v = Variant(v.name, v.reason, changes, v.bundle)
    if not v.name:
        raise ConfigError(f"{where}: variants.{i}: needs a name")
    if not v.reason:
        raise ConfigError(f"{where}: variants.{i} ({v.name}): needs a reason (why this change is worth a run)")
    return v


@dataclass
class _VariantFields:
    """A variant's typed fields (`changes` maps arbitrary dotted keys; it is checked by applying it)."""

    name: str = ""
    reason: str = ""
    bundle: bool = False


def _section(cls: type, raw: Any, key: str, where: str):
    """A typed section through raysmol's config builder: unknown keys and wrong types name file and key."""
    return cls() if raw is None else build_section(cls, raw, key, where)


def _mapping(value: Any, key: str, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key}: expected a mapping of dotted keys to values, got {value!r}")
    return value


def _list(value: Any, key: str, where: str) -> list:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: {key}: expected a non-empty list, got {value!r}")
    return value


def _seeds_vary(value: Any, where: str) -> str:
    if value not in SEEDS_VARY:
        raise ConfigError(f"{where}: seeds_vary: {value!r} is not one of {', '.join(SEEDS_VARY)}")
    return value


def _seeds(value: Any, where: str) -> list[int]:
    if (not isinstance(value, list) or not value or any(isinstance(s, bool) or not isinstance(s, int) for s in value)
            or len(set(value)) != len(value)):
        raise ConfigError(f"{where}: seeds: expected a non-empty list of distinct integers, got {value!r}")
    return value


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        items = d.items()
    elif isinstance(d, list):
        items = ((str(i), v) for i, v in enumerate(d))
    else:
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in items:
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out
