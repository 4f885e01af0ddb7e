#!/usr/bin/env bash
# The next GPU session's commands (docs/performance.md, "On a GPU: the sixth run"). Set-up, here:
#   bash ../shared/gpu/prepare.sh && cp docs/data/gpu-next/{next.sh,overhead.py} .gpukit/
# then `run` with carry [".whl", ".gpukit"], timeout_s 590, twice:
#   bash .gpukit/next.sh if_shampoo     (IF-Shampoo with CUDA graphs, parameters and state static)
#   bash .gpukit/next.sh asgo           (the same for ASGO, then its eager step for comparison)
# Each writes a few small files under $OUT (a bench --out folder holds too many files to come back).
export PYTHONUNBUFFERED=1
method=${1:?method}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/versions.txt"
cd /tmp
TORCH_LOGS=perf_hints PYTHONPATH=/tmp/site timeout 480 python3 "$OLDPWD"/.gpukit/overhead.py $method reference cuda reduce-overhead static \
  > "$OUT/${method}_reduce_overhead.txt" 2>&1
echo "reduce-overhead rc $?"; grep -v "^\s*$" "$OUT/${method}_reduce_overhead.txt" | grep -i "x AdamW\|skipping cudagraphs\|Error" | head -20
if [ "$method" = asgo ]; then
  PYTHONPATH=/tmp/site timeout 60 python3 "$OLDPWD"/.gpukit/overhead.py asgo reference cuda eager > "$OUT/asgo_eager.txt" 2>&1
  echo "eager rc $?"; tail -1 "$OUT/asgo_eager.txt"
fi
