#!/usr/bin/env bash
# Eighth GPU run, one call: CUDA/CuPy tests, reference GPT bench (default path), GPT-2-small first steps, CuPy layer rows.
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
ROOT=$PWD; T0=$SECONDS; END=${END_S:-540}
left() { local l=$((END - (SECONDS - T0))); [ "$l" -lt "$1" ] && echo "$l" || echo "$1"; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, jax, numpy, cupy, optax; print('torch', torch.__version__, torch.cuda.is_available(), '| jax', jax.__version__, jax.devices(), '| cupy', cupy.__version__, cupy.is_available(), '| numpy', numpy.__version__, '| optax', optax.__version__)"
} 2>&1 | tee "$OUT/versions.txt"
cd /tmp
echo "== tests at $((SECONDS-T0)) s"
timeout $(left 150) python3 -m pytest "$ROOT/tests" -k "cupy or cuda" -q -n 12 -p no:cacheprovider -rfE --durations=8 \
  --ignore="$ROOT/tests/test_docs.py" > "$OUT/pytest.txt" 2>&1
echo "pytest rc $?"; grep -E "passed|failed" "$OUT/pytest.txt" | tail -2; grep -E "^(FAILED|ERROR)" "$OUT/pytest.txt" | cut -c1-400 | head -30
echo "== bench gpt at $((SECONDS-T0)) s"
timeout $(left 150) python3 -m precond_ref bench --model gpt --size reference --frameworks torch --budget 2 \
  --out /tmp/gpt --no-progress > "$OUT/bench_gpt.txt" 2>&1
echo "bench gpt rc $?"; grep "^| torch" "$OUT/bench_gpt.txt" | cut -d'|' -f3-9,11; cp /tmp/gpt/bench.json "$OUT/bench_gpt.json" 2>/dev/null
grep -i "warn\|not captured\|error" "$OUT/bench_gpt.txt" | cut -c1-300 | sort | uniq -c | head -10
echo "== first steps at $((SECONDS-T0)) s"
timeout $(left 120) python3 "$ROOT/.gpukit/first_steps_cuda.py" all 6 > "$OUT/first_steps_cuda.txt" 2>&1
echo "first steps rc $?"; tail -12 "$OUT/first_steps_cuda.txt" | cut -c1-300
echo "== cupy layers at $((SECONDS-T0)) s"
timeout $(left 60) python3 -m precond_ref bench --frameworks torch,cupy --cases 1024x1024 --budget 1 \
  --out /tmp/layers --no-progress > "$OUT/bench_layers.txt" 2>&1
echo "bench layers rc $?"; grep "^| " "$OUT/bench_layers.txt" | cut -d'|' -f2-9 | head -30; cp /tmp/layers/bench.json "$OUT/bench_layers.json" 2>/dev/null
echo "== done at $((SECONDS-T0)) s"; ls "$OUT"
