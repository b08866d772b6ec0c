"""The code sandbox: every probe is contained, and each probe is shown to work outside the sandbox
(through the opt-out backend, a plain subprocess), so a containment check cannot pass by accident."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import pytest

from raysmol.eval import sandbox as sb
from raysmol.eval.sandbox import Backend, Limits, Sandbox, SandboxUnavailable, find_backend

FAST = Limits(timeout_s=5, cpu_s=5)


def _usable(name: str) -> bool:
    return sb._probe(name, sb.SANDBOX_PYTHON) is None


@pytest.fixture(scope="module", params=sb.BACKENDS)
def box(request) -> Sandbox:
    if not _usable(request.param):
        pytest.skip(f"backend {request.param}: {sb._probe(request.param, sb.SANDBOX_PYTHON)}")
    return Sandbox(FAST, backend=Backend(request.param, sb.SANDBOX_PYTHON))


@pytest.fixture(scope="module")
def plain() -> Sandbox:
    """The opt-out backend: what the same probe does with no sandbox around it."""
    return Sandbox(FAST, backend=Backend("none", sys.executable))


def _host_dir() -> str:
    """A folder outside the scratch folders the sandbox makes private (pytest's tmp_path sits in a root-only
    folder under /tmp, and the sandbox's /tmp is its own), where everyone may enter."""
    for d in ("/srv", "/opt", "/var/lib", str(Path.home())):
        if os.path.isdir(d) and os.access(d, os.W_OK):
            return d
    pytest.skip("no writable folder outside /tmp for host files")


@pytest.fixture
def open_dir():
    """A folder that everyone may enter, outside /tmp."""
    d = Path(tempfile.mkdtemp(prefix="raysmol-sbx-test-", dir=_host_dir()))
    d.chmod(0o755)
    yield d
    for p in sorted(d.rglob("*"), reverse=True):
        p.unlink() if not p.is_dir() else p.rmdir()
    d.rmdir()


def test_ordinary_code_runs(box):
    r = box.run("import os, sys\nprint('hello', input())\nopen('scratch.txt', 'w').write('x')\n"
                "print(os.getcwd())\nprint(os.getuid())\nprint('to stderr', file=sys.stderr)", stdin="world\n")
    assert r.status == "ok" and r.returncode == 0, r
    hello, workdir, uid = r.stdout.split("\n")[:3]
    assert hello == "hello world" and r.stderr == "to stderr\n"
    assert int(uid) in sb.DEFAULT_UIDS  # not root
    assert not Path(workdir).exists()  # the private work folder is gone afterwards
    assert box.run("import sys; sys.exit(3)").returncode == 3
    assert box.run("import sys; sys.exit(3)").status == "error"
    r = box.run("import os, signal; os.kill(os.getpid(), signal.SIGTERM)")
    assert (r.status, r.returncode) == ("killed", -15)


def test_network_and_loopback_unreachable(box, plain):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.settimeout(0.5)
        port = server.getsockname()[1]
        probe = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')"
        assert plain.run(probe).stdout == "connected\n"  # the probe works outside the sandbox
        server.accept()[0].close()
        r = box.run(probe)
        assert r.status == "error" and "connected" not in r.stdout
        assert "Network is unreachable" in r.stderr or "Connection refused" in r.stderr, r.stderr
        with pytest.raises(TimeoutError):
            server.accept()  # nothing from the sandbox ever arrived


@pytest.mark.skipif(os.geteuid() != 0, reason="reading root-only files outside the sandbox needs root")
def test_root_only_files_unreadable(box, plain, open_dir):
    secret = open_dir / "secret.txt"
    secret.write_text("s3cr3t")
    secret.chmod(0o600)
    for path in (secret, Path("/etc/shadow")):
        probe = f"print(open({str(path)!r}).read()[:6])"
        assert plain.run(probe).status == "ok"
        r = box.run(probe)
        assert r.status == "error" and "PermissionError" in r.stderr, r.stderr
    assert "s3cr3t" not in box.run(f"print(open({str(secret)!r}).read())").stdout


def test_no_writes_outside_the_work_folder(box, plain, open_dir):
    # World-writable, so only the read-only view (not file permissions) can stop the write.
    open_dir.chmod(0o777)
    target = open_dir / "planted.txt"
    probe = f"open({str(target)!r}, 'w').write('x')"
    assert plain.run(probe).status == "ok" and target.exists()
    target.unlink()
    r = box.run(probe)
    assert r.status == "error" and "Read-only file system" in r.stderr, r.stderr
    assert not target.exists()
    for path in ("/dev/shm/planted", "/var/tmp/planted"):  # bwrap gives a private /dev/shm: allowed, unseen
        box.run(f"open({path!r}, 'w').write('x')")
        assert not Path(path).exists()


def test_scratch_folders_are_private_and_empty(box, plain, tmp_path_factory):
    """World-readable files in the host's /tmp (and Ray's session folder there) are not visible; /tmp, /var/tmp,
    /dev/shm and /run are empty and writable, and what is written there never reaches the host."""
    planted = Path(tempfile.mkdtemp(prefix="raysmol-sbx-planted-", dir="/tmp"))
    try:
        planted.chmod(0o755)
        (planted / "notes.txt").write_text("host secret")
        (planted / "notes.txt").chmod(0o644)
        probe = (f"import os\nprint(open({str(planted / 'notes.txt')!r}).read())\n")
        assert plain.run(probe).stdout == "host secret\n"  # the probe works outside the sandbox
        r = box.run(probe)
        assert r.status == "error" and "FileNotFoundError" in r.stderr, r.stderr
        listing = box.run("import os, json\nprint(json.dumps({d: sorted(os.listdir(d)) for d in "
                          "('/tmp', '/var/tmp', '/dev/shm', '/run') if os.path.isdir(d)}))")
        seen = json.loads(listing.stdout)
        # /tmp holds the program's own work folder and nothing of the host's (planted files, /tmp/ray, ...)
        assert len(seen["/tmp"]) == 1 and seen["/tmp"][0].startswith("raysmol-sandbox-"), seen
        assert all(v == [] for k, v in seen.items() if k != "/tmp"), seen
        assert len(os.listdir("/tmp")) > 1  # the host's /tmp is not empty: there was something to hide
        w = box.run("open('/tmp/x', 'w').write('y'); open('/dev/shm/x', 'w').write('y'); print('wrote')")
        assert w.stdout == "wrote\n", w.stderr
        assert not Path("/tmp/x").exists() and not Path("/dev/shm/x").exists()
    finally:
        for p in sorted(planted.rglob("*"), reverse=True):
            p.unlink()
        planted.rmdir()


def test_work_folder_is_size_capped(box):
    r = box.run("open('big', 'wb').write(b'x' * (64 * 1024 * 1024))", timeout_s=20)
    assert r.status in ("error", "killed"), r  # ENOSPC on the tmpfs or SIGXFSZ from RLIMIT_FSIZE


def test_fork_bomb_is_contained(box):
    uid = 65500  # its own uid, so that leftover processes would be visible below
    one = Sandbox(Limits(timeout_s=2, cpu_s=2), backend=box.backend, uids=[uid])
    start = time.monotonic()
    r = one.run("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass")
    assert r.status in ("timeout", "killed", "error") and time.monotonic() - start < 10
    left = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _is_live(p, uid)]
    assert left == []  # the whole namespace died before run() returned
    assert one.run("print('after')").stdout == "after\n"


