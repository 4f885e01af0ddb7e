#!/usr/bin/env bash
# This session's one GPU call: CUDA/CuPy test cases, compare on CuPy, reference-GPT eager bench, CuPy layer rows.
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
ROOT=$PWD; T0=$SECONDS
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, jax, numpy, cupy, optax; print('torch', torch.__version__, torch.cuda.is_available(), '| jax', jax.__version__, jax.devices(), '| cupy', cupy.__version__, cupy.is_available(), '| numpy', numpy.__version__, '| optax', optax.__version__)"
} 2>&1 | tee "$OUT/versions.txt"
cd /tmp
echo "== tests at $((SECONDS-T0)) s"
timeout 170 python3 -m pytest "$ROOT/tests" -k "cupy or cuda" -q -n 12 -p no:cacheprovider -rfE --durations=8 \
  --ignore="$ROOT/tests/test_docs.py" > "$OUT/pytest.txt" 2>&1
echo "pytest rc $?"; grep -E "passed|failed" "$OUT/pytest.txt" | tail -2; grep -E "^(FAILED|ERROR)" "$OUT/pytest.txt" | head -30
echo "== compare cupy at $((SECONDS-T0)) s"
timeout 160 python3 -m precond_ref compare --backend cupy --device 0 --no-tune --seeds 2 --epochs 3 \
  --out /tmp/compare_cupy --no-progress --no-plot > "$OUT/compare_cupy.txt" 2>&1
echo "compare cupy rc $?"; tail -25 "$OUT/compare_cupy.txt"; cp /tmp/compare_cupy/*.json "$OUT/" 2>/dev/null
echo "== bench gpt at $((SECONDS-T0)) s"
timeout 130 python3 -m precond_ref bench --model gpt --size reference --frameworks torch --budget 3 \
  --out /tmp/gpt --no-progress > "$OUT/bench_gpt.txt" 2>&1
echo "bench gpt rc $?"; grep "^| torch" "$OUT/bench_gpt.txt"; cp /tmp/gpt/bench.json "$OUT/bench_gpt.json" 2>/dev/null
echo "== bench layers at $((SECONDS-T0)) s"
timeout 60 python3 -m precond_ref bench --frameworks torch,cupy --cases 1024x1024 --budget 2 \
  --out /tmp/layers --no-progress > "$OUT/bench_layers.txt" 2>&1
echo "bench layers rc $?"; grep "^| " "$OUT/bench_layers.txt" | head -30; cp /tmp/layers/bench.json "$OUT/bench_layers.json" 2>/dev/null
echo "== done at $((SECONDS-T0)) s"; ls "$OUT"
