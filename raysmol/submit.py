"""`raysmol submit`: run a config on a Ray cluster as a job, and follow, inspect or stop jobs.

The job is what `ray job submit --working-dir DIR -- python -m raysmol pretrain CONFIG ...` would make, with
three things `ray job submit` does not do:
- the upload is kept small (no `.git`, `runs/`, caches, virtualenvs) and is measured *before* any network call:
  Ray's dashboard refuses request bodies over 100 MiB, and it only says so after zipping and uploading;
- the config and overrides are validated locally, so a typo fails in a second with exit status 2;
- the auth token (`RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH` or `~/.ray/auth_token`) is sent whatever
  `RAY_AUTH_MODE` says in this shell (Ray's own client sends it only when `RAY_AUTH_MODE=token`).

The entrypoint is `PYTHON -m raysmol`, not the `raysmol` script: it needs only raysmol's dependencies in the
cluster's Python, and always runs the uploaded code (the job's working directory is first on its path). PYTHON is
`--python`, else this interpreter when the cluster's head is this machine (a local rehearsal: the job then runs
with the virtualenv that runs `raysmol submit`, activated or not), else `python` from the head's PATH (where the
cluster configs install raysmol). A job's shell inherits the PATH of whoever ran `ray start`, so a bare `python`
on a local head started as `.venv/bin/ray start` is the system's, without raysmol.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import logging
import os
import re
import secrets
import shlex
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from raysmol import storage
from raysmol.config import Config, load_config
from raysmol.runtime import VERBOSE_ENV, verbose

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

# Never worth shipping to a cluster; gitignore syntax, matched from the working directory (Ray's `excludes`).
DEFAULT_EXCLUDES = (
    ".git/", ".venv/", "venv/", "runs/", "__pycache__/", "*.pyc", "*.egg-info/", ".cache/", ".pytest_cache/",
    ".hypothesis/", ".mypy_cache/", ".ruff_cache/", "build/", "dist/", ".ipynb_checkpoints/",
)
# A zip entry costs a local header (30 B) and a central-directory record (46 B), each with the name; the
# archive ends with a 22 B end-of-central-directory record.
_ZIP_ENTRY_BYTES = 76
_ZIP_END_BYTES = 22
_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
_TOP_PATHS = 5


class SubmitError(Exception):
    """Bad `raysmol submit` input, or a cluster that refuses or cannot be reached; the message says which."""


# ---------------------------------------------------------------- what gets uploaded


def upload_limit() -> int:
    """Bytes Ray accepts for one package: the dashboard's request-body cap (100 MiB) or GCS's message cap."""
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

    return min(ray_constants.DASHBOARD_CLIENT_MAX_SIZE, GCS_STORAGE_MAX_SIZE)


@dataclass
class Upload:
    """The files Ray would zip from `root` (same traversal and ignore rules as Ray), with their sizes."""

    root: Path
    excludes: list[str]
    sizes: dict[str, int] = field(default_factory=dict)  # relative posix path -> bytes

    @property
    def package_bytes(self) -> int:
        # Ray zips with ZIP_STORED (no compression): the package is the files plus per-entry headers.
        return _ZIP_END_BYTES + sum(n + _ZIP_ENTRY_BYTES + 2 * len(p.encode()) for p, n in self.sizes.items())

    def largest(self, k: int = _TOP_PATHS) -> list[tuple[str, int]]:
        """The k largest files and directories (a directory counts everything uploaded below it)."""
        totals: dict[str, int] = {}
        for path, n in self.sizes.items():
            parts = path.split("/")
            for depth in range(1, len(parts) + 1):
                key = "/".join(parts[:depth]) + ("/" if depth < len(parts) else "")
                totals[key] = totals.get(key, 0) + n
        return heapq.nlargest(k, totals.items(), key=lambda kv: (kv[1], -len(kv[0])))


def scan_upload(root: Path, excludes: list[str]) -> Upload:
    """Walk `root` exactly as Ray does before zipping it: Ray's own traversal with `excludes` plus every
    .gitignore/.rayignore on the way (unless RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1), so the estimate is the upload."""
    # Private, but the only way to apply Ray's rules rather than a copy of them; ray is pinned in pyproject.
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    upload = Upload(root.resolve(), list(excludes))
    include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"

    def visit(path: Path) -> None:
        if path.is_file():
            upload.sizes[path.relative_to(upload.root).as_posix()] = path.stat().st_size

    quiet = logging.getLogger("raysmol.submit.scan")
    quiet.setLevel(logging.WARNING)  # Ray logs every ignore file it reads at INFO
    _dir_travel(upload.root, [_get_excludes(upload.root, upload.excludes)], visit,
                include_gitignore=include_gitignore, logger=quiet)
    return upload


def check_upload(upload: Upload, limit: int) -> None:
    """Refuse an upload Ray would refuse, naming what makes it large."""
    size = upload.package_bytes
    if size < limit:
        return
    lines = "\n".join(f"  {_human(n):>10}  {p}" for p, n in upload.largest())
    raise SubmitError(
        f"working directory {upload.root} would upload {_human(size)}, over Ray's {_human(limit)} limit for a "
        f"job package. Largest paths:\n{lines}\nExclude them (--exclude PATTERN, gitignore syntax, or a "
        f".gitignore/.rayignore entry), or put data on storage the cluster reads (s3://, gs://).")


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- the job


@dataclass
class JobSpec:
    args: list[str]  # what follows `PYTHON -m raysmol`
    runtime_env: dict
    submission_id: str
    metadata: dict[str, str]
    python: str = "python"

    @property
    def entrypoint(self) -> str:
        return shlex.join([self.python, "-m", "raysmol", *self.args])


def build_job(config: str, overrides: list[str], working_dir: Path, excludes: list[str]) -> tuple[JobSpec, Config]:
    """Validate CONFIG and overrides here, and describe the job that runs them on the cluster."""
    root = working_dir.resolve()
    if not root.is_dir():
        raise SubmitError(f"--working-dir {working_dir}: not a directory")
    cfg = load_config(config, overrides)  # ConfigError (exit 2) before anything leaves this machine
    rel = _inside(Path(config).resolve(), root, config)
    _check_output_dir(cfg)
    runtime_env: dict = {"working_dir": str(root), "excludes": list(excludes)}
    if verbose():  # `raysmol --verbose submit ...`: the job's console shows everything too
        runtime_env["env_vars"] = {VERBOSE_ENV: "1"}
    package = Path(__file__).resolve().parent
    if not (root / "raysmol" / "__init__.py").is_file():
        # Submitting from outside a raysmol checkout: ship this raysmol too, so the cluster runs this version.
        runtime_env["py_modules"] = [str(package)]
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    sid = re.sub(r"[^A-Za-z0-9_-]", "-", f"raysmol-{cfg.run.name}-{stamp}")
    meta = {"raysmol_config": rel, "raysmol_run": cfg.run.name, "raysmol_overrides": " ".join(overrides)}
    return JobSpec(["pretrain", rel, *overrides], runtime_env, sid, meta), cfg


def _inside(path: Path, root: Path, given: str) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        raise SubmitError(f"config {given} is outside the working directory {root}: the cluster only sees "
                          f"files under it (move the config there or pass --working-dir)") from None


def _check_output_dir(cfg: Config) -> None:
    out = cfg.run.output_dir
    if not storage.is_remote(out) and not os.path.isabs(os.path.expanduser(out)):
        raise SubmitError(
            f"{cfg.origin}: run.output_dir={out!r} is a relative path: in a job it would resolve inside Ray's "
            f"temporary copy of the working directory and vanish with it. Use storage every node reaches "
            f"(run.output_dir=s3://BUCKET/runs, gs://..., or an absolute path on a shared filesystem).")


# ---------------------------------------------------------------- talking to the cluster


def auth_token() -> str | None:
    """The token Ray itself would use, in Ray's order: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as e:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read the token ({e.strerror})") from None
        if not token:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path}: the file is empty")
        return token
    default = Path.home() / ".ray" / "auth_token"
    if not default.is_file():
        return None  # the cluster may run without authentication; if not, it says so and _call explains
    return default.read_text().strip() or None


