#!/usr/bin/env bash
# Seventh run, second start: the captured step (CUDA tests of capture, ASGO's host-free root, CuPy's compare
# table) and the reference GPT's default path (captured where the class allows, the S-AdaGrad stack fix,
# DASGO leaf by leaf), with the bench's ops column. Run with carry [".whl"] from the repository root.
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
ROOT=$PWD; T0=$SECONDS
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/versions.txt"
cd /tmp
echo "== tests at $((SECONDS-T0)) s"
timeout ${TESTS_S:-120} python3 -m pytest "$ROOT/tests/adapters/test_torch_cuda.py" "$ROOT/tests/test_compare.py" \
  -k "captured_steps or capture_that_fails or cupy_table or (never_synchronise and asgo)" \
  -q -n 12 -p no:cacheprovider -rfE --durations=6 > "$OUT/pytest.txt" 2>&1
echo "pytest rc $?"; grep -E "passed|failed" "$OUT/pytest.txt" | tail -2; grep -E "^(FAILED|ERROR)" "$OUT/pytest.txt" | cut -c1-300 | head -20
echo "== bench gpt at $((SECONDS-T0)) s"
timeout ${BENCH_S:-170} python3 -m precond_ref bench --model gpt --size reference --frameworks torch --budget 2 \
  --out /tmp/gpt --no-progress > "$OUT/bench_gpt.txt" 2>&1
echo "bench gpt rc $?"; grep "^| torch" "$OUT/bench_gpt.txt"; cp /tmp/gpt/bench.json "$OUT/bench_gpt.json" 2>/dev/null
grep -i "warn\|not captured\|error" "$OUT/bench_gpt.txt" | cut -c1-300 | sort | uniq -c | head -10
echo "== done at $((SECONDS-T0)) s"
