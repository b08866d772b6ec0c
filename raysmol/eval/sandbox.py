"""Run untrusted generated Python (HumanEval completions, code rewards) in a sandbox.

Every program runs as an unprivileged user with no network (a fresh network namespace: loopback included),
its own PID namespace (a fork bomb or a stray daemon dies with the program), a read-only view of the whole
file system, empty private `/tmp`, `/var/tmp`, `/dev/shm` and `/run` (so nothing other programs leave there,
Ray's session folder included, is visible), a private size-capped work folder, and rlimits on CPU time, address
space, file size, open files and processes, under a wall-clock timeout that kills the whole namespace.

Backends (the first that works is used; `SandboxUnavailable` names what each one lacks):
- ``bwrap``: bubblewrap (``--unshare-all --die-with-parent --clearenv``, ``--ro-bind / /``), started as the
  sandbox user (through ``setpriv`` when we are root), so it needs unprivileged user namespaces;
- ``unshare``: util-linux ``unshare --net --pid --mount --fork --mount-proc`` as root; a small init
  (`_INIT`, below) remounts every mount read-only inside the new mount namespace, mounts a tmpfs work folder
  and drops to the sandbox user before it executes the program;
- ``none``: only when the caller opts out (``allow_unsandboxed=True``): a plain subprocess with the rlimits
  and the timeout, as the calling user, with network and file system open. It says so in a warning.

Root ignores RLIMIT_NPROC, which is why privileges are dropped before the program starts. RLIMIT_NPROC also
counts *all* processes of a uid, so concurrent programs each get their own uid from a pool (65534 = nobody,
then 65533, ...; Debian reserves 65000-65533 for exactly such uses): a fork bomb in one program then cannot
starve the programs running beside it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import queue
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

SANDBOX_PYTHON = "/usr/bin/python3"  # outside /root and any venv, so the unprivileged user can read it
# uid pool: nobody first, then Debian's reserved range below it (see the module docstring).
DEFAULT_UIDS = tuple(range(65534, 65534 - 16, -1))
BACKENDS = ("bwrap", "unshare")
_UNSANDBOXED_WORKERS = 64
Status = Literal["ok", "error", "timeout", "killed"]


class SandboxUnavailable(RuntimeError):
    """No sandbox backend works on this machine; the message says what each one is missing."""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock; the whole namespace is killed when it runs out
    cpu_s: int = 10  # RLIMIT_CPU: SIGXCPU, then SIGKILL
    memory_mb: int = 1024  # RLIMIT_AS (address space, so a bit above the resident size a program needs)
    file_mb: int = 16  # RLIMIT_FSIZE per file; also the size of the tmpfs work folder (sandboxed backends)
    nproc: int = 32  # RLIMIT_NPROC for the program's uid
    nofile: int = 64  # RLIMIT_NOFILE
    output_bytes: int = 64 * 1024  # stdout and stderr are each kept up to this many bytes (the rest is drained)


@dataclass(frozen=True)
class Result:
    status: Status  # ok: exit 0; error: other exit status; killed: ended by a signal; timeout: wall clock ran out
    returncode: int | None  # negative: the signal number that ended it; None: timed out
    stdout: str
    stderr: str
    wall_s: float


# The program's first process. Argument: one JSON object (built in `Sandbox._run`). As root inside fresh
# namespaces (backend "unshare") it makes every mount read-only, mounts the tmpfs work folder and drops
# privileges; in every backend it sets the rlimits, runs the program as its child, reaps every orphan (with
# unshare it is PID 1 of the namespace: when it exits the kernel kills whatever is left) and reports the
# program's raw wait status on a pipe, so a signal death is told apart from `sys.exit(137)`.
_INIT = r"""
import ctypes, json, os, re, resource, sys
s = json.loads(sys.argv[1])
w = s["workdir"]
code = open(os.path.join(w, "main.py"), "rb").read()
if s["isolate"]:
    libc = ctypes.CDLL(None, use_errno=True)
    def mount(src, dst, fstype, flags, data):
        if libc.mount(src, dst, fstype, flags, data) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), os.fsdecode(dst))
    RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND = 1, 2, 4, 8, 32, 4096
    keep = {"nodev": NODEV, "noexec": NOEXEC}
    for line in open("/proc/self/mountinfo", "rb").read().splitlines():
        f = line.split()
        point = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), f[4])  # \040 is a space
        opts = f[5].decode().split(",")
        if "ro" in opts:
            continue
        flags = REMOUNT | BIND | RDONLY | NOSUID
        for o in opts:
            flags |= keep.get(o, 0)
        mount(None, point, None, flags, None)
    # Empty private scratch folders over the host's: world-readable files other programs leave in /tmp, Ray's
    # session folder (/tmp/ray) and shared memory stay out of sight. The work folder (itself under /tmp) is
    # made again inside the new /tmp; its program text was read above.
    for d in (b"/tmp", b"/var/tmp", b"/dev/shm", b"/run"):
        if os.path.isdir(d):
            mount(b"tmpfs", d, b"tmpfs", NOSUID | NODEV, ("size=%dm,mode=1777" % s["file_mb"]).encode())
    os.makedirs(w, exist_ok=True)
    mount(b"tmpfs", os.fsencode(w), b"tmpfs", NOSUID | NODEV,
          ("size=%dm,mode=0700,uid=%d,gid=%d" % (s["file_mb"], s["uid"], s["uid"])).encode())
    with open(os.path.join(w, "main.py"), "wb") as f:
        f.write(code)
    os.chown(os.path.join(w, "main.py"), s["uid"], s["uid"])