def _is_live(proc: Path, uid: int) -> bool:
    """A process of `uid` that still has its memory (an exiting one or a zombie cannot fork)."""
    try:
        return proc.stat().st_uid == uid and bool((proc / "cmdline").read_bytes())
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_fork_bomb_does_not_starve_programs_beside_it(box):
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    results = box.run_many([bomb, *[f"print({i})" for i in range(6)]], workers=2, timeout_s=3)
    assert results[0].status != "ok"
    assert [r.stdout for r in results[1:]] == [f"{i}\n" for i in range(6)]


def test_memory_bomb_fails_cleanly(box):
    small = Sandbox(Limits(timeout_s=5, memory_mb=256), backend=box.backend)
    assert small.run("x = bytearray(50 * 1024 * 1024); print(len(x))").status == "ok"
    r = small.run("x = bytearray(1024 * 1024 * 1024)")
    assert r.status == "error" and "MemoryError" in r.stderr


def test_cpu_limit_and_wall_timeout(box):
    start = time.monotonic()
    r = Sandbox(Limits(timeout_s=20, cpu_s=1), backend=box.backend).run("while True: pass")
    assert r.status == "killed" and time.monotonic() - start < 10  # RLIMIT_CPU, well before the wall clock
    r = box.run("import time; time.sleep(60)", timeout_s=1)  # sleeping costs no CPU: the wall clock ends it
    assert r.status == "timeout" and r.returncode is None and r.wall_s < 5


def test_killing_its_parent_harms_nobody(box):
    probes = ["import os; os.kill(os.getppid(), 9)", "import os; os.kill(-1, 9)", "import os; os.killpg(0, 9)",
              "import os, signal; os.kill(1, signal.SIGKILL)"]
    results = box.run_many([*probes, "print('still here')"], workers=2)
    assert all(r.status != "ok" or r.stdout == "" for r in results[:-1])
    assert results[-1].stdout == "still here\n"  # the pool (and this test process) carried on


def test_output_is_truncated(box):
    r = box.run("import sys\nfor _ in range(2000): sys.stdout.write('y' * 10000)")
    assert r.status == "ok" and len(r.stdout) == FAST.output_bytes


def test_run_many_keeps_order_and_is_fast(box):
    start = time.monotonic()
    results = box.run_many([f"print({i} * {i})" for i in range(24)], workers=2)
    assert [r.stdout for r in results] == [f"{i * i}\n" for i in range(24)]
    assert time.monotonic() - start < 20  # ~35 ms a program on 2 idle cores; generous for a shared machine


def test_refuses_when_no_backend_works(monkeypatch):
    with pytest.raises(SandboxUnavailable, match="/nonexistent/python3"):
        find_backend(python="/nonexistent/python3")
    sb._probe.cache_clear()
    monkeypatch.setattr(sb.shutil, "which", lambda name: None)
    monkeypatch.setattr(sb.os, "geteuid", lambda: 1000)
    try:
        with pytest.raises(SandboxUnavailable) as e:
            Sandbox()
    finally:
        sb._probe.cache_clear()
    assert "bwrap" in str(e.value) and "not root" in str(e.value) and "allow_unsandboxed" in str(e.value)


def test_opt_out_runs_unsandboxed_and_says_so(caplog, open_dir):
    with caplog.at_level(logging.WARNING, logger="raysmol.eval.sandbox"):
        box = Sandbox(FAST, python="/nonexistent/python3", allow_unsandboxed=True)
    assert box.backend.name == "none" and "UNSANDBOXED" in caplog.text
    r = box.run("import os; print(os.geteuid())")
    assert r.status == "ok" and int(r.stdout) == os.geteuid()
    assert box.run("import time; time.sleep(60)", timeout_s=1).status == "timeout"  # limits still hold
    assert box.run("x = bytearray(4 * 1024 ** 3)").status == "error"
