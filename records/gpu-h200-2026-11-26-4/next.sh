#!/usr/bin/env bash
# The next GPU session's first command (docs/performance.md, "On a GPU: the fourth run"): the
# reference GPT's eager torch rows at this code and, on the same machine, at 8abb850 (the second
# run's code), twice, alternating, so the host-bound rows compare on one host. Set-up, here:
#   bash ../shared/gpu/prepare.sh && cp records/gpu-h200-2026-11-26-4/next.sh .gpukit/
#   git worktree add /tmp/wt_old 8abb850 && python3 -m pip wheel -q --no-deps /tmp/wt_old -w .whl/old
# then `run` with carry [".whl", ".gpukit"]: bash .gpukit/next.sh   (about 6 minutes)
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
install() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$1" "${@:2}"; }
install /tmp/site .whl/*.whl || exit 1
install /tmp/site_old .whl/old/*.whl .whl/array_api*.whl || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/versions.txt"
cd /tmp
G="--model gpt --size reference --frameworks torch --budget 3 --no-progress"
for round in 1 2; do
  PYTHONPATH=/tmp/site timeout 100 python3 -m precond_ref bench $G --methods sketchy,s_adagrad,if_shampoo,asgo,mbf \
    --out "$OUT/new$round" > "$OUT/new$round.txt" 2>&1
  echo "new $round rc $?"; grep "^| torch" "$OUT/new$round.txt"
  PYTHONPATH=/tmp/site_old timeout 80 python3 -m precond_ref bench $G --methods if_shampoo,asgo,mbf \
    --out "$OUT/old$round" > "$OUT/old$round.txt" 2>&1
  echo "old $round rc $?"; grep "^| torch" "$OUT/old$round.txt"
done
