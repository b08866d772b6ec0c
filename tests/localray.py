"""Ray clusters that a test owns, kept apart from the pytest session's own `ray_local`.

Each cluster gets its own short RAY_TMPDIR, loopback addresses, free ports and a fresh auth token. Teardown
kills exactly the processes whose environment carries that RAY_TMPDIR: `ray stop` would kill every Ray on
the machine, the session's local Ray included.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LOOPBACK = "127.0.0.1"
_KILL_GRACE_S = 5.0
OWN_TOKEN = "<the head's own token>"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def new_tmpdir() -> Path:
    # Short on purpose: Ray puts unix sockets under it, and their paths may not exceed 107 bytes.
    return Path(tempfile.mkdtemp(prefix="rs-", dir="/tmp"))


def clean_env(tmpdir: Path, token: str | None, multi_node: bool = False, **extra: str) -> dict[str, str]:
    """This process's environment without any RAY_* (the session's Ray sets RAY_AUTH_MODE, a shell may set
    RAY_ADDRESS), plus a private RAY_TMPDIR, loopback addresses, the token, and this checkout first on the path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        RAY_TMPDIR=str(tmpdir),
        # Ray maps 127.0.0.1 to the machine's outward address unless told this is a single-host setup, and a
        # single-host setup refuses `ray start --address`: a cluster that adds nodes that way uses the outward one.
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1" if multi_node else "0",
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        DS_ACCELERATOR="cpu",
        **extra,
    )
    if token is not None:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    return env


def pids_under(tmpdir: Path) -> list[int]:
    """Processes started for the cluster living in `tmpdir` (they inherit RAY_TMPDIR=tmpdir)."""
    marker = f"RAY_TMPDIR={tmpdir}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # gone, or not ours to read
            continue
        if marker in environ:
            found.append(int(entry.name))
    return found


def kill_under(tmpdir: Path) -> None:
    """SIGTERM every process of that cluster, SIGKILL what is left after a grace period."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = pids_under(tmpdir)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + (_KILL_GRACE_S if sig == signal.SIGTERM else 5)
        while pids and time.monotonic() < deadline:
            time.sleep(0.2)
            pids = pids_under(tmpdir)
        if not pids:
            return
    raise RuntimeError(f"processes of the Ray cluster in {tmpdir} survived SIGKILL: {pids_under(tmpdir)}")


@dataclass
class Head:
    """A `ray start --head` on loopback with token authentication."""

    tmpdir: Path
    token: str
    dashboard: str  # http://127.0.0.1:PORT, what `ray job submit --address` takes
    gcs: str = ""  # IP:PORT, what `ray start --address` and a driver's RAY_ADDRESS take
    ip: str = LOOPBACK

    def client_env(self, token: str | None = OWN_TOKEN) -> dict[str, str]:
        """Environment for a client process: the head's token by default, another one, or none (None)."""
        env = clean_env(self.tmpdir, self.token if token == OWN_TOKEN else token, self.ip != LOOPBACK)
        if token is None:
            env["HOME"] = str(self.tmpdir / "home-without-token")  # no ~/.ray/auth_token to fall back on
        return env


