#!/usr/bin/env bash
# The next GPU session's own measurements (after the kit's `tests`, `bench`, `mission`, which now cover
# CuPy's captured step: its CUDA test, the CuPy layer rows and `compare --backend cupy`). Set-up, here:
#   bash ../shared/gpu/prepare.sh && cp records/gpu-next/{next8.sh,first_steps_cuda.py} records/jax-compile-2026-11-27/compile_times.py .gpukit/
# then one `run` with carry [".whl", ".gpukit"], timeout_s 590: `bash .gpukit/next8.sh`.
# 1. GPT-2-small on CUDA: every torch class's first steps (the 30 s target of the first hour) and peak
#    memory (S-AdaGrad's and ASGO's 2 GiB stacks); 2. each method's jax.jit compilation on the reference
#    GPT (the 60 s target; this CPU's figures are in records/jax-compile-2026-11-27/).
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
kit="$PWD/.gpukit"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/versions.txt"
cd /tmp
PYTHONPATH=/tmp/site timeout 300 python3 "$kit/first_steps_cuda.py" all 8 > "$OUT/first_steps_cuda.txt" 2>&1
echo "first steps rc $?"; cat "$OUT/first_steps_cuda.txt" | tail -12
PYTHONPATH=/tmp/site timeout 240 python3 "$kit/compile_times.py" reference > "$OUT/jax_compile_gpu.txt" 2>&1
echo "jax compile rc $?"; tail -11 "$OUT/jax_compile_gpu.txt"
