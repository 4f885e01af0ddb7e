#!/usr/bin/env bash
# The next GPU session's first command (docs/performance.md, "On a GPU: the fifth run"): MBF's whole
# step at this code and at 8abb850 alternating, three rounds (the fifth run saw it slower at the
# new code in both of its rounds while its optimizer step alone was faster); then the reference
# GPT's eager rows of every method for the README's GPU block. Set-up, here:
#   bash ../shared/gpu/prepare.sh && cp records/gpu-h100-2026-11-27-5/next.sh .gpukit/
#   git worktree add /tmp/wt_old 8abb850 && python3 -m pip wheel -q --no-deps /tmp/wt_old -w .whl/old
# then `run` with carry [".whl", ".gpukit"]: bash .gpukit/next.sh   (about 8 minutes); back here:
#   python -m precond_ref bench --readme-from <files_at>/all/bench.json
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
install() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$1" "${@:2}"; }
install /tmp/site .whl/*.whl || exit 1
install /tmp/site_old .whl/old/*.whl .whl/array_api*.whl || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/versions.txt"
cd /tmp
G="--model gpt --size reference --frameworks torch --budget 3 --no-progress --methods mbf"
for round in 1 2 3; do
  for code in new old; do
    site=/tmp/site; [ $code = old ] && site=/tmp/site_old
    PYTHONPATH=$site timeout 60 python3 -m precond_ref bench $G --out "$OUT/mbf_$code$round" > "$OUT/mbf_$code$round.txt" 2>&1
    echo "$code $round rc $?"; grep "^| torch" "$OUT/mbf_$code$round.txt"
  done
done
PYTHONPATH=/tmp/site timeout 300 python3 -m precond_ref bench --model gpt --size reference --frameworks torch --budget 3 \
  --no-progress --out "$OUT/all" > "$OUT/all.txt" 2>&1
echo "all rc $?"; grep "^| torch" "$OUT/all.txt"
