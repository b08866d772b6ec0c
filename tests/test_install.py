"""`pip install .` into a fresh virtualenv, then `raysmol config` and `raysmol pretrain` from another folder.

Installing torch, Ray and DeepSpeed again would take many minutes, so the fresh virtualenv borrows the
dependencies from the test's own environment: a .pth file lists that environment's site-packages as a plain
path entry. Python does not run the .pth files inside a plain path entry, so the checkout's editable install
(a .pth-activated finder there) stays invisible, and raysmol is the wheel pip installed into the fresh virtualenv
(the test checks `raysmol.__file__`). Everything runs from a folder outside the checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def run(args: list, cwd: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    out = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{args} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
    return out


def source_tree(dst: Path) -> Path:
    """What `pip install .` reads from the checkout (copied, so the build leaves nothing in the checkout)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "raysmol", dst / "raysmol", symlinks=True, ignore=ignore)
    (dst / "jobs").mkdir(parents=True)
    shutil.copy(REPO / "jobs" / "tiny.yaml", dst / "jobs" / "tiny.yaml")  # the target of raysmol/jobs/tiny.yaml
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, dst / name)
    return dst


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python of a fresh virtualenv with the raysmol wheel installed, a working folder, the environment)."""
    tmp = tmp_path_factory.mktemp("install")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS", "VIRTUAL_ENV")}
    src = source_tree(tmp / "src")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "wheels", src],
        tmp, env)
    wheel, = (tmp / "wheels").glob("raysmol-*.whl")
    with zipfile.ZipFile(wheel) as z:
        assert z.getinfo("raysmol/jobs/tiny.yaml").file_size > 0  # a file, not a link to outside the package
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], tmp, env)
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel], tmp, env)
    # Only now borrow the dependencies (pip above saw the fresh environment alone).
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp, env).stdout.strip())
    (site / "zz_raysmol_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = tmp / "elsewhere"
    work.mkdir()
    where = run([python, "-c", "import raysmol, torch, ray; print(raysmol.__file__)"], work, env).stdout.strip()
    assert Path(where).is_relative_to(site) and not Path(where).is_relative_to(REPO), where
    return python, work, env


def test_the_installed_package_prints_the_default_job_from_another_folder(installed):
    python, work, env = installed
    info = json.loads(run([python, "-m", "raysmol", "config", "--json"], work, env).stdout)
    assert info["config"]["run"]["name"] == "tiny" and info["parameters"] == 1_540_736
    script = python.parent / "raysmol"  # the console script pip installed
    assert json.loads(run([script, "config", "--json"], work, env).stdout) == info


def test_the_installed_package_pretrains_the_default_job_from_another_folder(installed):
    python, work, env = installed
    started = time.monotonic()
    out = run([python.parent / "raysmol", "pretrain", "train.steps=4", "train.checkpoint_every=2",
               "optim.warmup_steps=1", f"run.output_dir={work / 'runs'}", f"data.cache_dir={work / 'cache'}",
               "--verbose"], work, env, timeout=900)
    print(f"pretrain took {time.monotonic() - started:.0f} s")
    # --verbose: the workers' output reaches the console too (quiet by default: tests/test_cli.py)
    said = out.stdout + out.stderr
    assert "(RayTrainWorker pid=" in said and "Setting up process group" in said, said[-3000:]
    summary = json.loads((work / "runs" / "tiny" / "summary.json").read_text())
    assert summary["steps"] == 4
