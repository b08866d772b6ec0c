"""raysmol merge: linear, task arithmetic and SLERP of HF checkpoints (issue 6, item 4).

Tiny random Llama models (hidden 32, 2 layers, vocab 64) are built in-process with fixed seeds and saved with
save_pretrained. "Bit-exact" below means torch.equal; "fp32 rounding" means torch.testing's float32 tolerance.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from raysmol.post import merge as M

VOCAB = 64


def _llama(seed: int, tied: bool = False):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tied)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # RMSNorm weights start at 1 in every model; make them differ like trained ones do
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, **{f"w{i}": i for i in range(1, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge_inputs")
    out = {}
    for name, seed in (("a", 0), ("b", 1), ("base", 2)):
        out[name] = root / name
        _llama(seed).save_pretrained(out[name])
    _tokenizer().save_pretrained(out["a"])
    out["a_sharded"] = root / "a_sharded"
    _llama(0).save_pretrained(out["a_sharded"], max_shard_size="10KB")  # same weights as a, many shards
    for name, seed in (("ta", 3), ("tb", 4)):
        out[name] = root / name
        _llama(seed, tied=True).save_pretrained(out[name])
    return out


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    assert files, folder
    return {k: v for f in files for k, v in load_file(f).items()}


def _assert_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


# ---- merge rules --------------------------------------------------------------------------------------------


def test_slerp_rule_hand_values():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(M.slerp(a, b, 0.5), torch.tensor([math.sqrt(0.5)] * 2))  # on the arc, not the chord
    t, theta = 0.25, math.pi / 2
    torch.testing.assert_close(M.slerp(2 * a, b, t), 2 * a * math.sin((1 - t) * theta) + b * math.sin(t * theta))
    # colinear (and zero) tensors fall back to linear interpolation
    assert torch.equal(M.slerp(torch.ones(3), 2 * torch.ones(3), 0.25), torch.full((3,), 1.25))
    assert torch.equal(M.slerp(torch.zeros(2), b, 0.5), torch.tensor([0.0, 0.5]))


def test_plan_shards_and_sizes():
    assert M.plan_shards([("a", 4), ("b", 4), ("c", 10), ("d", 1)], 8) == [["a", "b"], ["c"], ["d"]]
    assert M.parse_size("5GB") == 5 * 10**9 and M.parse_size("10KB") == 10**4 and M.parse_size("2048") == 2048
    with pytest.raises(M.MergeError, match="max-shard-size"):
        M.parse_size("lots")


# ---- merging checkpoints ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,kw", [("linear", {}), ("task_arithmetic", {"base": "a"}),
                                       ("slerp", {"t": 0.3})])
def test_merging_a_model_with_itself_returns_it_bit_exactly(models, tmp_path, method, kw):
    kw = {k: models[v] if k == "base" else v for k, v in kw.items()}
    n = 1 if method == "task_arithmetic" else 2
    M.merge(method, [models["a"]] * n, tmp_path / "out", progress=False, **kw)
    _assert_equal(_weights(tmp_path / "out"), _weights(models["a"]))


def test_linear_merge_of_two_is_the_elementwise_mean(models, tmp_path):
    record = M.merge("linear", [models["a"], models["b"]], tmp_path / "out", progress=False)
    a, b = _weights(models["a"]), _weights(models["b"])
    # bit-exact: halving is exact in binary floating point, so 0.5a + 0.5b rounds exactly as (a + b) / 2
    _assert_equal(_weights(tmp_path / "out"), {k: (a[k] + b[k]) / 2 for k in a})
    assert record["weights"] == [0.5, 0.5]


def test_linear_weights_are_normalised(models, tmp_path):
    record = M.merge("linear", [models["a"], models["b"]], tmp_path / "out", weights=[1, 3], progress=False)
    a, b, got = _weights(models["a"]), _weights(models["b"]), _weights(tmp_path / "out")
    assert record["weights"] == [0.25, 0.75]
    for k in a:
        torch.testing.assert_close(got[k], 0.25 * a[k] + 0.75 * b[k])  # within fp32 rounding


def test_task_arithmetic_matches_hand_formula(models, tmp_path):
    M.merge("task_arithmetic", [models["a"], models["b"]], tmp_path / "out", base=models["base"],
            weights=[0.7, -0.3], progress=False)  # a negative weight subtracts a task (Ilharco et al. 2023)
    a, b, base = (_weights(models[n]) for n in ("a", "b", "base"))
    got = _weights(tmp_path / "out")
    for k in a:
        want = base[k] + 0.7 * (a[k] - base[k]) - 0.3 * (b[k] - base[k])
        torch.testing.assert_close(got[k], want)
        assert not torch.allclose(got[k], a[k])


def test_slerp_endpoints_and_midpoint(models, tmp_path):
    a, b = _weights(models["a"]), _weights(models["b"])
    for t, want in ((0.0, a), (1.0, b)):
        M.merge("slerp", [models["a"], models["b"]], tmp_path / f"t{t}", t=t, progress=False)
        _assert_equal(_weights(tmp_path / f"t{t}"), want)
    M.merge("slerp", [models["a"], models["b"]], tmp_path / "mid", progress=False)  # default t = 0.5
    got = _weights(tmp_path / "mid")
    for k in ("model.layers.0.self_attn.q_proj.weight", "model.norm.weight"):  # a 2-D and a 1-D tensor
        x, y = a[k].double().flatten(), b[k].double().flatten()
        cos = float(x @ y / (x.norm() * y.norm()))
        assert abs(cos) < M.COLINEAR_DOT, (k, cos)  # the spherical branch, not the linear fallback
        theta = math.acos(cos)
        want = (a[k].double() * math.sin(theta / 2) + b[k].double() * math.sin(theta / 2)) / math.sin(theta)
        torch.testing.assert_close(got[k], want.float())
        assert not torch.allclose(got[k], (a[k] + b[k]) / 2)  # spherical, not linear


@pytest.mark.parametrize("tied", [False, True])
def test_merged_model_loads_and_runs_in_transformers(models, tmp_path, tied):
    import transformers

    names = ["ta", "tb"] if tied else ["a", "b"]
    out = tmp_path / "out"
    M.merge("linear", [models[n] for n in names], out, progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    a, b = _weights(models[names[0]]), _weights(models[names[1]])
    sd = model.state_dict()
    for k in a:
        assert torch.equal(sd[k], (a[k] + b[k]) / 2), k
    assert ("lm_head.weight" in a) != tied
    if tied:
        assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    with torch.no_grad():
        logits = model(torch.arange(8)[None]).logits
    assert logits.shape == (1, 8, VOCAB) and torch.isfinite(logits).all()
    if not tied:  # the first model's tokenizer came along
        tok = transformers.AutoTokenizer.from_pretrained(out)
        assert tok("w1 w5")["input_ids"] == [1, 5]
        assert json.loads((out / "config.json").read_text()) == json.loads((models["a"] / "config.json").read_text())


def test_sharded_input_and_output(models, tmp_path):
    assert (models["a_sharded"] / M.INDEX_FILE).exists()
    M.merge("linear", [models["a"], models["b"]], tmp_path / "plain", progress=False)
    M.merge("linear", [models["a_sharded"], models["b"]], tmp_path / "sharded", max_shard_size="10KB",
            progress=False)
    out = tmp_path / "sharded"
    index = json.loads((out / M.INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (out / M.SINGLE_FILE).exists()
    _assert_equal(_weights(out), _weights(tmp_path / "plain"))
    import transformers

    transformers.AutoModelForCausalLM.from_pretrained(out)  # the index is one transformers reads
    record = json.loads((out / M.RECORD_FILE).read_text())
    shards = record["models"][0]["sha256"]
    assert len(shards) > 2 and all(
        shards[f] == hashlib.sha256((models["a_sharded"] / f).read_bytes()).hexdigest() for f in shards)


def test_computes_in_float32_and_saves_in_the_first_models_dtype(models, tmp_path):
    half = tmp_path / "a_bf16"
    _llama(0).to(torch.bfloat16).save_pretrained(half)
    M.merge("linear", [half, models["b"]], tmp_path / "bf16", progress=False)
    M.merge("linear", [models["b"], half], tmp_path / "fp32", progress=False)
    a, b = _weights(half), _weights(models["b"])
    _assert_equal(_weights(tmp_path / "bf16"), {k: ((a[k].float() + b[k]) / 2).bfloat16() for k in a})
    _assert_equal(_weights(tmp_path / "fp32"), {k: (b[k] + a[k].float()) / 2 for k in a})


# ---- errors -------------------------------------------------------------------------------------------------


def _altered_copy(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    sd = load_file(dst / M.SINGLE_FILE)
    edit(sd)
    save_file(sd, dst / M.SINGLE_FILE, metadata={"format": "pt"})
    return dst


def test_mismatched_shape_names_the_tensor_and_both_shapes(models, tmp_path):
    k = "model.layers.1.mlp.up_proj.weight"
    bad = _altered_copy(models["b"], tmp_path / "bad", lambda sd: sd.__setitem__(k, torch.zeros(65, 32)))
    with pytest.raises(M.MergeError, match=rf"tensor {k}: shape \[64, 32\] in .*/a but \[65, 32\] in .*/bad"):
        M.merge("linear", [models["a"], bad], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_tensor_and_config_mismatch_are_named(models, tmp_path):
    k = "model.layers.0.self_attn.k_proj.weight"
    lacking = _altered_copy(models["b"], tmp_path / "lacking", lambda sd: sd.pop(k))
    with pytest.raises(M.MergeError, match=rf"lacking lacks \['{k}'\]"):
        M.merge("linear", [models["a"], lacking], tmp_path / "out", progress=False)
    heads = tmp_path / "heads"
    shutil.copytree(models["b"], heads)
    cfg = json.loads((heads / "config.json").read_text())
    (heads / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": 8}))
    with pytest.raises(M.MergeError, match=r"config.json key num_attention_heads differs: 4 in .*/a but 8 in"):
        M.merge("linear", [models["a"], heads], tmp_path / "out", progress=False)


@pytest.mark.parametrize("method,n,kw,match", [
    ("linear", 2, {"weights": [1.0, -1.0]}, "must be >= 0"),
    ("linear", 2, {"weights": [0.0, 0.0]}, "positive sum"),
    ("linear", 2, {"weights": [1.0]}, "1 values for 2 models"),
    ("slerp", 3, {}, "exactly 2 models"),
    ("slerp", 2, {"t": 1.5}, r"--t: 1.5 is outside \[0, 1\]"),
    ("task_arithmetic", 1, {}, "--base: required"),
    ("linear", 2, {"base": "base"}, "--base: not used by linear"),
    ("ties", 2, {}, "not one of"),
])
def test_bad_arguments(models, tmp_path, method, n, kw, match):
    kw = {k: models[v] if k == "base" else v for k, v in kw.items()}
    with pytest.raises(M.MergeError, match=match):
        M.merge(method, [models["a"]] * n, tmp_path / "out", progress=False, **kw)


def test_failure_mid_write_leaves_no_output(models, tmp_path, monkeypatch):
    calls = []
    real = M._merged_tensor

    def flaky(*args):
        calls.append(1)
        if len(calls) == 5:
            raise M.MergeError("injected")
        return real(*args)

    monkeypatch.setattr(M, "_merged_tensor", flaky)
    with pytest.raises(M.MergeError, match="injected"):
        M.merge("linear", [models["a"], models["b"]], tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temporary sibling


# ---- CLI ----------------------------------------------------------------------------------------------------


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="raysmol")
    M.add_parser(parser.add_subparsers(dest="verb", required=True))
    args = parser.parse_args(argv)
    return args.fn(args)


def test_cli_writes_merge_json(models, tmp_path, capsys):
    out = tmp_path / "out"
    assert _cli(["merge", "--method", "slerp", str(models["a"]), str(models["b"]), "--out", str(out),
                 "--t", "0.25"]) == 0
    record = json.loads((out / M.RECORD_FILE).read_text())
    assert record["method"] == "slerp" and record["t"] == 0.25 and record["weights"] is None
    assert [m["path"] for m in record["models"]] == [str(models["a"].resolve()), str(models["b"].resolve())]
    digest = hashlib.sha256((models["b"] / M.SINGLE_FILE).read_bytes()).hexdigest()
    assert record["models"][1]["sha256"] == {M.SINGLE_FILE: digest}
    assert "merged" in capsys.readouterr().out
    # an existing output folder is refused, with exit code 2 and the reason
    assert _cli(["merge", "--method", "linear", str(models["a"]), str(models["b"]), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