status_fd = s["status_fd"]
pid = os.fork()
if pid == 0:
    os.close(status_fd)
    for name, value in s["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (value, value))
    os.chdir(w)
    if s["isolate"]:
        os.setgroups([])
        os.setresgid(s["uid"], s["uid"], s["uid"])
        os.setresuid(s["uid"], s["uid"], s["uid"])
        libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: no setuid binary can give privileges back
    os.execve(s["argv"][0], s["argv"], s["env"])
while True:
    done, status = os.wait()
    if done == pid:
        break
os.write(status_fd, str(status).encode())
"""


@dataclass(frozen=True)
class Backend:
    name: str  # "bwrap", "unshare" or "none"
    python: str  # the interpreter the program runs under

    @property
    def sandboxed(self) -> bool:
        return self.name != "none"


def _missing(name: str, python: str) -> str | None:
    """Why backend `name` cannot work here, or None if its requirements are present."""
    if not os.path.exists(python):
        return f"no {python} (an interpreter the sandbox user can read)"
    if name == "bwrap":
        if not shutil.which("bwrap"):
            return "no `bwrap` on PATH (apt-get install bubblewrap)"
        if os.geteuid() == 0 and not shutil.which("setpriv"):
            return "running as root but no `setpriv` to start bwrap as the sandbox user"
        return None
    if name == "unshare":
        if os.geteuid() != 0:
            return "not root (unshare needs CAP_SYS_ADMIN to make namespaces and drop to the sandbox user)"
        if not shutil.which("unshare"):
            return "no `unshare` on PATH (util-linux)"
        return None
    raise ValueError(f"unknown sandbox backend {name!r}; valid: {', '.join(BACKENDS)}")


@functools.lru_cache(maxsize=None)
def _probe(name: str, python: str) -> str | None:
    """Run one trivial program under backend `name`: None if it ran, else why it did not."""
    why = _missing(name, python)
    if why:
        return why
    r = Sandbox(Limits(timeout_s=30), backend=Backend(name, python)).run("print('ok')")
    if r.status == "ok" and r.stdout.strip() == "ok":
        return None
    return f"a trivial program failed under it ({r.status}, exit {r.returncode}): {r.stderr.strip()[-300:]}"


def find_backend(names: Sequence[str] = BACKENDS, python: str = SANDBOX_PYTHON,
                 allow_unsandboxed: bool = False) -> Backend:
    """The first of `names` that works here; else the opt-out backend, or `SandboxUnavailable`."""
    reasons = {}
    for name in names:
        why = _probe(name, python)
        if why is None:
            return Backend(name, python)
        reasons[name] = why
    detail = "; ".join(f"{n}: {why}" for n, why in reasons.items())
    if not allow_unsandboxed:
        raise SandboxUnavailable(
            f"no sandbox for generated code on this machine ({detail}). Install bubblewrap, or run as root with "
            "util-linux `unshare`, or opt out with allow_unsandboxed=True (--allow-unsandboxed), which runs "
            "untrusted code as this user with network and file system access")
    log.warning("RUNNING GENERATED CODE UNSANDBOXED (allow_unsandboxed): as uid %d, with network and file system "
                "access, only rlimits and a timeout; sandbox backends unavailable: %s", os.geteuid(), detail)
    return Backend("none", sys.executable)


def _rlimits(limits: Limits) -> dict[str, int]:
    mb = 1024 * 1024
    return {"RLIMIT_CPU": limits.cpu_s, "RLIMIT_AS": limits.memory_mb * mb, "RLIMIT_FSIZE": limits.file_mb * mb,
            "RLIMIT_NPROC": limits.nproc, "RLIMIT_NOFILE": limits.nofile, "RLIMIT_CORE": 0}


def _command(backend: Backend, spec: dict, workdir: str) -> list[str]:
    """argv that starts `_INIT` with `spec` under `backend`."""
    init = [backend.python, "-I", "-S", "-c", _INIT, json.dumps(spec)]
    if backend.name == "unshare":
        # --kill-child: if unshare dies (our timeout kills it) its child, PID 1 of the namespace, gets SIGKILL,
        # and with it every process in the namespace.
        return [shutil.which("unshare"), "--net", "--pid", "--ipc", "--uts", "--mount", "--fork", "--mount-proc",
                "--kill-child", "--", *init]
    if backend.name == "bwrap":
        uid = spec["uid"]
        # bwrap must start unprivileged; paths are resolved here (the child's environment has a minimal PATH).
        drop = [shutil.which("setpriv"), f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]
        return [*(drop if os.geteuid() == 0 else []), shutil.which("bwrap"), "--unshare-all", "--die-with-parent",
                "--new-session", "--clearenv",
                "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
                # empty private scratch folders (as the unshare backend's init mounts them), then the work folder:
                # a size-capped tmpfs made inside the new /tmp, with the program bound into it from the host
                *[a for d in ("/tmp", "/var/tmp", "/dev/shm", "/run") if os.path.isdir(d)
                  for a in ("--size", str(spec["file_mb"] * 1024 * 1024), "--tmpfs", d)],
                "--size", str(spec["file_mb"] * 1024 * 1024), "--tmpfs", workdir,
                "--ro-bind", f"{workdir}/main.py", f"{workdir}/main.py", "--chdir", workdir, "--", *init]
    return init


class Sandbox:
    """Runs Python programs under `limits` with a backend found once (`find_backend`)."""

    def __init__(self, limits: Limits = Limits(), *, backend: Backend | None = None,
                 backends: Sequence[str] = BACKENDS, python: str = SANDBOX_PYTHON,
                 allow_unsandboxed: bool = False, uids: Sequence[int] = DEFAULT_UIDS):
        self.limits = limits
        self.backend = backend or find_backend(backends, python, allow_unsandboxed)
        # Unsandboxed programs all run as this user: the pool then only bounds concurrency.
        pool = list(uids) if self.backend.sandboxed else [os.geteuid()] * _UNSANDBOXED_WORKERS
        self._uids: queue.Queue[int] = queue.Queue()
        for uid in pool:
            self._uids.put(uid)
        self.max_workers = len(pool)

    def run(self, code: str, stdin: str | None = None, timeout_s: float | None = None) -> Result:
        uid = self._uids.get()  # blocks while every uid is in use: one live program per uid (RLIMIT_NPROC)
        try:
            return self._run(code, stdin, self.limits.timeout_s if timeout_s is None else timeout_s, uid)
        finally:
            if self.backend.sandboxed:
                _wait_until_gone(uid)
            self._uids.put(uid)

    def run_many(self, programs: Iterable[str], workers: int = 2, timeout_s: float | None = None) -> list[Result]:
        """Run programs concurrently (each is its own process tree); results in input order."""
        workers = max(1, min(workers, self.max_workers))
        with ThreadPoolExecutor(workers, thread_name_prefix="sandbox") as pool:
            return list(pool.map(lambda code: self.run(code, timeout_s=timeout_s), programs))

    def _run(self, code: str, stdin: str | None, timeout_s: float, uid: int) -> Result:
        workdir = tempfile.mkdtemp(prefix="raysmol-sandbox-")
        status_r, status_w = os.pipe()
        try:
            os.chmod(workdir, 0o755)  # bwrap starts as the sandbox user and must read main.py
            Path(workdir, "main.py").write_text(code)
            stdin_path = Path(workdir, ".stdin")
            stdin_path.write_text(stdin or "")
            env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
                   "PYTHONIOENCODING": "utf-8"}
            spec = {"workdir": workdir, "uid": uid, "file_mb": self.limits.file_mb, "status_fd": status_w,
                    "isolate": self.backend.name == "unshare", "rlimits": _rlimits(self.limits), "env": env,
                    "argv": [self.backend.python, "-E", "-s", "-B", "main.py"]}
            start = time.monotonic()
            with open(stdin_path, "rb") as fin:
                proc = subprocess.Popen(_command(self.backend, spec, workdir), stdin=fin, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, pass_fds=(status_w,), start_new_session=True,
                                        env=env, cwd=workdir)
            os.close(status_w)
            status_w = -1
            out, err, timed_out = _collect(proc, start + timeout_s, self.limits.output_bytes)
            wall = time.monotonic() - start
            raw = os.read(status_r, 32)
        finally:
            if status_w >= 0:
                os.close(status_w)
            os.close(status_r)
            shutil.rmtree(workdir, ignore_errors=True)
        return _result(timed_out, raw, proc.returncode, out, err, wall)


def _collect(proc: subprocess.Popen, deadline: float, cap: int) -> tuple[bytes, bytes, bool]:
    """Read stdout/stderr (keeping `cap` bytes of each) until both close or `deadline`; kill the group then."""
    kept = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    timed_out = False
    with selectors.DefaultSelector() as sel:
        for f in kept:
            os.set_blocking(f.fileno(), False)
            sel.register(f, selectors.EVENT_READ)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            for key, _ in sel.select(left):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                buf = kept[key.fileobj]
                buf += chunk[: max(0, cap - len(buf))]  # keep draining past the cap, so the program never blocks
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        timed_out = True
    if timed_out:
        _kill_group(proc)
    proc.stdout.close()
    proc.stderr.close()
    return bytes(kept[proc.stdout]), bytes(kept[proc.stderr]), timed_out


def _wait_until_gone(uid: int, timeout_s: float = 5.0) -> None:
    """Wait until no live process of `uid` is left. The kernel kills a dead namespace's processes
    asynchronously, and until they are gone they count against RLIMIT_NPROC of the next program given this
    uid. A process that has already released its memory (empty cmdline: exiting, or a zombie) cannot fork
    any more and is not waited for: bwrap's PID 1 spends ~2 s there tearing its namespaces down."""
    deadline = time.monotonic() + timeout_s
    while any(_live(p, uid) for p in os.listdir("/proc") if p.isdigit()):
        if time.monotonic() > deadline:
            log.warning("processes of sandbox uid %d still alive %.0f s after their program ended", uid, timeout_s)
            return
        time.sleep(0.01)


def _live(pid: str, uid: int) -> bool:
    try:
        return os.stat(f"/proc/{pid}").st_uid == uid and bool(Path(f"/proc/{pid}/cmdline").read_bytes())
    except (FileNotFoundError, ProcessLookupError):
        return False


def _kill_group(proc: subprocess.Popen) -> None:
    # The session we started: unshare/bwrap and, through --kill-child/--die-with-parent, the whole namespace.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _result(timed_out: bool, raw_status: bytes, returncode: int, out: bytes, err: bytes, wall: float) -> Result:
    text = functools.partial(bytes.decode, encoding="utf-8", errors="replace")
    if timed_out:
        return Result("timeout", None, text(out), text(err), wall)
    if raw_status:  # the init's report of the program's own wait status
        status = int(raw_status)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    else:  # the init itself failed (e.g. a mount refused); its exit status is all there is
        code = returncode
    state: Status = "ok" if code == 0 else "killed" if code < 0 else "error"
    return Result(state, code, text(out), text(err), wall)


def describe(backend: Backend) -> str:
    return "UNSANDBOXED (rlimits and timeout only)" if not backend.sandboxed else f"sandboxed ({backend.name})"


