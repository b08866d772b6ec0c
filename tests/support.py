"""Test helpers shared by the test modules and fixtures: import them with `from support import ...`
(tests/ is on sys.path under pytest's default rootdir-based import mode). Fixtures live in conftest.py."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

# --- S3-compatible server on loopback ---------------------------------------------------------

S3_HOST = "127.0.0.1"
S3_START_TIMEOUT_S = 30.0
S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# Variables that would override or slow down the test setup (another endpoint, profile lookup,
# EC2 instance metadata probing).
S3_UNSET = ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION")


@dataclass
class S3Server:
    """A running moto S3 server; `endpoint` is its http://127.0.0.1:PORT URL."""

    endpoint: str
    process: subprocess.Popen

    def bucket(self, name: str) -> str:
        """Create bucket `name` (fine if it exists) and return ``"s3://name"``."""
        import pyarrow.fs as pafs

        fs = pafs.S3FileSystem(
            endpoint_override=self.endpoint,
            access_key=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            secret_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region=S3_CREDENTIALS["AWS_DEFAULT_REGION"],
            allow_bucket_creation=True,
        )
        fs.create_dir(name)
        return f"s3://{name}"


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((S3_HOST, 0))
        return s.getsockname()[1]


def _moto_server_executable() -> str:
    exe = Path(sys.executable).parent / "moto_server"
    if not exe.exists():
        pytest.fail(f"moto_server not found next to {sys.executable} (install moto[server])")
    return str(exe)


def _wait_until_up(proc: subprocess.Popen, endpoint: str, log: Path) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    deadline = time.monotonic() + S3_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"moto_server exited with code {proc.returncode} before answering:\n"
                f"{log.read_text(errors='replace')}"
            )
        try:
            with opener.open(endpoint + "/", timeout=2) as resp:
                if resp.status < 500:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise TimeoutError(
        f"moto_server at {endpoint} did not answer within {S3_START_TIMEOUT_S:.0f}s:\n"
        f"{log.read_text(errors='replace')}"
    )


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def start_moto_server(log_dir: Path) -> S3Server:
    """Start `moto_server` on 127.0.0.1:<free port> (logs in `log_dir`) and wait until it answers.
    Stop it with `stop_process(server.process)`."""
    exe = _moto_server_executable()
    for attempt in range(3):  # the free port can be taken between probing and binding
        port = _free_loopback_port()
        endpoint = f"http://{S3_HOST}:{port}"
        log = log_dir / f"moto_server.{attempt}.log"
        with open(log, "wb") as log_file:
            proc = subprocess.Popen(
                [exe, "-H", S3_HOST, "-p", str(port)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        try:
            _wait_until_up(proc, endpoint, log)
            return S3Server(endpoint=endpoint, process=proc)
        except RuntimeError:
            stop_process(proc)
            if attempt == 2:
                raise
        except BaseException:
            stop_process(proc)
            raise
    raise AssertionError("unreachable")


def s3_environment(mp: pytest.MonkeyPatch, endpoint: str) -> None:
    """Point the standard AWS environment (credentials, endpoint, no proxy for loopback) at `endpoint`."""
    for key in S3_UNSET:
        mp.delenv(key, raising=False)
    for key, value in S3_CREDENTIALS.items():
        mp.setenv(key, value)
    mp.setenv("AWS_ENDPOINT_URL", endpoint)
    mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for key in ("NO_PROXY", "no_proxy"):
        mp.setenv(key, ",".join(filter(None, [os.environ.get(key), S3_HOST, "localhost"])))


# --- Small data and configs ------------------------------------------------------------------

_WORDS = ("the model data token train loss learning rate batch layer attention head python code number "
          "value list function returns small large first second mixture source step check sum").split()


def write_docs(path: Path, docs: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def make_docs(seed: int, n: int, kind: str = "prose") -> list[str]:
    r = random.Random(seed)
    if kind == "code":
        return [f"def f{i}(x):\n    return x * {r.randint(2, 99)} + {r.randint(0, 9)}\n" for i in range(n)]
    if kind == "math":
        out = []
        for _ in range(n):
            a, b = r.randint(1, 99), r.randint(1, 99)
            out.append(f"Question: what is {a} plus {b}? Answer: {a} + {b} = {a + b}.")
        return out
    return [" ".join(r.choice(_WORDS) for _ in range(r.randint(5, 60))).capitalize() + "." for _ in range(n)]


def small_config(tmp_path: Path, small_data: dict[str, Path], overrides: dict | None = None):
    """A 2-worker run of a tiny Llama on `small_data` that finishes in well under a minute."""
    from raysmol.config import apply_override, from_dict, validate

    raw = {
        "run": {"name": "t", "output_dir": str(tmp_path / "runs")},
        "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 128,
                  "max_position_embeddings": 256, "vocab_size": 512},
        "tokenizer": {"name": str(small_data["tokenizer"])},
        "data": {"sources": [{"name": "prose", "path": str(small_data["prose"]), "weight": 0.7},
                             {"name": "code", "path": str(small_data["code"]), "weight": 0.2},
                             {"name": "math", "path": str(small_data["math"]), "weight": 0.1}],
                 "cache_dir": str(small_data["root"] / "cache"), "val_fraction": 0.05},
        "optim": {"lr": 3e-3, "warmup_steps": 1},
        "train": {"steps": 6, "global_batch_tokens": 256, "micro_batch_size": 2, "seq_len": 32, "num_workers": 2,
                  "zero_stage": 2, "checkpoint_every": 3, "eval_batches": 1, "log_every": 1},
    }
    cfg = from_dict(raw, origin="test")
    for k, v in (overrides or {}).items():
        apply_override(cfg, f"{k}={json.dumps(v)}")
    validate(cfg)
    return cfg


def make_hf_model(folder: Path, small_data: dict[str, Path], seed: int, cache: Path) -> Path:
    """A random-init tiny Llama saved with small_data's tokenizer: a servable Hugging Face model folder."""
    import torch
    import transformers

    from raysmol.data.tokenizer import resolve_tokenizer

    tok = resolve_tokenizer(str(small_data["tokenizer"]), cache)
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=128, intermediate_size=256,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=512, tie_word_embeddings=True,
                                   eos_token_id=tok.eos_id, pad_token_id=tok.eos_id, bos_token_id=None)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(tok.hf_dir).save_pretrained(folder)
    return folder
