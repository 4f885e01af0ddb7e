#!/usr/bin/env bash
# GPU session 4: eager reference GPT rows after the stacking changes, Sketchy/S-AdaGrad decompositions, compiled ASGO/IF.
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
ROOT=$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, jax, numpy, cupy, optax; print('torch', torch.__version__, torch.cuda.is_available(), '| jax', jax.__version__, jax.devices(), '| cupy', cupy.__version__, cupy.is_available(), '| numpy', numpy.__version__, '| optax', optax.__version__)"
} 2>&1 | tee "$OUT/versions.txt"
cd /tmp
t0=$SECONDS
timeout 120 python3 -m precond_ref bench --model gpt --size reference --frameworks torch --methods s_adagrad,if_shampoo,asgo,mbf --budget 3 --out "$OUT/eager" --no-progress > "$OUT/eager.txt" 2>&1
echo "eager rc $? at $((SECONDS-t0)) s"; tail -14 "$OUT/eager.txt"
timeout 100 python3 "$ROOT/examples/measure_decompositions.py" --method sketchy --size reference > "$OUT/dec_sketchy.txt" 2>&1
echo "dec sketchy rc $? at $((SECONDS-t0)) s"; tail -30 "$OUT/dec_sketchy.txt"
timeout 60 python3 "$ROOT/examples/measure_decompositions.py" --method s_adagrad --size reference > "$OUT/dec_s_adagrad.txt" 2>&1
echo "dec s_adagrad rc $? at $((SECONDS-t0)) s"; tail -20 "$OUT/dec_s_adagrad.txt"
left=$((520 - (SECONDS - t0)))
timeout $left python3 -m precond_ref bench --model gpt --size reference --frameworks torch --methods asgo,if_shampoo --torch-compile on --budget 3 --out "$OUT/compiled" --no-progress > "$OUT/compiled.txt" 2>&1
echo "compiled rc $? at $((SECONDS-t0)) s"; tail -14 "$OUT/compiled.txt"
