"""Config: strict loading, overrides, validation errors that name key and file, derived values."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from raysmol.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_default_is_the_embedded_tiny_job():
    cfg = load_config()
    assert cfg.run.name == "tiny"
    assert [s.weight for s in cfg.data.sources] == [0.7, 0.2, 0.1]
    assert cfg.train.num_workers == 2 and cfg.train.zero_stage == 2


def test_overrides_apply_with_types_and_list_indices():
    cfg = load_config(None, ["train.steps=10", "optim.warmup_steps=5", "optim.lr=1e-3", "data.sources.1.weight=0.5", "model.tie_embeddings=false"])
    assert cfg.train.steps == 10 and cfg.optim.lr == 1e-3 and cfg.data.sources[1].weight == 0.5
    assert cfg.model.tie_embeddings is False


@pytest.mark.parametrize("text,needle", [
    ("model:\n  hiden_size: 3\n", "unknown key 'model.hiden_size'"),
    ("trian:\n  steps: 3\n", "unknown key 'trian'"),
    ("train:\n  steps: ten\n", "train.steps: expected an integer"),
    ("model:\n  tie_embeddings: 1\n", "model.tie_embeddings: expected true or false"),
    ("train:\n  zero_stage: 4\n", "train.zero_stage: must be 0, 1, 2 or 3"),
    ("model:\n  arch: gpt\n", "model.arch: 'gpt' is not one of"),
    ("train:\n  seq_len: 4096\n", "train.seq_len: 4096 exceeds what the model can hold"),
    ("model:\n  num_kv_heads: 3\n", "model.num_kv_heads"),
    ("train:\n  global_batch_tokens: 3000\n", "train.global_batch_tokens: 3000 is not a multiple"),
    ("data:\n  sources:\n    - {name: a, path: x, weight: -0.5}\n", "negative weight -0.5"),
    ("data:\n  sources:\n    - {name: a, path: x, weight: 0}\n    - {name: b, path: y, weight: 0}\n", "weights sum to zero"),
    ("data:\n  sources:\n    - {name: a, path: x, weight: 1, colour: red}\n", "unknown key 'data.sources.0.colour'"),
    ("model:\n  nope_every: 4\n", "NoPE layers need model.arch: smollm3"),
    ("train:\n  eval_suite: nowhere.yaml\n", "train.eval_suite: no such suite file 'nowhere.yaml'"),
])
def test_errors_name_the_key_and_the_file(tmp_path, text, needle):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert needle in str(e.value)
    assert str(path) in str(e.value)


def test_override_errors_name_the_command_line():
    with pytest.raises(ConfigError, match="command line: unknown key 'train.stepz'"):
        load_config(None, ["train.stepz=3"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["train.steps"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1,\n"))


def test_grad_accum_is_derived_from_the_global_batch():
    cfg = load_config(ROOT / "jobs" / "smollm3_1b_baseline.yaml")
    t = cfg.train
    assert t.grad_accum(8) * t.micro_batch_size * t.seq_len * 8 == t.global_batch_tokens
    assert t.grad_accum(4) == 2 * t.grad_accum(8)  # fewer workers, same global batch
    with pytest.raises(ConfigError, match="not a multiple"):
        t.grad_accum(7)


def test_1b_baseline_matches_the_playbook():
    cfg = load_config(ROOT / "jobs" / "smollm3_1b_baseline.yaml")
    m = cfg.model
    assert (m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.intermediate_size) == (2048, 16, 32, 8, 8192)
    assert (m.max_position_embeddings, m.rope_theta, m.tie_embeddings) == (4096, 50000.0, True)
    assert cfg.tokenizer.name == "HuggingFaceTB/SmolLM3-3B"
    assert cfg.optim.warmup_steps == 2000 and cfg.optim.lr == 5e-4 and cfg.optim.grad_clip == 1.0
    assert abs(cfg.train.global_batch_tokens - 1.5e6) / 1.5e6 < 0.06 and cfg.train.num_workers == 8
    assert {s.name: s.weight for s in cfg.data.sources} == {"fineweb-edu": 0.7, "stack-edu-python": 0.2, "finemath": 0.1}
    assert all(s.path.startswith("hf://") for s in cfg.data.sources)


def test_3b_job_is_smollm3s_recipe():
    from raysmol.model import param_count
    from raysmol.train.schedule import lr_multiplier

    cfg = load_config(ROOT / "jobs" / "smollm3_3b.yaml")
    assert param_count(cfg) == 3_075_098_624 and cfg.model.nope_every == 4 and cfg.model.arch == "smollm3"
    t = cfg.train
    assert (t.seq_len, t.global_batch_tokens) == (4096, 2_359_296) and t.splits_over(t.num_workers)
    plan = cfg.data.stage_plan(t)
    tokens = [st.end * t.global_batch_tokens for st in plan]
    assert [round(x / 1e12, 2) for x in tokens] == [8.0, 10.0, 11.1]
    names = [s.name for s in cfg.data.sources]
    category = {"fineweb-edu": "web", "stack-edu": "code", "finemath": "math", "infiwebmath": "math", "megamath": "math"}
    shares = [{c: round(sum(w for n, w in zip(names, st.weights) if category[n] == c), 4) for c in ("web", "code", "math")}
              for st in plan]
    assert shares == [{"web": 0.85, "code": 0.12, "math": 0.03}, {"web": 0.75, "code": 0.15, "math": 0.10},
                      {"web": 0.63, "code": 0.24, "math": 0.13}]
    lr = lr_multiplier(cfg.optim, t.steps)  # WSD: stable through stage 2, the decay is stage 3
    assert lr(plan[2].start - 1) == 1.0 and lr(plan[2].start) < 1.0 and lr(t.steps - 1) < 1e-5


@pytest.mark.slow
def test_config_command_prints_params_and_flops_without_running():
    out = subprocess.run([sys.executable, "-m", "raysmol", "config", str(ROOT / "jobs" / "smollm3_1b_baseline.yaml"),
                          "--json"], capture_output=True, text=True, check=True, cwd=ROOT)
    info = json.loads(out.stdout)
    assert info["parameters"] == 1_235_814_400
    assert info["flops_per_token"] > 6 * 1.2e9
    assert info["derived"]["grad_accum"] >= 1


@pytest.mark.slow
def test_config_command_reports_errors_with_exit_2():
    out = subprocess.run([sys.executable, "-m", "raysmol", "config", "model.hidden_size=-1"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "model.hidden_size: must be positive" in out.stderr


def test_elastic_sizes_must_all_split_the_global_batch():
    cfg = load_config(None, ["train.min_workers=1", "train.num_workers=2"])
    assert cfg.train.min_workers == 1
    with pytest.raises(ConfigError, match=r"train.min_workers: .*\[3\] workers"):
        load_config(None, ["train.min_workers=2", "train.num_workers=4", "train.micro_batch_size=4"])
    with pytest.raises(ConfigError, match="train.min_workers: must be in"):
        load_config(None, ["train.min_workers=3"])


def test_the_default_job_ships_inside_the_package():
    import raysmol
    from raysmol.config import DEFAULT_CONFIG

    assert DEFAULT_CONFIG.parent.parent == Path(raysmol.__file__).resolve().parent and DEFAULT_CONFIG.is_file()
    assert load_config().origin == str(DEFAULT_CONFIG)
    # jobs/tiny.yaml (what the README, ablation baselines and `raysmol submit` name) is the same file.
    assert DEFAULT_CONFIG.resolve() == (ROOT / "jobs" / "tiny.yaml").resolve()


@pytest.mark.parametrize("micro, seq, tokens", [(8, 128, 2048), (4, 128, 3 * 1024), (3, 64, 4608), (2, 32, 1000)])
def test_the_global_batch_rule_is_the_same_for_grad_accum_and_validation(micro, seq, tokens):
    from raysmol.config import TrainConfig

    t = TrainConfig(micro_batch_size=micro, seq_len=seq, global_batch_tokens=tokens)
    for world in range(1, 7):
        sets = [f"train.micro_batch_size={micro}", f"train.seq_len={seq}", f"train.global_batch_tokens={tokens}",
                f"train.num_workers={world}", "train.eval_every=0"]
        if t.splits_over(world):
            assert t.grad_accum(world) * t.tokens_per_pass(world) == tokens
            assert load_config(None, sets).train.grad_accum(world) == t.grad_accum(world)
        else:
            with pytest.raises(ConfigError, match="not a multiple"):
                t.grad_accum(world)
            with pytest.raises(ConfigError, match="train.global_batch_tokens: .* is not a multiple"):
                load_config(None, sets)


def test_post_training_checks_the_model_shape_once_it_is_known():
    # sft_1b's 4096-token rows exceed the default model's 2048 positions: its shape comes from init_from later.
    cfg = load_config(ROOT / "jobs" / "sft_1b.yaml")
    assert cfg.train.seq_len == 4096 and cfg.model_from is None
    with pytest.raises(ConfigError, match="train.seq_len: 4096 exceeds"):  # a key set by the user is checked now
        load_config(ROOT / "jobs" / "sft_1b.yaml", ["model.max_position_embeddings=2048"])


def test_sections_check_their_own_fields_and_name_the_full_key():
    from raysmol.config import ModelConfig

    seen = []
    ModelConfig(num_heads=3).check(lambda ok, key, msg: seen.append(key) if not ok else None)
    assert seen == ["num_heads", "num_kv_heads"]  # relative to the section; validate() adds "model." and the origin
    with pytest.raises(ConfigError, match=r"tiny\.yaml: guard\.min_steps: must be <= guard\.window=5, got 20$"):
        load_config(None, ["guard.window=5"])
