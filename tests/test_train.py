"""Real 2-worker Ray Train + DeepSpeed runs on CPU (gloo): ZeRO-2, ZeRO-3, HF export, s3:// storage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support import (assert_same_scalars, expected_scalars, mlflow_scalars, small_config, tensorboard_scalars,
                     wandb_scalars, write_docs)

from raysmol import storage
from raysmol.train import checkpoint as ckpt
from raysmol.recipes import pretrain


def read_metrics(run: str) -> list[dict]:
    return [json.loads(x) for x in storage.read_text(storage.join(run, "metrics.jsonl")).splitlines()]


def checkpoint_logits_vs_export(run_dir: Path, summary: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the exported HF model and of a fresh model loaded with the final DeepSpeed checkpoint's weights."""
    import transformers
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    hf = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "hf").eval()
    sd = get_fp32_state_dict_from_zero_checkpoint(summary["checkpoint"], tag=ckpt.DS_TAG)
    ref = transformers.AutoModelForCausalLM.from_config(hf.config)
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding
    ref.tie_weights()
    ref.eval()
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return hf(input_ids=ids).logits, ref(input_ids=ids).logits


@pytest.fixture(scope="module")
def zero2_run(ray_local, small_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zero2")
    # Every tracker (TensorBoard alone is the default): MLflow's file store and W&B offline add ~3 s to the run.
    cfg = small_config(tmp, small_data, {"run.trackers": ["tensorboard", "mlflow", "wandb"]})
    return cfg, pretrain(cfg, show_progress=False), tmp / "runs" / "t"


@pytest.mark.fast
def test_zero2_run_writes_the_run_directory(zero2_run):
    cfg, summary, run = zero2_run
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "metrics.jsonl", "summary.json", "checkpoints", "hf", "plots"}
    assert (run / "plots" / "loss.png").stat().st_size > 1000
    assert json.loads((run / "summary.json").read_text()) == summary
    assert summary["steps"] == 6 and summary["tokens"] == 6 * 256
    for key in ("first_loss", "last_loss", "initial_val_loss", "final_val_loss", "wall_time_s", "checkpoint", "export"):
        assert summary[key] is not None, key
    assert summary["last_loss"] < summary["first_loss"]
    rows = [r for r in read_metrics(str(run)) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["grad_norm"] > 0 and r["lr"] > 0 and r["mfu"] is None
        assert r["tokens_per_s_per_worker"] == pytest.approx(r["tokens_per_s"] / 2)


@pytest.mark.fast
def test_trackers_hold_the_metrics_rows(zero2_run):
    """TensorBoard's events in the run directory, the MLflow run and the offline W&B run each hold every number
    of metrics.jsonl's rows (training, validation at steps 0 and 6) at its step, read back by their own readers."""
    cfg, summary, run = zero2_run
    want = expected_scalars(read_metrics(str(run)))
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "val_loss", "source_tokens/prose"} <= set(want)
    assert sorted(want["val_loss"]) == [0, 6] and sorted(want["loss"]) == [1, 2, 3, 4, 5, 6]
    assert list(run.glob("events.out.tfevents.*"))
    assert_same_scalars(tensorboard_scalars(run), want, "tensorboard")
    state = json.loads((run / "tracking.json").read_text())
    assert_same_scalars(mlflow_scalars(state["mlflow"]["uri"], state["mlflow"]["run_id"]), want, "mlflow")
    assert_same_scalars(wandb_scalars(run / "wandb", state["wandb"]["id"]), want, "wandb")
    from mlflow import MlflowClient  # (support.mlflow_scalars allowed its file store)

    assert MlflowClient(state["mlflow"]["uri"]).get_run(state["mlflow"]["run_id"]).info.status == "FINISHED"


@pytest.mark.fast
def test_checkpoints_are_committed_with_checksums(zero2_run):
    _, summary, run = zero2_run
    folders = sorted(p for p in (run / "checkpoints").glob("checkpoint_*") if p.is_dir())
    assert [f.name for f in folders] == ["checkpoint_00000003", "checkpoint_00000006"]
    state = ckpt.verify(folders[-1])
    assert state["step"] == 6 and state["world_size"] == 2 and state["data"]["next_sample"] == 6 * 8
    assert any("zero_pp_rank_1" in f for f in state["files"])  # rank 1's optimizer shard is in the same folder
    damaged = next(p for p in (folders[0] / "ds").iterdir() if "optim" in p.name)
    damaged.write_bytes(damaged.read_bytes()[:-10])
    with pytest.raises(ckpt.CheckpointError, match="checksum"):
        ckpt.verify(folders[0])


