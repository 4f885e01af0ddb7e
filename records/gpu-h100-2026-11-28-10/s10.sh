#!/usr/bin/env bash
# Tenth GPU run, one call (after the operation cuts): CUDA/CuPy tests, the reference GPT bench in torch
# (default path) and in JAX (jitted rows; first-step = compilation), GPT-2-small first steps, the CuPy layer rows,
# and which operation refuses each method's CuPy capture. Each step bounded so the whole stays under END_S.
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
ROOT=$PWD; T0=$SECONDS; END=${END_S:-520}
left() { local l=$((END - (SECONDS - T0))); [ "$l" -lt "$1" ] && echo "$l" || echo "$1"; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, jax, numpy, cupy, optax; print('torch', torch.__version__, torch.cuda.is_available(), '| jax', jax.__version__, jax.devices(), '| cupy', cupy.__version__, cupy.is_available(), '| numpy', numpy.__version__, '| optax', optax.__version__)"
} 2>&1 | tee "$OUT/versions.txt"
cd /tmp
echo "== tests at $((SECONDS-T0)) s"
timeout $(left 140) python3 -m pytest "$ROOT/tests" -k "cupy or cuda" -q -n 12 -p no:cacheprovider -rfE --durations=5 \
  --ignore="$ROOT/tests/test_docs.py" > "$OUT/pytest.txt" 2>&1
echo "pytest rc $?"; grep -E "passed|failed" "$OUT/pytest.txt" | tail -2; grep -E "^(FAILED|ERROR)" "$OUT/pytest.txt" | cut -c1-300 | head -20
echo "== bench gpt torch at $((SECONDS-T0)) s"
timeout $(left 75) python3 -m precond_ref bench --model gpt --size reference --frameworks torch --budget 2 \
  --out /tmp/gpt --no-progress > "$OUT/bench_gpt.txt" 2>&1
echo "bench gpt rc $?"; grep "^| torch" "$OUT/bench_gpt.txt" | cut -d'|' -f3-9,13; cp /tmp/gpt/bench.json "$OUT/bench_gpt.json" 2>/dev/null
grep -i "warn\|not captured\|error" "$OUT/bench_gpt.txt" | cut -c1-250 | sort | uniq -c | head -6
echo "== bench gpt jax at $((SECONDS-T0)) s"
timeout $(left 130) python3 -m precond_ref bench --model gpt --size reference --frameworks jax --budget 1 \
  --out /tmp/gptj --no-progress > "$OUT/bench_gpt_jax.txt" 2>&1
echo "bench gpt jax rc $?"; grep "^| jax" "$OUT/bench_gpt_jax.txt" | cut -d'|' -f3-9; cp /tmp/gptj/bench.json "$OUT/bench_gpt_jax.json" 2>/dev/null
python3 -c "import json; d=json.load(open('/tmp/gptj/bench.json')); [print(r.get('label'), r.get('first_step_ms'), r.get('median_ms'), r.get('mean_ms')) for r in d['results'].get('gpt', [])]" 2>&1 | tail -12
echo "== first steps at $((SECONDS-T0)) s"
timeout $(left 80) python3 "$ROOT/.gpukit/first_steps_cuda.py" AdamW,ASGO,IFShampoo,SAdaGrad,Sketchy,DASGO,MBF 4 > "$OUT/first_steps_cuda.txt" 2>&1
echo "first steps rc $?"; grep "steps s\|FAILED" "$OUT/first_steps_cuda.txt" | cut -c1-220
echo "== cupy layers at $((SECONDS-T0)) s"
timeout $(left 50) python3 -m precond_ref bench --frameworks torch,cupy --cases 1024x1024 --budget 1 \
  --out /tmp/layers --no-progress > "$OUT/bench_layers.txt" 2>&1
echo "bench layers rc $?"; grep "^| " "$OUT/bench_layers.txt" | cut -d'|' -f2-9 | head -24; cp /tmp/layers/bench.json "$OUT/bench_layers.json" 2>/dev/null
echo "== cupy capture diag at $((SECONDS-T0)) s"
timeout $(left 50) python3 "$ROOT/.gpukit/cupy_capture_diag.py" > "$OUT/cupy_capture_diag.txt" 2>&1
echo "diag rc $?"; cut -c1-200 "$OUT/cupy_capture_diag.txt" | head -40
echo "== done at $((SECONDS-T0)) s"; ls "$OUT"
