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


# ------------------------------------------------------------------ experiment trackers, read back by their own readers


def expected_scalars(rows: list[dict]) -> dict[str, dict[int, float]]:
    """What a tracker should hold for metrics.jsonl's rows: every number of every non-event row by key and step
    (a step logged twice, by an attempt and its resume: the later row)."""
    from raysmol.train.trackers import scalars

    out: dict[str, dict[int, float]] = {}
    for r in rows:
        if "event" not in r and "step" in r:
            for k, v in scalars(r).items():
                out.setdefault(k, {})[r["step"]] = v
    return out


def tensorboard_scalars(logdir) -> dict[str, dict[int, float]]:
    """Scalars by tag and step, read with TensorBoard's own EventAccumulator (purges included); also checks
    that no tag has a step twice."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), f"TensorBoard tag {tag}: a step twice: {steps}"
        out[tag] = {e.step: e.value for e in events}
    return out


def mlflow_scalars(uri: str, run_id: str) -> dict[str, dict[int, float]]:
    """Metric histories of an MLflow run by key and step, through MLflow's client (no step twice)."""
    from mlflow import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # as raysmol's trackers do for a file store
    client = MlflowClient(uri)
    out = {}
    for key in client.get_run(run_id).data.metrics:
        hist = client.get_metric_history(run_id, key)
        steps = [m.step for m in hist]
        assert len(steps) == len(set(steps)), f"MLflow metric {key}: a step twice: {sorted(steps)}"
        out[key] = {m.step: m.value for m in hist}
    return out


def wandb_records(path) -> list:
    """The protobuf records of a W&B run file (run-<id>.wandb): a W&B header, then LevelDB-log style blocks of
    32 KiB holding chunks with a 7-byte header (crc32, length, type: full, first, middle, last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = Path(path).read_bytes(), 32768
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the block's tail is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:
            break
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def wandb_scalars(wandb_dir, run_id: str) -> dict[str, dict[int, float]]:
    """History of every offline W&B run file of `run_id` under `wandb_dir` (one per attempt, oldest first) by key
    and step (no step twice)."""
    out: dict[str, dict[int, float]] = {}
    seen: set[int] = set()
    def order(f: Path) -> tuple[str, int]:  # offline-run-<time>-<id>[-<n>]: a second attempt in the same second
        stamp, _, n = f.parent.name.partition(f"-{run_id}")
        return stamp, int(n[1:] or 0)

    for f in sorted(Path(wandb_dir).glob(f"offline-run-*-{run_id}*/run-{run_id}.wandb"), key=order):
        for rec in wandb_records(f):
            if rec.WhichOneof("record_type") != "history":
                continue
            step = rec.history.step.num
            assert step not in seen, f"W&B run {run_id}: step {step} twice"
            seen.add(step)
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):  # W&B's own _step, _runtime, _timestamp
                    out.setdefault(key, {})[step] = json.loads(item.value_json)
    return out


def assert_same_scalars(got: dict[str, dict[int, float]], want: dict[str, dict[int, float]], what: str) -> None:
    assert set(got) == set(want), f"{what}: keys differ: {sorted(set(got) ^ set(want))}"
    for k in want:
        assert set(got[k]) == set(want[k]), f"{what}: {k}: steps {sorted(got[k])} != {sorted(want[k])}"
        for s, v in want[k].items():
            assert got[k][s] == pytest.approx(v, rel=1e-6, nan_ok=True), f"{what}: {k} at step {s}"