@pytest.mark.fast
def test_hf_export_gives_the_trained_models_logits(zero2_run):
    _, summary, run = zero2_run
    exported, trained = checkpoint_logits_vs_export(run, summary)
    torch.testing.assert_close(exported, trained, rtol=0, atol=0)
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(run / "hf")
    assert tok.decode(tok("def f(x): return x")["input_ids"]) == "def f(x): return x"


def test_zero3_trains_the_same_model_and_scores_a_suite_while_training(zero2_run, ray_local, small_data, tmp_path):
    suite = Path(__file__).resolve().parents[1] / "eval" / "suites" / "tiny.yaml"
    cfg = small_config(tmp_path, small_data, {"train.zero_stage": 3, "train.eval_suite": str(suite),
                                              "train.eval_suite_samples": 8})
    summary = pretrain(cfg, show_progress=False)
    run = tmp_path / "runs" / "t"
    # The suite is scored with validation loss (steps 0 and 6: every rank forwards, as ZeRO-3 requires) and the
    # last scores are those of the exported model on the same samples.
    from raysmol.eval.cf import load_docs, load_suite, score_choices

    scored = [r for r in read_metrics(str(run)) if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in scored] == [0, 6] and all("val_loss" in r for r in scored)
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(run / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(run / "hf")
    tasks = load_suite(suite).tasks
    assert {f"eval/{t.name}" for t in tasks} <= set(scored[-1])
    for t in tasks:
        assert scored[-1][f"eval/{t.name}"] == pytest.approx(score_choices(hf, tok, load_docs(t, 8)), abs=1e-9)
    assert (run / "plots" / "loss.png").stat().st_size > (zero2_run[2] / "plots" / "loss.png").stat().st_size
    z3 = [r["loss"] for r in read_metrics(str(run)) if "loss" in r]
    z2 = [r["loss"] for r in read_metrics(str(zero2_run[2])) if "loss" in r]
    # Same data, same init: ZeRO-3 only changes how the state is partitioned (fp32 reduction order differs).
    assert z3 == pytest.approx(z2, rel=1e-4)
    exported, trained = checkpoint_logits_vs_export(run, summary)
    torch.testing.assert_close(exported, trained, rtol=1e-5, atol=1e-5)


def test_object_storage_run_directory(ray_local, small_data, tmp_path, s3_server):
    bucket = s3_server.bucket("raysmol-runs-test")
    tiny_source = write_docs(tmp_path / "few.jsonl", ["one two three.", "four five six seven.", "eight nine."])
    cfg = small_config(tmp_path, small_data, {"run.output_dir": bucket + "/runs", "train.steps": 4,
                                              "train.checkpoint_every": 2, "data.sources.2.path": str(tiny_source),
                                              "train.log_every": 3, "train.eval_every": 2})
    summary = pretrain(cfg, show_progress=False)
    run = bucket + "/runs/t"
    assert summary["checkpoint"].startswith(bucket)
    assert {"checkpoint_00000002", "checkpoint_00000004"} <= set(storage.listdir(storage.join(run, "checkpoints")))
    local = tmp_path / "downloaded"
    storage.download_dir(storage.join(run, "checkpoints", "checkpoint_00000004"), local / "ckpt")
    assert ckpt.verify(local / "ckpt")["step"] == 4
    storage.download_dir(storage.join(run, "hf"), local / "hf")
    import transformers

    assert transformers.AutoModelForCausalLM.from_pretrained(local / "hf").config.vocab_size == 512
    assert json.loads(storage.read_text(storage.join(run, "summary.json")))["steps"] == 4
    rows = read_metrics(run)
    # Logged every 3 steps, whenever validation loss is due (every 2), at the end, and the first step of an attempt.
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 2, 4]
    # ~100 tokens of the 0.1 source were drawn from a stream of a few dozen: it wrapped, and the run says so.
    assert summary["data"]["math"]["wrapped"] and summary["data"]["math"]["epochs"] > 1
    assert not summary["data"]["prose"]["wrapped"]
    # TensorBoard's event files, written on the rank-0 worker's disk, reached the bucket (at checkpoints and the end).
    events = [n for n in storage.listdir(run) if n.startswith("events.out.tfevents.")]
    assert events
    for name in events:
        (local / "tb" / name).parent.mkdir(parents=True, exist_ok=True)
        (local / "tb" / name).write_bytes(storage.read_bytes(storage.join(run, name)))
    assert_same_scalars(tensorboard_scalars(local / "tb"), expected_scalars(rows), "tensorboard")
