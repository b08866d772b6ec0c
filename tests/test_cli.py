"""The README's first command, for real: `raysmol pretrain` with no config, in a fresh working directory."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest


@pytest.mark.slow
def test_default_pretrain_trains_the_embedded_tiny_model(tmp_path):
    raysmol = [sys.executable, "-m", "raysmol"]
    start = time.time()
    out = subprocess.run([*raysmol, "pretrain"], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    took = time.time() - start
    run = tmp_path / "runs" / "tiny"
    summary = json.loads((run / "summary.json").read_text())
    printed, _ = json.JSONDecoder().raw_decode(out.stdout, out.stdout.index('{\n "run"'))
    assert printed == summary  # the summary is printed too
    # The bar: the final evaluation loss at least 40% below the initial one, in under 5 minutes.
    assert summary["final_val_loss"] <= 0.6 * summary["initial_val_loss"], summary
    assert took < 300, f"took {took:.0f} s"
    assert (run / "hf" / "model.safetensors").exists() and (run / "hf" / "tokenizer.json").exists()
    assert (run / "plots" / "loss.png").exists()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == summary["steps"]
