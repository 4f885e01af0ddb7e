#!/usr/bin/env bash
# The next GPU session's commands (docs/performance.md, "On a GPU: the sixth run"). Set-up, here:
#   bash ../shared/gpu/prepare.sh && cp records/gpu-next/{next.sh,overhead.py} .gpukit/
# then `run` with carry [".whl", ".gpukit"], timeout_s 590, once per line:
#   bash .gpukit/next.sh if_shampoo                               (about 8 minutes: 2 graphs)
#   OV='{"root_tolerance": Infinity}' bash .gpukit/next.sh asgo   (about 3 minutes)
#   MODE=combo bash .gpukit/next.sh if_shampoo                    (if time is left: fewer launches
#                                                                  without CUDA graphs)
# IF-Shampoo, then ASGO without its checked root's torch.cond (with it, Inductor skipped CUDA graphs
# in the sixth run), each compiled with mode="reduce-overhead", parameters and state static, the
# reference GPT's whole step against AdamW(fused). Small files under $OUT only (a bench --out
# folder holds too many files to come back).
export PYTHONUNBUFFERED=1
method=${1:?method}
mode=${MODE:-reduce-overhead}
kit="$PWD/.gpukit"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/versions.txt"
cd /tmp
TORCH_LOGS=perf_hints PYTHONPATH=/tmp/site timeout 540 python3 "$kit/overhead.py" "$method" reference cuda "$mode" static \
  > "$OUT/${method}_$mode.txt" 2>&1
echo "rc $?"; grep -Ev "^[VWI][0-9]{4} |^\s*$" "$OUT/${method}_$mode.txt" | grep -i "step \|x AdamW\|error" | tail -8
grep -h "skipping cudagraphs" "$OUT/${method}_$mode.txt" | sed 's/.*skipping/skipping/' | sort | uniq -c