def connect(address: str | None) -> JobSubmissionClient:
    """A JobSubmissionClient for the dashboard at `address` (or RAY_ADDRESS), carrying the auth token."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SubmitError("no cluster: pass --address http://HEAD:8265 (the Ray dashboard URL) or set RAY_ADDRESS")
    if not re.match(r"^https?://", address):
        raise SubmitError(f"--address {address}: expected the dashboard URL, e.g. http://127.0.0.1:8265 "
                          f"(through an SSH tunnel: `ray dashboard cluster/aws.yaml`)")
    from ray.job_submission import JobSubmissionClient

    headers = _auth_headers()
    return _call(address, lambda: JobSubmissionClient(address, headers=headers))


def _auth_headers() -> dict[str, str] | None:
    token = auth_token()
    # X-Ray-Authorization too: Ray reads it when a proxy in between (kubectl proxy, an API gateway) consumes
    # the Authorization header for its own authentication.
    return {"Authorization": f"Bearer {token}", "X-Ray-Authorization": f"Bearer {token}"} if token else None


def head_is_here(address: str) -> bool:
    """Whether the cluster's head node is this machine: its IP, from Ray's state API, is one this machine owns.

    Asked of the cluster, not read from the URL: `ray dashboard cluster/aws.yaml` serves a remote head on
    http://127.0.0.1:8265 through an SSH tunnel. Any doubt (an old Ray, a proxy that hides the API) means no."""
    import json
    import urllib.request

    req = urllib.request.Request(f"{address.rstrip('/')}/api/v0/nodes?limit=1000&detail=false",
                                 headers=_auth_headers() or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            nodes = json.load(r)["data"]["result"]["result"]
        ip = next(n["node_ip"] for n in nodes if n.get("is_head_node"))
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((ip, 0))  # succeeds only for an address of one of this machine's interfaces
        return True
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        return False


def _call(address: str, fn):
    """Run a request, turning Ray's connection, authentication and HTTP errors into a SubmitError."""
    from ray.exceptions import AuthenticationError

    try:
        return fn()
    except AuthenticationError as e:
        raise SubmitError(f"{address} refused the request ({str(e).splitlines()[0]}); set RAY_AUTH_TOKEN (or "
                          f"~/.ray/auth_token) to the cluster's token (`ray get-auth-token` on the head)") from None
    except ConnectionError as e:
        raise SubmitError(f"cannot reach the Ray dashboard at {address} ({e}); is the cluster up and the SSH "
                          f"tunnel open?") from None
    except RuntimeError as e:
        raise SubmitError(f"{address}: {e}") from None


def follow(client: JobSubmissionClient, job_id: str, address: str) -> str:
    """Print the job's logs as they come; return its final status once it reaches one."""
    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            print(chunk, end="", flush=True)

    _call(address, lambda: asyncio.run(tail()))
    while (status := str(_call(address, lambda: client.get_job_status(job_id)).value)) not in _TERMINAL:
        time.sleep(1)  # the log stream can close a moment before the status is final
    return status


# ---------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=None, help="YAML config, inside the working directory")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config values (parsed as YAML)")
    p.add_argument("--address", help="the Ray dashboard URL, e.g. http://127.0.0.1:8265 (default: $RAY_ADDRESS)")
    p.add_argument("--working-dir", default=".", type=Path, help="directory uploaded with the job (default: .)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="also leave out paths matching PATTERN (gitignore syntax); repeatable")
    p.add_argument("--follow", action="store_true", help="stream the job's logs and exit with its final status")
    p.add_argument("--python", metavar="PATH",
                   help="the interpreter the job runs on the head (default: this one when the head is this "
                        "machine, else `python` from the head's PATH)")
    act = p.add_mutually_exclusive_group()
    act.add_argument("--status", metavar="JOB", help="print a job's status and message")
    act.add_argument("--logs", metavar="JOB", help="print a job's logs so far")
    act.add_argument("--stop", metavar="JOB", help="stop a running job")


def main(args: argparse.Namespace) -> int:
    job = args.status or args.logs or args.stop
    if job and (args.config or args.follow or args.python):
        raise SubmitError("give either CONFIG (to submit) or one of --status/--logs/--stop JOB, not both")
    if not job and not args.config:
        raise SubmitError("nothing to do: give CONFIG to submit, or --status/--logs/--stop JOB")
    return _inspect(args, job) if job else _submit(args)


def _submit(args: argparse.Namespace) -> int:
    spec, cfg = build_job(args.config, list(args.overrides), args.working_dir, [*DEFAULT_EXCLUDES, *args.exclude])
    check_upload(scan_upload(Path(spec.runtime_env["working_dir"]), spec.runtime_env["excludes"]), upload_limit())
    client = connect(args.address)
    address = client.get_address()
    if args.python:
        spec.python, why = args.python, "--python"
    elif head_is_here(address):
        spec.python, why = sys.executable, "the head is this machine"
    else:
        spec.python, why = "python", "from the head's PATH; --python to choose"
    print(f"raysmol: the job runs {spec.python} -m raysmol ({why})", file=sys.stderr)
    job_id = _call(address, lambda: client.submit_job(entrypoint=spec.entrypoint, runtime_env=spec.runtime_env,
                                                      submission_id=spec.submission_id, metadata=spec.metadata))
    print(job_id, flush=True)
    print(f"raysmol: submitted {job_id} (run {cfg.run.name!r}) to {address}; follow with "
          f"`raysmol submit --logs {job_id}`", file=sys.stderr)
    if not args.follow:
        return 0
    try:
        status = follow(client, job_id, address)
    except KeyboardInterrupt:
        print(f"\nraysmol: stopped following; {job_id} keeps running (`raysmol submit --stop {job_id}`)",
              file=sys.stderr)
        return 130
    print(f"raysmol: job {job_id} {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def _inspect(args: argparse.Namespace, job: str) -> int:
    client = connect(args.address)
    address = client.get_address()
    if args.logs:
        print(_call(address, lambda: client.get_job_logs(job)), end="")
    elif args.stop:
        stopped = _call(address, lambda: client.stop_job(job))
        print(f"{job}: {'stop requested' if stopped else 'already finished'}")
    else:
        info = _call(address, lambda: client.get_job_info(job))
        print(f"{job}: {info.status.value}" + (f" ({info.message})" if info.message else ""))
    return 0
