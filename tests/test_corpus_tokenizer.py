"""Tests for the embedded default corpus and tokenizer resolution (CPU only, no network)."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from raysmol.data.corpus import SOURCES, build_default_corpus
from raysmol.data.tokenizer import EOS_TOKEN, TokenizerError, TokenizerInfo, resolve_tokenizer

# Small arguments for the extra builds; the default-size corpus is built once, by the builtin tokenizer.
SMALL = {"max_code_bytes": 300_000, "n_arithmetic": 2_000, "seed": 3}
CODE_SNIPPET = (
    'def mean(xs: list[float]) -> float:\n\t"""Average."""\n    return sum(xs) / len(xs)  # ok\n'
)
NON_ASCII = "Größe naïve café — 日本語のテキスト, emoji 🙂🚀, ελληνικά, и кириллица.\r\n"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("raysmol-cache")


@pytest.fixture(scope="module")
def builtin(cache_dir: Path) -> TokenizerInfo:
    # Builds the default corpus into cache_dir and trains once for the whole module.
    return resolve_tokenizer("builtin", cache_dir)


@pytest.fixture(scope="module")
def default_corpus(builtin: TokenizerInfo, cache_dir: Path) -> dict[str, Path]:
    return build_default_corpus(cache_dir)


def _read_texts(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


# --------------------------------------------------------------------------------------------------
# Corpus


def test_corpus_files_are_valid_jsonl(default_corpus: dict[str, Path]) -> None:
    assert list(default_corpus) == list(SOURCES)
    for name, path in default_corpus.items():
        assert path.is_file() and path.stat().st_size > 0, name
        texts = _read_texts(path)
        assert texts and all(isinstance(t, str) and t.strip() for t in texts), name
    prose = _read_texts(default_corpus["prose"])
    assert any("assert" in t and "statement" in t for t in prose)  # a pydoc topic
    assert len(_read_texts(default_corpus["arithmetic"])) == 30_000


def test_corpus_code_respects_budget_and_order(tmp_path: Path) -> None:
    code = _read_texts(build_default_corpus(tmp_path, **SMALL)["code"])
    sizes = [len(t.encode("utf-8")) for t in code]
    # Stops at the first file that reaches the budget: everything before it is under budget.
    assert sum(sizes[:-1]) < SMALL["max_code_bytes"] <= sum(sizes)
    for source in code:
        compile(source, "<stdlib>", "exec", dont_inherit=True)


@pytest.mark.slow
def test_corpus_is_deterministic(tmp_path: Path) -> None:
    a = build_default_corpus(tmp_path / "a", **SMALL)
    b = build_default_corpus(tmp_path / "b", **SMALL)
    for name in SOURCES:
        assert a[name].read_bytes() == b[name].read_bytes(), name
    assert a["code"].parent.name == b["code"].parent.name  # same version folder
    other = build_default_corpus(tmp_path / "a", **{**SMALL, "seed": 4})
    assert other["arithmetic"].parent != a["arithmetic"].parent
    assert other["arithmetic"].read_bytes() != a["arithmetic"].read_bytes()


def test_corpus_second_call_is_cached(default_corpus: dict[str, Path], cache_dir: Path) -> None:
    mtimes = {name: p.stat().st_mtime_ns for name, p in default_corpus.items()}
    start = time.perf_counter()
    again = build_default_corpus(cache_dir)
    assert time.perf_counter() - start < 0.5
    assert again == default_corpus
    assert {name: p.stat().st_mtime_ns for name, p in again.items()} == mtimes
    # No stray temporary files left behind by the build.
    assert sorted(p.name for p in again["code"].parent.iterdir()) == sorted(
        [f"{n}.jsonl" for n in SOURCES] + ["_DONE"]
    )


_SOLUTION = re.compile(r"^(?P<question>.+)\nSolution: (?P<work>.+) The answer is (?P<answer>\d+)\.$", re.S)
_EQUATION = re.compile(r"(\d+) ([-+×÷]) (\d+) = (\d+)\.")
_APPLY = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "×": lambda a, b: a * b,
    "÷": lambda a, b: a / b,
}


def test_arithmetic_answers_are_correct(default_corpus: dict[str, Path]) -> None:
    problems = _read_texts(default_corpus["arithmetic"])[:500]
    ops_seen: set[str] = set()
    n_two_step = 0
    for text in problems:
        m = _SOLUTION.match(text)
        assert m, text
        equations = _EQUATION.findall(m["work"])
        assert equations and len(equations) == m["work"].count("="), text
        given: list[int] = []  # operands stated in the question, as opposed to earlier results
        previous: int | None = None
        for left, op, right, result in equations:
            a, b, c = int(left), int(right), int(result)
            assert _APPLY[op](a, b) == c, text
            assert c >= 0, text
            given += [b] if previous is not None and a == previous else [a, b]
            previous = c
            ops_seen.add(op)
        assert int(m["answer"]) == previous, text
        assert sorted(map(int, re.findall(r"\d+", m["question"]))) == sorted(given), text
        n_two_step += len(equations) == 2
    assert ops_seen == set(_APPLY)
    assert 0 < n_two_step < len(problems)


# --------------------------------------------------------------------------------------------------
# Tokenizer


def test_builtin_tokenizer_shape(builtin: TokenizerInfo) -> None:
    assert builtin.spec == "builtin"
    assert builtin.eos_id == 0
    assert builtin.vocab_size == 8192
    tok = Tokenizer.from_file(str(builtin.json_path))
    assert tok.get_vocab_size(with_added_tokens=True) == 8192
    assert tok.token_to_id(EOS_TOKEN) == 0
    assert re.fullmatch(r"[0-9a-f]{64}", builtin.identity)


@pytest.mark.parametrize("text", [CODE_SNIPPET, NON_ASCII, EOS_TOKEN.join(["doc one", " doc two"])])
def test_builtin_round_trip(builtin: TokenizerInfo, text: str) -> None:
    tok = Tokenizer.from_file(str(builtin.json_path))
    ids = tok.encode(text).ids
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert len(ids) < len(text.encode("utf-8"))  # merges were learned, it is not bytes-only


def test_builtin_hf_dir_matches_tokenizers(builtin: TokenizerInfo) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(builtin.hf_dir)
    tok = Tokenizer.from_file(str(builtin.json_path))
    assert hf.eos_token == EOS_TOKEN and hf.eos_token_id == builtin.eos_id
    assert hf.pad_token_id == builtin.eos_id
    assert len(hf) == builtin.vocab_size
    for text in (CODE_SNIPPET, NON_ASCII):
        assert hf(text)["input_ids"] == tok.encode(text).ids
        assert hf.decode(tok.encode(text).ids) == text


def test_builtin_second_resolve_is_cache_hit(builtin: TokenizerInfo, cache_dir: Path) -> None:
    mtime = builtin.json_path.stat().st_mtime_ns
    start = time.perf_counter()
    again = resolve_tokenizer("builtin", cache_dir)
    assert time.perf_counter() - start < 2.0
    assert again == builtin
    assert builtin.json_path.stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_builtin_honours_vocab_size(builtin: TokenizerInfo, cache_dir: Path) -> None:
    small = resolve_tokenizer("builtin", cache_dir, builtin_vocab_size=1000)
    assert small.vocab_size == 1000 and small.eos_id == 0
    assert small.json_path.parent != builtin.json_path.parent
    assert small.identity != builtin.identity


def test_local_folder_spec(builtin: TokenizerInfo, tmp_path: Path) -> None:
    folder = tmp_path / "my-tokenizer"
    shutil.copytree(builtin.hf_dir, folder)
    info = resolve_tokenizer(str(folder), tmp_path / "cache")
    assert info.spec == str(folder)
    assert info.json_path == folder / "tokenizer.json" and info.hf_dir == folder
    assert info.identity == builtin.identity
    assert (info.eos_id, info.vocab_size) == (builtin.eos_id, builtin.vocab_size)


def test_bare_tokenizer_json_spec(builtin: TokenizerInfo, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    bare = tmp_path / "tokenizer.json"
    shutil.copy(builtin.json_path, bare)
    for spec in (str(bare), str(tmp_path)):  # the file itself, and a folder with only tokenizer.json
        info = resolve_tokenizer(spec, tmp_path / "cache")
        assert (info.eos_id, info.vocab_size) == (0, builtin.vocab_size)
        hf = AutoTokenizer.from_pretrained(info.hf_dir)
        assert hf.eos_token_id == 0
        assert hf(NON_ASCII)["input_ids"] == Tokenizer.from_file(str(bare)).encode(NON_ASCII).ids


def _assert_names_spec(err: pytest.ExceptionInfo[TokenizerError], spec: str) -> None:
    message = str(err.value)
    assert repr(spec) in message
    for form in ('"builtin"', "tokenizer.json", "hub repo id"):
        assert form in message, message


@pytest.mark.parametrize("spec", ["/not/here/tokenizer", "./missing-dir/sub", "nope/tokenizer.json"])
def test_missing_path_raises(spec: str, tmp_path: Path) -> None:
    with pytest.raises(TokenizerError) as err:
        resolve_tokenizer(spec, tmp_path)
    _assert_names_spec(err, spec)


def test_folder_without_tokenizer_json_raises(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TokenizerError) as err:
        resolve_tokenizer(str(empty), tmp_path / "cache")
    _assert_names_spec(err, str(empty))
    assert isinstance(err.value, ValueError)


def test_unknown_hub_id_raises_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    # huggingface_hub reads HF_HUB_OFFLINE at import time, so patch the constant too.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # so the id cannot accidentally be a relative path
    spec = "raysmol-tests/no-such-tokenizer"
    start = time.perf_counter()
    with pytest.raises(TokenizerError) as err:
        resolve_tokenizer(spec, tmp_path / "cache")
    assert time.perf_counter() - start < 30
    _assert_names_spec(err, spec)
    assert err.value.__cause__ is not None
    saved = tmp_path / "cache" / "tokenizers"
    assert not saved.exists() or not any(saved.iterdir())  # nothing half-saved for a failed spec
