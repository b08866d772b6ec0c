"""Checkpoints to come back to: train.keep_every (kept for good, by raysmol's pruning and by Ray Train's),
train.export_every (Hugging Face folders during the run), `raysmol export CHECKPOINT` and `raysmol eval --exports`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from support import small_config

from raysmol import storage
from raysmol.config import ConfigError
from raysmol.train import checkpoint as ckpt
from raysmol.train import export

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "eval" / "suites" / "tiny.yaml"


def make_checkpoint(root: Path, step: int, extra: dict | None = None) -> Path:
    folder = root / f"checkpoint_{step:08d}"
    (folder / "ds").mkdir(parents=True)
    (folder / "ds" / "w.pt").write_bytes(b"weights")
    (folder / ckpt.STATE_FILE).write_text(json.dumps({"step": step, "files": ckpt.file_checksums(folder),
                                                      **(extra or {})}))
    return folder


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert set(ta) == set(tb)
    unequal = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not unequal, unequal


def assert_same_files(a: Path, b: Path, names: list[str]) -> None:
    assert names
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


# ---------------------------------------------------------------- unit tests


def test_keep_and_export_every_are_checked(small_data, tmp_path):
    with pytest.raises(ConfigError, match=r"train\.keep_every: 5 is not a multiple of train\.checkpoint_every=3"):
        small_config(tmp_path, small_data, {"train.keep_every": 5})
    with pytest.raises(ConfigError, match=r"train\.export_every: must be >= 0"):
        small_config(tmp_path, small_data, {"train.export_every": -1})
    with pytest.raises(ConfigError, match=r"train\.sample_prompts: completions are written at every export"):
        small_config(tmp_path, small_data, {"train.sample_prompts": "prompts.txt"})
    cfg = small_config(tmp_path, small_data, {"train.keep_every": 6, "train.export_every": 5})
    assert (cfg.train.keep_every, cfg.train.export_every) == (6, 5)


def _ray_survivors(steps: int, every: int, train) -> list[int]:
    """What Ray Train's retention keeps of checkpoints saved every `every` steps under ckpt.ray_retention(train):
    it orders registered checkpoints by score (ties: by report order), deletes all but the last num_to_keep, and
    never the latest."""
    conf = ckpt.ray_retention(train)  # CheckpointConfig's arguments (the end-to-end run passes them to Ray)
    held: list[int] = []
    for s in [s for s in range(1, steps + 1) if s % every == 0 or s == steps]:
        held.append(s)
        if conf.get("checkpoint_score_attribute"):
            held.sort(key=lambda x: ckpt.retention_score(x, train.keep_every))  # stable: report order on ties
        held = [x for i, x in enumerate(held) if i >= len(held) - conf["num_to_keep"] or x == s]
        # Every kept step and the newest keep_checkpoints survive at every point of the run.
        assert {x for x in held} >= {x for x in range(1, s + 1) if x % every == 0 and ckpt.kept(x, train.keep_every)}
        assert set(held) >= set(sorted(x for x in range(1, s + 1) if x % every == 0 or x == s)[-train.keep_checkpoints:])
    return sorted(held)


@pytest.mark.parametrize("steps,every,keep,keep_every,expect", [
    (20, 2, 2, 0, [18, 20]),
    (20, 2, 1, 4, [4, 8, 12, 16, 18, 20]),  # 20 is kept and the newest: 18 holds the spare slot
    (21, 2, 2, 6, [6, 12, 18, 20, 21]),
    (10, 5, 1, 5, [5, 10]),
])
def test_ray_retention_keeps_every_kept_checkpoint_and_the_newest(steps, every, keep, keep_every, expect, small_data,
                                                                  tmp_path):
    t = small_config(tmp_path, small_data, {"train.steps": steps, "train.checkpoint_every": every,
                                            "train.keep_checkpoints": keep, "train.keep_every": keep_every}).train
    assert _ray_survivors(steps, every, t) == expect
    assert ckpt.ray_retention(t)["num_to_keep"] == keep + (steps // keep_every if keep_every else 0)


def test_prune_never_removes_a_kept_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    for s in (2, 4, 6, 8, 10):
        make_checkpoint(root, s)
    (root / "checkpoint_00000003").mkdir()  # torn: no state.json, whatever its step
    (root / "checkpoint_00000012").mkdir()  # torn, at a kept step: never complete, so not kept
    make_checkpoint(root, 14)
    removed = ckpt.prune(str(root), keep=1, keep_every=4)
    assert sorted(Path(r).name for r in removed) == ["checkpoint_00000002", "checkpoint_00000003",
                                                     "checkpoint_00000006", "checkpoint_00000010",
                                                     "checkpoint_00000012"]
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint_00000004", "checkpoint_00000008",
                                                      "checkpoint_00000014"]


def test_export_refuses_what_it_cannot_export(tmp_path):
    with pytest.raises(export.ExportError, match="does not exist"):
        export.export_checkpoint(str(tmp_path / "nowhere"))
    run = tmp_path / "runs" / "t"
    make_checkpoint(run / "checkpoints", 4)
    with pytest.raises(export.ExportError, match=r"not a raysmol checkpoint .*run directory.*checkpoint_00000004"):
        export.export_checkpoint(str(run))
    (run / "checkpoints" / "checkpoint_00000004" / "ds" / "w.pt").write_bytes(b"bit rot")
    with pytest.raises(export.ExportError, match=r"w\.pt does not match its checksum.*torn or damaged"):
        export.export_checkpoint(str(run / "checkpoints" / "checkpoint_00000004"))
    (run / "checkpoints" / "checkpoint_00000006").mkdir()
    (run / "checkpoints" / "checkpoint_00000006" / "ds").mkdir()
    with pytest.raises(export.ExportError, match="no state.json"):
        export.export_checkpoint(str(run / "checkpoints" / "checkpoint_00000006"))
    loose = make_checkpoint(tmp_path / "elsewhere", 2)
    with pytest.raises(export.ExportError, match="not inside a run directory.*--out"):
        export.export_checkpoint(str(loose))
    with pytest.raises(export.ExportError, match="config.yaml"):
        export.export_checkpoint(str(loose), out=str(tmp_path / "out"))


def test_cli_export_error_exits_2(tmp_path, capsys):
    from raysmol.cli import main

    with pytest.raises(SystemExit) as e:
        main(["export", str(tmp_path)])
    assert e.value.code == 2 and "is not a raysmol checkpoint" in capsys.readouterr().err


def test_run_exports_lists_exports_and_the_final_export_by_step(tmp_path):
    from raysmol.eval.cli import run_exports
    from raysmol.model.folder import ModelFolderError

    run = tmp_path / "t"
    with pytest.raises(ModelFolderError, match="holds no exports.*train.export_every"):
        run_exports(str(run))
    for d in ("exports/step_00000004", "exports/step_00000008", "exports/notes", "hf"):
        (run / d).mkdir(parents=True)
    (run / "hf" / "config.json").write_text("{}")
    (run / "summary.json").write_text(json.dumps({"steps": 10}))
    assert run_exports(str(run)) == [(4, str(run / "exports/step_00000004")), (8, str(run / "exports/step_00000008")),
                                     (10, str(run / "hf"))]
    (run / "summary.json").write_text(json.dumps({"steps": 8}))  # the last step was exported: hf/ is the same model
    assert [s for s, _ in run_exports(str(run))] == [4, 8]


_STAGES_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    import torch, deepspeed, transformers
    import deepspeed.comm.torch
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    from raysmol.train import checkpoint as ckpt
    deepspeed.init_distributed(dist_backend="gloo")
    out = Path(sys.argv[1])
    for stage in (0, 1, 2):
        torch.manual_seed(stage)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, tie_word_embeddings=True))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config={
            "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2,
            "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1})
        ids = torch.randint(0, 64, (2, 8))
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
        ckpt.save(engine, out / f"stage{stage}", {"step": 1, "zero_stage": stage})
        torch.save(ckpt.full_state_dict(engine), out / f"stage{stage}.pt")
""")


