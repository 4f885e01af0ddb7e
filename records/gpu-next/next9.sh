#!/usr/bin/env bash
# The next GPU session's own measurements, after the kit's `tests` and `bench` (about 4 minutes). Set-up, here:
#   bash ../shared/gpu/prepare.sh && cp records/gpu-next/{next9.sh,cupy_probe.py,cupy_capture_diag.py,eigh_streams.py,first_steps_cuda.py,sagmem_gpu.py,jax_compile.py} .gpukit/
# then one `run` with carry [".whl", ".gpukit"], timeout_s 300: `bash .gpukit/next9.sh`.
# 1. What CuPy's stream capture may hold (cuBLAS is refused by CuPy; cuTENSOR is not, cupy/cupy#6290) and which
#    operation refuses each method's CuPy capture; 2. whether cuSOLVER syevd calls on several streams overlap
#    (Sketchy's GPU step is ~20 per-matrix syevd a step); 3. S-AdaGrad at GPT-2-small (its OOM of the eighth run);
#    4. Sketchy's decomposition variants on the reference GPT (subspace: the approximate route); 5. each method's
#    jitted optax update alone on the reference GPT's shapes: lowering and compilation seconds on the GPU, HLO size.
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
kit="$PWD/.gpukit"; T0=$SECONDS
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site; cd /tmp
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/versions.txt"
timeout 40 python3 "$kit/cupy_probe.py" > "$OUT/cupy_probe.txt" 2>&1; echo "probe rc $?"; cat "$OUT/cupy_probe.txt" | cut -c1-200
timeout 70 python3 "$kit/cupy_capture_diag.py" > "$OUT/cupy_capture_diag.txt" 2>&1; echo "diag rc $?"; cut -c1-220 "$OUT/cupy_capture_diag.txt" | head -60
timeout 40 python3 "$kit/eigh_streams.py" > "$OUT/eigh_streams.txt" 2>&1; echo "eigh rc $?"; cat "$OUT/eigh_streams.txt"
timeout 90 python3 "$kit/sagmem_gpu.py" > "$OUT/sadagrad_gpt2.txt" 2>&1; echo "sadagrad rc $?"; tail -3 "$OUT/sadagrad_gpt2.txt" | cut -c1-600
timeout 80 python3 -m precond_ref bench --model gpt --size reference --frameworks torch --budget 1 --methods sketchy --variants \
  --out /tmp/sk --no-progress > "$OUT/sketchy_variants.txt" 2>&1; echo "variants rc $?"; grep "^| torch" "$OUT/sketchy_variants.txt" | cut -d'|' -f3-9
cp /tmp/sk/bench.json "$OUT/sketchy_variants.json" 2>/dev/null; echo "done at $((SECONDS-T0)) s"
timeout 150 python3 "$kit/jax_compile.py" reference adamw,asgo,if_shampoo,sketchy,mbf,s_adagrad 2>&1 | grep leaves | tee "$OUT/jax_compile.txt"
echo "done at $((SECONDS-T0)) s"
