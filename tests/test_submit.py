"""Jobs on a real Ray head: plain `ray job submit` and `raysmol submit` against `ray start --head` on loopback
with token authentication (its own RAY_TMPDIR and ports, torn down by its processes, never `ray stop`); and
`raysmol submit`'s own checks, which must fail before anything is sent."""

from __future__ import annotations

import http.server
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from localray import LOOPBACK, REPO, Head, clean_env, free_port, new_tmpdir, ray_head
from ray.job_submission import JobSubmissionClient

from raysmol.config import ConfigError
from raysmol.submit import (
    DEFAULT_EXCLUDES,
    SubmitError,
    auth_token,
    build_job,
    check_upload,
    head_is_here,
    scan_upload,
    upload_limit,
)

RAYSMOL = [sys.executable, "-m", "raysmol"]
RAY = str(Path(sys.executable).parent / "ray")
# The embedded tiny job, cut to a few steps (~30 s end to end on 2 cores; prepared data is cached).
FAST = ["train.steps=4", "train.checkpoint_every=2", "optim.warmup_steps=1"]
JOB_TIMEOUT_S = 300


def run(cmd: list[str], env: dict[str, str], cwd: Path = REPO, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def refusing_address() -> str:
    """A loopback URL nothing listens on: any request to it fails at once."""
    return f"http://{LOOPBACK}:{free_port()}"


# ---------------------------------------------------------------- checks that never touch the network


def _working_dir(root: Path) -> Path:
    """A small raysmol checkout: the package and the job configs."""
    shutil.copytree(REPO / "raysmol", root / "raysmol", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "jobs", root / "jobs")
    return root


def _sparse(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)  # sparse: no disk used, but Ray would read and zip every byte


@pytest.mark.slow
def test_oversized_working_dir_is_refused_before_any_network_call(tmp_path):
    assert upload_limit() == 100 * 2**20  # the dashboard's request-body cap, measured in DESIGN.md
    wd = _working_dir(tmp_path / "wd")
    _sparse(wd / "data" / "shard-000.bin", 150 * 2**20)
    _sparse(wd / "data" / "shard-001.bin", 20 * 2**20)
    _sparse(wd / ".git" / "objects" / "pack" / "big.pack", 500 * 2**20)  # excluded by default: must not count
    _sparse(wd / "runs" / "old" / "ckpt.pt", 500 * 2**20)
    with socket.socket() as listener:  # the address raysmol is given: it must never be contacted
        listener.bind((LOOPBACK, 0))
        listener.listen()
        listener.setblocking(False)
        address = f"http://{LOOPBACK}:{listener.getsockname()[1]}"
        out = run([*RAYSMOL, "submit", "jobs/tiny.yaml", f"run.output_dir={tmp_path}/runs", "--address", address],
                  env=clean_env(tmp_path, None), cwd=wd)
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert out.returncode == 2, out.stderr
    err = out.stderr
    assert "MiB, over Ray's 100.0 MiB limit for a job package" in err, err
    lines = [line.split() for line in err.splitlines() if line.startswith("  ")]
    assert [parts[-1] for parts in lines[:3]] == ["data/", "data/shard-000.bin", "data/shard-001.bin"], err
    assert not any(parts[-1].startswith((".git", "runs")) for parts in lines), err  # excluded: not counted


@pytest.mark.slow
def test_excluding_the_large_paths_passes_the_size_check(tmp_path):
    wd = _working_dir(tmp_path / "wd")
    _sparse(wd / "data" / "shard-000.bin", 150 * 2**20)
    address = refusing_address()
    out = run([*RAYSMOL, "submit", "jobs/tiny.yaml", f"run.output_dir={tmp_path}/runs", "--address", address,
               "--exclude", "data/"], env=clean_env(tmp_path, None), cwd=wd)
    assert out.returncode == 2
    assert f"cannot reach the Ray dashboard at {address}" in out.stderr, out.stderr  # got as far as the network


def test_upload_scan_is_exactly_what_ray_zips(tmp_path):
    from ray._private.runtime_env.packaging import create_package

    root = tmp_path / "wd"
    files = {"keep.py": 10, "sub/.gitignore": 6, "sub/a.log": 5, "sub/b.txt": 7, ".rayignore": 8,
             "secret/s.txt": 3, ".git/HEAD": 20, "pkg/__pycache__/m.pyc": 50, "pkg/m.py": 30,
             "x.egg-info/PKG-INFO": 9, "custom/c.bin": 4096, "blob.bin": 300_000}
    for name, size in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(os.urandom(size))
    (root / "sub" / ".gitignore").write_text("*.log\n")  # nested .gitignore: applies under sub/
    (root / ".rayignore").write_text("secret/\n")
    excludes = [*DEFAULT_EXCLUDES, "custom/"]
    upload = scan_upload(root, excludes)
    assert set(upload.sizes) == {"keep.py", "sub/.gitignore", "sub/b.txt", ".rayignore", "pkg/m.py", "blob.bin"}

    package = tmp_path / "pkg.zip"
    create_package(str(root), package, include_gitignore=True, excludes=excludes)  # what Ray uploads
    with zipfile.ZipFile(package) as z:
        assert {i.filename for i in z.infolist() if not i.is_dir()} == set(upload.sizes)
    assert upload.package_bytes == package.stat().st_size


def test_check_upload_names_the_largest_paths_and_passes_small_ones(tmp_path):
    root = tmp_path / "wd"
    _sparse(root / "a" / "big.bin", 3000)
    _sparse(root / "a" / "b" / "mid.bin", 2000)
    _sparse(root / "small.txt", 10)
    upload = scan_upload(root, list(DEFAULT_EXCLUDES))
    check_upload(upload, limit=upload.package_bytes + 1)
    with pytest.raises(SubmitError) as e:
        check_upload(upload, limit=4096)
    assert [p for p, _ in upload.largest(3)] == ["a/", "a/big.bin", "a/b/"]
    assert "a/big.bin" in str(e.value) and "4.0 KiB limit" in str(e.value)


def test_build_job_runs_the_uploaded_code_with_local_validation(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    spec, cfg = build_job("jobs/tiny.yaml", ["train.steps=40", f"run.output_dir={tmp_path}"], REPO,
                          list(DEFAULT_EXCLUDES))
    assert spec.entrypoint == f"python -m raysmol pretrain jobs/tiny.yaml train.steps=40 run.output_dir={tmp_path}"
    assert spec.runtime_env["working_dir"] == str(REPO) and ".git/" in spec.runtime_env["excludes"]
    assert "py_modules" not in spec.runtime_env  # the checkout's raysmol travels in the working dir
    assert spec.submission_id.startswith("raysmol-tiny-") and spec.metadata["raysmol_run"] == cfg.run.name == "tiny"


@pytest.mark.parametrize("job", sorted(p.name for p in (REPO / "jobs").glob("*.yaml")))
def test_every_job_config_is_submittable(job, monkeypatch):
    monkeypatch.chdir(REPO)
    spec, cfg = build_job(f"jobs/{job}", ["run.output_dir=s3://bucket/runs"], REPO, list(DEFAULT_EXCLUDES))
    assert spec.entrypoint == f"python -m raysmol pretrain jobs/{job} run.output_dir=s3://bucket/runs"
    assert cfg.run.output_dir == "s3://bucket/runs"


def test_build_job_outside_a_checkout_ships_raysmol_as_a_module(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    shutil.copy(REPO / "jobs" / "tiny.yaml", project / "configs" / "tiny.yaml")
    monkeypatch.chdir(project)
    spec, _ = build_job("configs/tiny.yaml", [f"run.output_dir={tmp_path}"], Path("."), [])
    assert spec.runtime_env["py_modules"] == [str(REPO / "raysmol")]
    assert spec.entrypoint.startswith("python -m raysmol pretrain configs/tiny.yaml")


def test_the_job_s_python_is_quoted_into_the_entrypoint(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    spec, _ = build_job("jobs/tiny.yaml", [f"run.output_dir={tmp_path}"], REPO, [])
    spec.python = "/opt/my env/bin/python"
    assert spec.entrypoint.startswith("'/opt/my env/bin/python' -m raysmol pretrain jobs/tiny.yaml")


class _FakeStateAPI(http.server.BaseHTTPRequestHandler):
    """Ray's state API as a dashboard (or an SSH tunnel to one) would answer `GET /api/v0/nodes`."""

    head_ip: str | None = None

    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.head_ip is None or not self.path.startswith("/api/v0/nodes"):
            self.send_error(404)
            return
        nodes = [{"node_ip": "10.255.0.9", "is_head_node": False}, {"node_ip": self.head_ip, "is_head_node": True}]
        body = json.dumps({"result": True, "data": {"result": {"result": nodes}}}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("head_ip, here", [
    (LOOPBACK, True),  # a local head
    ("192.0.2.7", False),  # a remote head behind a tunnel on this machine's loopback (TEST-NET-1: never local)
    (None, False),  # no state API: doubt means no
])
def test_head_is_here_asks_the_cluster_not_the_url(head_ip, here):
    handler = type("Handler", (_FakeStateAPI,), {"head_ip": head_ip})
    server = http.server.HTTPServer((LOOPBACK, 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert head_is_here(f"http://{LOOPBACK}:{server.server_port}") is here
    finally:
        server.shutdown()
    assert head_is_here(refusing_address()) is False


def test_build_job_refuses_what_would_go_wrong_on_the_cluster(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(SubmitError, match="outside the working directory"):
        build_job(str(REPO / "jobs" / "tiny.yaml"), [f"run.output_dir={tmp_path}"], REPO / "raysmol", [])
    with pytest.raises(SubmitError, match=r"run.output_dir='runs' is a relative path"):
        build_job("jobs/tiny.yaml", [], REPO, [])
    with pytest.raises(ConfigError, match="train.zero_stage"):
        build_job("jobs/tiny.yaml", ["train.zero_stage=7", f"run.output_dir={tmp_path}"], REPO, [])
    with pytest.raises(SubmitError, match="not a directory"):
        build_job("jobs/tiny.yaml", [], tmp_path / "missing", [])


def test_auth_token_comes_from_ray_s_sources_in_ray_s_order(tmp_path, monkeypatch):
    for key in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert auth_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert auth_token() == "from-home"
    (tmp_path / "tok").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert auth_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert auth_token() == "from-env"
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(SubmitError, match="RAY_AUTH_TOKEN_PATH"):
        auth_token()


@pytest.mark.parametrize("argv, message", [
    (["submit"], "nothing to do"),
    (["submit", "jobs/tiny.yaml", "--status", "x"], "not both"),
    (["submit", "jobs/tiny.yaml", "train.stepz=3"], "train.stepz"),
    (["submit", "--status", "x"], "no cluster"),
    (["submit", "--status", "x", "--address", "127.0.0.1:8265"], "expected the dashboard URL"),
])
def test_cli_bad_input_exits_2_naming_the_problem(argv, message, tmp_path):
    env = clean_env(tmp_path, None)
    out = run([*RAYSMOL, *argv], env=env)
    assert out.returncode == 2 and message in out.stderr, out.stderr


# ---------------------------------------------------------------- a real head


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    with ray_head() as h:
        yield h


def client(h: Head) -> JobSubmissionClient:

    return JobSubmissionClient(h.dashboard, headers={"Authorization": f"Bearer {h.token}"})


def wait_done(h: Head, job_id: str, timeout: float = JOB_TIMEOUT_S) -> str:
    c = client(h)
    deadline = time.monotonic() + timeout
    while (status := c.get_job_status(job_id).value) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, f"{job_id}: {status} at {timeout:.0f} s\n{c.get_job_logs(job_id)[-2000:]}"
        time.sleep(1)
    return status


def ray_job_submit(h: Head, *entrypoint: str) -> str:
    """Plain `ray job submit --working-dir <checkout>`, as the README says; returns the job id."""
    job = f"test-{secrets.token_hex(4)}"
    out = run([RAY, "job", "submit", "--address", h.dashboard, "--working-dir", str(REPO), "--submission-id", job,
               "--no-wait", "--", *entrypoint], env=h.client_env())
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return job


@pytest.mark.slow
def test_ray_job_submit_trains_checkpoints_and_exports(head, tmp_path):
    started = time.monotonic()
    job = ray_job_submit(head, "raysmol", "pretrain", "jobs/tiny.yaml", *FAST, f"run.output_dir={tmp_path}")
    status = wait_done(head, job)
    took = time.monotonic() - started
    assert status == "SUCCEEDED", client(head).get_job_logs(job)[-4000:]
    run_dir = tmp_path / "tiny"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4
    state = json.loads((run_dir / "checkpoints" / "checkpoint_00000004" / "state.json").read_text())
    assert state["step"] == 4 and state["files"]
    assert (run_dir / "hf" / "model.safetensors").stat().st_size > 0 and (run_dir / "hf" / "tokenizer.json").exists()
    print(f"ray job submit, tiny job, end to end: {took:.1f} s")


@pytest.mark.slow
def test_bad_config_job_fails_with_the_config_error_in_its_logs(head, tmp_path):
    job = ray_job_submit(head, "raysmol", "pretrain", "jobs/tiny.yaml", "train.zero_stage=7",
                         f"run.output_dir={tmp_path}")
    assert wait_done(head, job, timeout=120) == "FAILED"
    info = client(head).get_job_info(job)
    assert "exit code 2" in info.message, info.message
    assert "train.zero_stage: must be 0, 1, 2 or 3, got 7" in client(head).get_job_logs(job)


@pytest.mark.slow
def test_submits_without_the_token_are_refused(head, tmp_path):
    before = {j.submission_id for j in client(head).list_jobs()}
    out = run([RAY, "job", "submit", "--address", head.dashboard, "--no-wait", "--", "true"],
              env=head.client_env(token=None))
    assert out.returncode != 0 and "Unauthorized: Missing authentication token" in out.stdout + out.stderr
    out = run([*RAYSMOL, "submit", "jobs/tiny.yaml", f"run.output_dir={tmp_path}", "--address", head.dashboard],
              env=head.client_env(token="not-the-token"))
    assert out.returncode == 2 and "Invalid authentication token" in out.stderr, out.stderr
    assert {j.submission_id for j in client(head).list_jobs()} == before  # nothing ran


def _checkpoint_steps(run_dir: Path) -> set[int]:
    return {int(d.name.removeprefix("checkpoint_")) for d in (run_dir / "checkpoints").glob("checkpoint_*")
            if (d / "state.json").exists()}


@pytest.mark.slow
def test_raysmol_submit_stop_then_resubmit_continues_from_the_last_checkpoint(head, tmp_path):
    args = ["submit", "jobs/tiny.yaml", "train.steps=24", "train.checkpoint_every=4", "optim.warmup_steps=1",
            "run.name=resume", f"run.output_dir={tmp_path}", "--address", head.dashboard]
    out = run([*RAYSMOL, *args], env=head.client_env())
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip()
    run_dir = tmp_path / "resume"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not _checkpoint_steps(run_dir):  # stop it mid-run, after its first checkpoint
        assert time.monotonic() < deadline and client(head).get_job_status(job).value in ("PENDING", "RUNNING")
        time.sleep(0.5)
    stop = run([*RAYSMOL, "submit", "--stop", job, "--address", head.dashboard], env=head.client_env())
    assert stop.returncode == 0 and "stop requested" in stop.stdout, stop.stdout + stop.stderr
    assert wait_done(head, job) == "STOPPED"
    status = run([*RAYSMOL, "submit", "--status", job, "--address", head.dashboard], env=head.client_env())
    assert status.stdout.startswith(f"{job}: STOPPED")
    assert not (run_dir / "summary.json").exists()
    saved = _checkpoint_steps(run_dir)
    metrics = run_dir / "metrics.jsonl"
    seen = len(metrics.read_text().splitlines()) if metrics.exists() else 0

    again = run([*RAYSMOL, *args, "--follow"], env=head.client_env(), timeout=JOB_TIMEOUT_S)
    assert again.returncode == 0 and "SUCCEEDED" in again.stderr, again.stdout[-3000:] + again.stderr[-2000:]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 24
    rows = [json.loads(line) for line in metrics.read_text().splitlines()[seen:]]
    first = next(r for r in rows if "loss" in r)
    assert first["step"] - 1 in saved, (first, saved)  # the second job's first step follows a checkpoint
    assert not any(r.get("step") == 0 for r in rows)  # ... it never started over
    logs = run([*RAYSMOL, "submit", "--logs", again.stdout.splitlines()[0], "--address", head.dashboard],
               env=head.client_env())
    assert logs.returncode == 0 and "run resume: 24 steps" in logs.stdout


def readme_rehearsal() -> str:
    """The README's local-head rehearsal: its bash block that starts a head and submits to it."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    found = [b for b in blocks if "ray start --head" in b and "raysmol submit" in b and "127.0.0.1:8265" in b]
    assert len(found) == 1, "README.md: expected one bash block with the local-head rehearsal"
    return found[0]


@pytest.mark.slow
def test_the_readme_rehearsal_runs_as_printed(tmp_path):
    """Issue 17: the rehearsal as printed failed unless the virtualenv was activated (the job's bare `python` was
    the system's). Run the README's block verbatim in a copy of the checkout, with no virtualenv on PATH, a fresh
    HOME (its own token), and its own network and process namespaces: its fixed ports and its `ray stop` then
    touch nothing else on this machine."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        pytest.skip("needs root, unshare and ip for private network and process namespaces")
    checkout, home = tmp_path / "checkout", tmp_path / "home"
    shutil.copytree(REPO / "raysmol", checkout / "raysmol", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "jobs", checkout / "jobs")
    (checkout / ".venv").symlink_to(REPO / ".venv")
    home.mkdir()
    env = {"HOME": str(home), "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "LANG": "C.UTF-8", "RAY_TMPDIR": str(new_tmpdir())}  # short, private: Ray's sockets live under it
    script = "ip link set lo up\n" + readme_rehearsal()
    out = subprocess.run(["unshare", "--net", "--pid", "--fork", "--mount-proc", "bash", "-euo", "pipefail", "-c",
                          script], cwd=checkout, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S + 120)
    said = out.stdout[-3000:] + out.stderr[-3000:]
    assert out.returncode == 0, said
    assert re.search(r"raysmol: job \S+ SUCCEEDED", out.stderr), said
    assert re.search(r"raysmol: the job runs \S+/\.venv/bin/python\S* -m raysmol \(the head is this machine\)",
                     out.stderr), said
    steps = int(re.search(r"train\.steps=(\d+)", readme_rehearsal()).group(1))
    summary = json.loads((checkout / "runs" / "tiny" / "summary.json").read_text())
    assert summary["steps"] == steps
    assert (checkout / "runs" / "tiny" / "hf" / "model.safetensors").stat().st_size > 0
