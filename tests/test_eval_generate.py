"""Freeform evaluation of a checkpoint through the engine pool: prompts, predictions file, scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raysmol.eval.freeform import FreeformError, score_predictions
from raysmol.eval.generate import code_completion, evaluate_freeform, gsm8k_prompts, use_chat

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"


def test_gsm8k_prompts_are_k_shot_from_train():
    keys, prompts = gsm8k_prompts(str(GSM8K), limit=3, shots=2)
    train = [json.loads(x) for x in (GSM8K / "train.jsonl").read_text().splitlines()[:2]]
    test = [json.loads(x) for x in (GSM8K / "test.jsonl").read_text().splitlines()[:3]]
    assert keys == [{"idx": 0}, {"idx": 1}, {"idx": 2}]
    assert prompts[1] == (f"Question: {train[0]['question']}\nAnswer: {train[0]['answer']}\n\n"
                          f"Question: {train[1]['question']}\nAnswer: {train[1]['answer']}\n\n"
                          f"Question: {test[1]['question']}\nAnswer:")


def test_a_chat_reply_s_code_block_completes_the_humaneval_prompt():
    from types import SimpleNamespace

    from raysmol.eval.freeform import humaneval_problems, humaneval_program

    problem = humaneval_problems()["HumanEval/0"]
    whole = problem["prompt"] + problem["canonical_solution"]
    for reply in (f"Sure, here it is:\n```python\n{whole}```\nIt compares every pair.",
                  f"```py\n{whole}",  # cut off before the closing fence
                  whole):  # no fence at all
        program = humaneval_program(problem, code_completion(reply))
        scope: dict = {}
        exec(compile(program, "humaneval", "exec"), scope)  # the canonical solution: raises if the check fails
    wrong = humaneval_program(problem, code_completion("```python\ndef has_close_elements(numbers, threshold):\n"
                                                        "    return False\n```"))
    with pytest.raises(AssertionError):
        exec(compile(wrong, "humaneval", "exec"), {})  # the redefinition is what runs, not the prompt's stub
    plain, chat = SimpleNamespace(chat_template=None), SimpleNamespace(chat_template="{{ messages }}")
    assert use_chat(plain, None, "m") is False and use_chat(chat, None, "m") is True
    assert use_chat(chat, False, "m") is False
    with pytest.raises(FreeformError, match="m: --chat needs a chat template"):
        use_chat(plain, True, "m")


def test_checkpoint_is_generated_scored_and_recorded(ray_local, hf_models, tmp_path):
    from raysmol.serve.pool import EnginePool

    with EnginePool("transformers", str(hf_models["a"]), num_engines=2, version=5) as pool:
        gsm = evaluate_freeform(pool, "gsm8k", str(tmp_path), limit=4, shots=1, max_tokens=12, reference=str(GSM8K))
        he = evaluate_freeform(pool, "humaneval", str(tmp_path), limit=2, samples=2, max_tokens=12)
        with pytest.raises(FreeformError, match="unknown freeform task 'mmlu'"):
            evaluate_freeform(pool, "mmlu", str(tmp_path))
    preds = [json.loads(x) for x in (tmp_path / "gsm8k.predictions.jsonl").read_text().splitlines()]
    assert [p["idx"] for p in preds] == [0, 1, 2, 3] and all(p["version"] == 5 for p in preds)
    assert gsm["n"] == 4 and gsm["version"] == 5 and gsm["engine"] == "transformers"
    # The recorded result is exactly what scoring the written predictions gives (model and files agree).
    again = score_predictions("gsm8k", str(tmp_path / "gsm8k.predictions.jsonl"), reference=str(GSM8K))
    assert again["score"] == gsm["score"] and json.loads((tmp_path / "gsm8k.json").read_text())["n"] == 4
    he_preds = [json.loads(x) for x in (tmp_path / "humaneval.predictions.jsonl").read_text().splitlines()]
    assert [p["task_id"] for p in he_preds] == ["HumanEval/0"] * 2 + ["HumanEval/1"] * 2
    assert he["tasks"] == 2 and he["samples_per_task"] == 2 and "pass@1" in he["metrics"]
    assert all(d["status"] != "ok" for d in he["details"])  # a random tiny model solves nothing


def test_eval_cli_compares_checkpoints_and_refuses_bad_combinations(ray_local, hf_models, tmp_path, capsys):
    from raysmol.cli import main

    def call(*argv) -> int:
        with pytest.raises(SystemExit) as e:
            main(["eval", *map(str, argv)])
        return e.value.code

    assert call(hf_models["a"], hf_models["b"], "--task", "gsm8k", "--engine", "transformers", "--limit", "2",
                "--shots", "0", "--max-tokens", "8", "--reference", GSM8K, "--out", tmp_path) == 0
    out = capsys.readouterr().out
    names = [p.name for p in tmp_path.iterdir() if p.is_dir()]
    assert len(names) == 2 and all((tmp_path / n / "freeform" / "gsm8k.json").is_file() for n in names)
    assert (tmp_path / "compare.png").stat().st_size > 1000 and "comparison plot" in out
    assert set(json.loads((tmp_path / "compare.json").read_text())) == set(names)
    for n in names:  # evaluation is booked in the compute ledger
        (rec,) = [json.loads(x) for x in (tmp_path / n / "ledger.jsonl").read_text().splitlines()]
        assert rec["category"] == "evaluation" and rec["device_kind"] == "cpu" and rec["seconds"] > 0
    assert call(hf_models["a"], "--task", "gsm8k", "--suite", "x.yaml") == 2
    assert call("--task", "gsm8k") == 2
    assert call(hf_models["a"], "--task", "gsm8k", "--predictions", "p.jsonl") == 2
    assert call(tmp_path / "nowhere", "--task", "gsm8k") == 2  # names the missing checkpoint
    assert "nowhere" in capsys.readouterr().err