@pytest.mark.slow
def test_consolidated_state_dict_of_zero_stages_0_to_2(tmp_path):
    """What full_state_dict gave in the run, from the files alone, for the stages the end-to-end run (ZeRO-3) does
    not cover; stage 0 takes another path (its model-states file holds the whole module)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-c", _STAGES_SCRIPT, str(tmp_path), str(port)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in (0, 1, 2):
        expected = torch.load(tmp_path / f"stage{stage}.pt")
        got = ckpt.consolidated_state_dict(tmp_path / f"stage{stage}", stage)
        assert set(got) <= set(expected) and set(expected) - set(got) <= {"lm_head.weight"}  # tied
        assert all(torch.equal(got[k], expected[k]) for k in got), stage
        assert not torch.equal(got["model.embed_tokens.weight"],
                               torch.load(tmp_path / f"stage{(stage + 1) % 3}.pt")["model.embed_tokens.weight"])


# ---------------------------------------------------------------- one end-to-end run


@pytest.fixture(scope="module")
def z3_run(ray_local, small_data, tmp_path_factory):
    """ZeRO-3, 2 workers, 6 steps: checkpoints at 2, 4, 6 (keep 1, keep every 4), an export at 4, hf/ at 6."""
    from raysmol.recipes import pretrain

    tmp = tmp_path_factory.mktemp("export")
    (tmp / "prompts.txt").write_text("def add(a, b):\nThe answer is\n")
    cfg = small_config(tmp, small_data, {"train.zero_stage": 3, "train.checkpoint_every": 2,
                                         "train.keep_checkpoints": 1, "train.keep_every": 4, "train.export_every": 4,
                                         "train.sample_prompts": str(tmp / "prompts.txt"),
                                         "train.sample_max_tokens": 8})
    return cfg, pretrain(cfg, show_progress=False), tmp / "runs" / "t"


def test_kept_checkpoint_survives_and_exports_land_at_their_steps(z3_run):
    import transformers

    _, summary, run = z3_run
    # checkpoint 2 is pruned (keep_checkpoints=1); 4 stays (keep_every=4): Ray alone would have deleted it
    assert sorted(p.name for p in (run / "checkpoints").glob("checkpoint_*") if p.is_dir()) == ["checkpoint_00000004",
                                                                                 "checkpoint_00000006"]
    assert ckpt.verify(run / "checkpoints" / "checkpoint_00000004")["step"] == 4
    assert [p.name for p in (run / "exports").iterdir()] == ["step_00000004"]
    assert summary["exports"] == [str(run / "exports" / "step_00000004")]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["path"]) for r in rows if r.get("event") == "export"] == [(4, summary["exports"][0])]
    step4 = run / "exports" / "step_00000004"
    model = transformers.AutoModelForCausalLM.from_pretrained(step4)
    tok = transformers.AutoTokenizer.from_pretrained(step4)
    assert tok.decode(tok("def f(x): return x")["input_ids"]) == "def f(x): return x"
    assert_same_files(step4, run / "hf", export.tokenizer_files(str(run / "hf")))
    final = transformers.AutoModelForCausalLM.from_pretrained(run / "hf")
    ids = torch.arange(12).unsqueeze(0)
    with torch.no_grad():  # an earlier model than the final one
        assert not torch.allclose(model(input_ids=ids).logits, final(input_ids=ids).logits)
    # Exports generate with a KV cache (training runs without one; that setting stays out of the export), and
    # the cache changes nothing but the speed: the same greedy tokens as recomputing everything.
    for m in (model, final):
        assert m.config.use_cache and m.generation_config.use_cache
        with torch.no_grad():
            cached = m.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
            plain = m.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
        assert cached.past_key_values is not None and torch.equal(cached.sequences, plain)


def test_each_export_gets_completions_of_the_runs_fixed_prompts(z3_run):
    """train.sample_prompts: a vibe check beside every export, made from that export (ZeRO-3: rank 0 alone
    generates from the folder it wrote, the other rank waits)."""
    from raysmol.serve.engines import Sampling, make_engine

    _, _, run = z3_run
    assert [p.name for p in (run / "samples").iterdir()] == ["step_00000004.jsonl"]
    rows = [json.loads(x) for x in (run / "samples" / "step_00000004.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["def add(a, b):", "The answer is"]
    assert all(r["step"] == 4 and r["version"] == 4 and r["prompt_format"] == "completion" for r in rows)
    engine = make_engine("transformers", str(run / "exports" / "step_00000004"))
    again = engine.generate([r["prompt"] for r in rows], Sampling(max_tokens=8))
    assert [r["completions"] for r in rows] == [[s.text for s in g] for g in again]  # that export's greedy text
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(e["step"], e["path"]) for e in events if e.get("event") == "samples"] == \
        [(4, str(run / "samples" / "step_00000004.jsonl"))]


def test_raysmol_export_equals_the_runs_own_exports(z3_run, tmp_path, s3_server):
    from raysmol.cli import main

    _, _, run = z3_run
    copy = tmp_path / "runs" / "t"  # the default --out writes into the run: a copy keeps the shared run as it was
    shutil.copytree(run, copy)
    with pytest.raises(SystemExit) as e:
        main(["export", str(copy / "checkpoints" / "checkpoint_00000006")])
    assert e.value.code == 0
    mine = copy / "exports" / "step_00000006"
    assert_same_weights(mine, run / "hf")  # ZeRO-3 shards of 2 ranks -> the run's own final export, bit for bit
    assert json.loads((mine / "config.json").read_text()) == json.loads((run / "hf" / "config.json").read_text())
    assert_same_files(mine, run / "hf", export.tokenizer_files(str(run / "hf")))
    # An intermediate (kept) checkpoint from object storage equals the export the run made at that step.
    bucket = s3_server.bucket("raysmol-export-test")
    storage.upload_dir(copy, bucket + "/runs/t")
    dest = export.export_checkpoint(bucket + "/runs/t/checkpoints/checkpoint_00000004")
    assert dest == bucket + "/runs/t/exports/step_00000004"
    storage.download_dir(dest, tmp_path / "from_s3")
    assert_same_weights(tmp_path / "from_s3", run / "exports" / "step_00000004")
    assert_same_files(tmp_path / "from_s3", run / "exports" / "step_00000004",
                      export.tokenizer_files(str(run / "hf")) + ["config.json"])


def test_eval_scores_every_export_of_the_run_and_plots_them(z3_run, tmp_path):
    from raysmol.cli import main
    from raysmol.eval.cf import model_identity

    _, _, run = z3_run
    out = tmp_path / "eval"
    with pytest.raises(SystemExit) as e:
        main(["eval", str(run), "--exports", "--suite", str(SUITE), "--out", str(out), "--max-samples", "4"])
    assert e.value.code == 0
    assert (out / "exports.png").stat().st_size > 1000
    curves = json.loads((out / "exports.json").read_text())
    points = curves[str(run)]
    assert [p["step"] for p in points] == [4, 6]
    assert [p["path"] for p in points] == [str(run / "exports" / "step_00000004"), str(run / "hf")]
    from raysmol.eval.cf import load_suite

    tasks = {t.name for t in load_suite(SUITE).tasks}
    for p in points:
        assert p["model"] == model_identity(Path(p["path"]))["name"]
        assert set(p["scores"]) == tasks and all(0 <= s <= 1 for s, _ in p["scores"].values())
        suite_dir = out / p["model"] / load_suite(SUITE).name
        assert {f.stem for f in suite_dir.glob("*.json")} == tasks
