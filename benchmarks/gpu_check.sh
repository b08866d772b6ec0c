#!/usr/bin/env bash
# Issue 8's GPU measurement in one command: the 1B baseline shape (jobs/smollm3_1b_baseline.yaml, sequence 4096)
# through raysmol's DeepSpeed step and through a plain PyTorch + SDPA loop on the same GPU(s), as JSON.
#
#   benchmarks/gpu_check.sh fetch   # once, on a machine that reaches PyPI (a developer's checkout): wheels -> .whl/
#   benchmarks/gpu_check.sh         # on the GPU machine (offline): install .whl/ into /tmp/site, run, print JSON
#
# The GPU image is expected to have Python 3.12 with a CUDA PyTorch (>= 2.9, for torch.nn.attention.varlen),
# numpy, pyyaml, pyarrow, tokenizers and huggingface-hub; `fetch` brings the rest (transformers as tested here,
# DeepSpeed and the small packages it needs). From a session with the device tool:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
# Results land in $OUT (or ./gpu_check_out): result.json, log.txt, and a gzipped profiler trace of one step.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-run}" = fetch ]; then
  set -e
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
  plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  python3 -m pip download --no-deps "${plat[@]}" -d .whl transformers==5.19.0 hjson pydantic==2.14.4 pydantic-core==2.50.5 \
    annotated-types typing-inspection typing-extensions liger-kernel==0.8.5
  # DeepSpeed ships as a source archive only; it is installed there without building any op (DS_BUILD_OPS=0).
  python3 -m pip download --no-deps --no-binary=:all: -d .whl deepspeed==0.19.8
  du -sh .whl && ls .whl
  exit 0
fi

OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site \
  .whl/deepspeed-*.tar.gz || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'deepspeed', deepspeed.__version__, 'gpus', torch.cuda.device_count())" || exit 1

bench() {  # $1: label, $2: result file; the rest: extra arguments. One profiler step only: the trace must stay small.
  local label=$1 result=$2; shift 2
  timeout 300 python3 benchmarks/gpu_throughput.py --json --profile "$OUT/prof_$label" --profile-steps 1 "$@" \
    > "$OUT/stdout_$label.txt" && tail -n 1 "$OUT/stdout_$label.txt" > "$OUT/$result"
}
# The default GPU path (attention auto: flash-attn if installed, else PyTorch's varlen kernel); if that fails,
# the same measurement with SDPA so the session still gets numbers (and the log says why the first one failed).
bench default result.json || { echo "default path failed; measuring again with model.attn_implementation=sdpa";
                              bench sdpa result.json model.attn_implementation=sdpa; }
# The same shape with Liger's fused kernels (RMSNorm, SwiGLU, RoPE, linear cross-entropy): train.liger=true.
bench liger result_liger.json train.liger=true || echo "the liger run failed (see stdout_liger.txt)"
for d in "$OUT"/prof_*; do
  [ -d "$d" ] && for f in "$d"/*.json; do gzip -c "$f" > "$OUT/$(basename "$d")_$(basename "$f").gz"; done
  rm -rf "$d"
done
for r in "$OUT"/result*.json; do [ -f "$r" ] && cat "$r"; done