def outward_ip() -> str:
    """This machine's address on its network (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))
        return s.getsockname()[0]


def _head_command(tmpdir: Path, num_cpus: int, gcs_port: int, dashboard_port: int, ip: str) -> list[str]:
    ports = {"--port": gcs_port, "--dashboard-port": dashboard_port, "--ray-client-server-port": free_port(),
             "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
             "--metrics-export-port": free_port(), "--runtime-env-agent-port": free_port(),
             "--node-manager-port": free_port(), "--object-manager-port": free_port()}
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address", ip, "--dashboard-host", ip,
           "--temp-dir", str(tmpdir), "--num-cpus", str(num_cpus), "--disable-usage-stats",
           "--min-worker-port", "0", "--max-worker-port", "0"]  # 0: workers take OS-assigned ports
    for flag, port in ports.items():
        cmd += [flag, str(port)]
    return cmd


@contextmanager
def ray_head(num_cpus: int = 4, multi_node: bool = False) -> Iterator[Head]:
    """Start a head (on loopback; on the outward address when other nodes will join it with `ray start`); always
    kill its processes and remove its temp dir afterwards, also on failure."""
    ip = outward_ip() if multi_node else LOOPBACK
    tmpdir = new_tmpdir()
    token = secrets.token_hex(32)
    gcs_port, dashboard_port = free_port(), free_port()
    # Ray's internals (Ray Train's placement-group cleaner, the state API) look for "the" cluster by scanning
    # this machine's processes and take the newest; RAY_ADDRESS, inherited by every process of this head,
    # keeps them on it while other Rays (the pytest session's) run beside it.
    env = clean_env(tmpdir, token, multi_node, RAY_ADDRESS=f"{ip}:{gcs_port}")
    try:
        cmd = _head_command(tmpdir, num_cpus, gcs_port, dashboard_port, ip)
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"ray start --head failed ({out.returncode}):\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
        yield Head(tmpdir, token, f"http://{ip}:{dashboard_port}", f"{ip}:{gcs_port}", ip)
    finally:
        kill_under(tmpdir)
        shutil.rmtree(tmpdir, ignore_errors=True)


@contextmanager
def private_node(head: Head, num_cpus: int, hide: list[Path]) -> Iterator[Path]:
    """A worker node joined to `head` whose processes live in their own mount namespace (Linux, root): each
    folder in `hide` (the driver's cache and temp folders) is an empty private tmpfs there, and its TMPDIR is a
    private one too, as on another machine's disk. Ray's temp folder is in that TMPDIR (its sockets, logs and
    session files are the node's own). Yields that TMPDIR as the host sees it (an empty folder)."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        raise RuntimeError("a node with a private disk needs `unshare` and root (mount namespaces)")
    node_tmp = Path(tempfile.mkdtemp(prefix="rs-node-", dir="/tmp"))
    mounts = [*hide, node_tmp]
    ports = {"--node-manager-port": free_port(), "--object-manager-port": free_port(),
             "--runtime-env-agent-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
             "--dashboard-agent-listen-port": free_port(), "--metrics-export-port": free_port()}
    if head.ip == LOOPBACK:
        raise ValueError("start the head with ray_head(multi_node=True): nodes join it on its outward address")
    start = [str(BIN / "ray"), "start", "--address", head.gcs, "--node-ip-address", head.ip, "--num-cpus",
             str(num_cpus), "--temp-dir", str(node_tmp), "--min-worker-port", "0", "--max-worker-port", "0",
             "--disable-usage-stats", "--block", *[str(x) for kv in ports.items() for x in kv]]
    script = "set -e; " + "; ".join(f"mkdir -p {shlex.quote(str(m))}; mount -t tmpfs -o size=4g tmpfs {shlex.quote(str(m))}"
                                    for m in mounts) + "; exec " + shlex.join(start)
    # Its own Ray temp folder (sockets, logs, session files) inside its private TMPDIR, as on another machine.
    env = clean_env(node_tmp, head.token, True, RAY_ADDRESS=head.gcs, TMPDIR=str(node_tmp))
    log = head.tmpdir / f"{node_tmp.name}.log"
    alive = _alive_nodes(head)
    try:
        # A raylet must register within 30 s (hard-coded in Ray) and first waits for its dashboard agent, a Python
        # process that a loaded 2-core machine may start too slowly: the start is retried.
        for attempt in range(3):
            with open(log, "a") as f:
                proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                                        env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.monotonic() + 90
            while proc.poll() is None and time.monotonic() < deadline and _alive_nodes(head) <= alive:
                time.sleep(1)
            if proc.poll() is None and _alive_nodes(head) > alive:
                break
            kill_under(node_tmp)
            proc.wait(timeout=30)
        else:
            raise RuntimeError(f"the private-disk node did not join in 3 attempts:\n{log.read_text()[-4000:]}")
        yield node_tmp
    finally:
        kill_under(node_tmp)  # every process of the node carries RAY_TMPDIR=node_tmp
        proc.wait(timeout=30)
        shutil.rmtree(node_tmp, ignore_errors=True)


def _alive_nodes(head: Head) -> int:
    """Alive nodes of `head`'s cluster, asked in a child process (this one may have a Ray of its own)."""
    code = "import ray; ray.init(); print('ALIVE', sum(x['Alive'] for x in ray.nodes()))"
    out = subprocess.run([sys.executable, "-c", code], env={**head.client_env(), "RAY_ADDRESS": head.gcs},
                         capture_output=True, text=True, timeout=120)
    lines = [x for x in out.stdout.splitlines() if x.startswith("ALIVE ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"cannot reach the head at {head.gcs}: {out.stderr[-2000:]}")
    return int(lines[-1].split()[1])
