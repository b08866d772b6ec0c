"""Ray clusters that a test owns, kept apart from the pytest session's own `ray_local`.

Each cluster gets its own short RAY_TMPDIR, loopback addresses, free ports and a fresh auth token. Teardown
kills exactly the processes whose environment carries that RAY_TMPDIR: `ray stop` would kill every Ray on
the machine, the session's local Ray included.
"""

from __future__ import annotations

import os
import secrets
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


def clean_env(tmpdir: Path, token: str | None, **extra: str) -> dict[str, str]:
    """This process's environment without any RAY_* (the session's Ray sets RAY_AUTH_MODE, a shell may set
    RAY_ADDRESS), plus a private RAY_TMPDIR, loopback addresses, the token, and this checkout first on the path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        RAY_TMPDIR=str(tmpdir),
        # Ray maps 127.0.0.1 to the machine's outward address unless told this is a single-host setup.
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
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

    def client_env(self, token: str | None = OWN_TOKEN) -> dict[str, str]:
        """Environment for a client process: the head's token by default, another one, or none (None)."""
        env = clean_env(self.tmpdir, self.token if token == OWN_TOKEN else token)
        if token is None:
            env["HOME"] = str(self.tmpdir / "home-without-token")  # no ~/.ray/auth_token to fall back on
        return env


def _head_command(tmpdir: Path, num_cpus: int, gcs_port: int, dashboard_port: int) -> list[str]:
    ports = {"--port": gcs_port, "--dashboard-port": dashboard_port, "--ray-client-server-port": free_port(),
             "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
             "--metrics-export-port": free_port(), "--runtime-env-agent-port": free_port(),
             "--node-manager-port": free_port(), "--object-manager-port": free_port()}
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address", LOOPBACK, "--dashboard-host", LOOPBACK,
           "--temp-dir", str(tmpdir), "--num-cpus", str(num_cpus), "--disable-usage-stats",
           "--min-worker-port", "0", "--max-worker-port", "0"]  # 0: workers take OS-assigned ports
    for flag, port in ports.items():
        cmd += [flag, str(port)]
    return cmd


@contextmanager
def ray_head(num_cpus: int = 4) -> Iterator[Head]:
    """Start a head; always kill its processes and remove its temp dir afterwards, also on failure."""
    tmpdir = new_tmpdir()
    token = secrets.token_hex(32)
    gcs_port, dashboard_port = free_port(), free_port()
    # Ray's internals (Ray Train's placement-group cleaner, the state API) look for "the" cluster by scanning
    # this machine's processes and take the newest; RAY_ADDRESS, inherited by every process of this head,
    # keeps them on it while other Rays (the pytest session's) run beside it.
    env = clean_env(tmpdir, token, RAY_ADDRESS=f"{LOOPBACK}:{gcs_port}")
    try:
        cmd = _head_command(tmpdir, num_cpus, gcs_port, dashboard_port)
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"ray start --head failed ({out.returncode}):\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
        yield Head(tmpdir, token, f"http://{LOOPBACK}:{dashboard_port}")
    finally:
        kill_under(tmpdir)
        shutil.rmtree(tmpdir, ignore_errors=True)
