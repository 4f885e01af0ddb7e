#!/usr/bin/env bash
# GPU session 5, second call: compiled IF-Shampoo alone on the reference GPT (2 graphs now, not 3).
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
[ -d /tmp/site/precond_ref ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
cd /tmp
left=${1:-400}
PYTHONPATH=/tmp/site timeout $left python3 -m precond_ref bench --model gpt --size reference --frameworks torch \
  --methods if_shampoo --torch-compile on --budget 3 --out "$OUT/compiled" --no-progress > "$OUT/compiled.txt" 2>&1
echo "compiled rc $?"; grep "^| torch" "$OUT/compiled.txt"; ls "$OUT"
