#!/usr/bin/env bash
# The captured step on the GPU (issue 53, item 2): its CUDA tests, then the reference GPT's step of
# each capturing method uncaptured and captured against AdamW(fused) (captured.py). About 150 s.
# From the repository root with the wheel in .whl/ (as records/gpu-h100-2026-11-27-7/s1.sh):
#   run with carry [".whl"]:  bash records/gpu-next/capture.sh
# Flip the default off (adapters/_torch_capture.py, BY_DEFAULT) if the tests fail.
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
ROOT=$PWD; T0=$SECONDS
[ -d /tmp/site/precond_ref ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/capture_versions.txt"
cd /tmp
echo "== capture tests at $((SECONDS-T0)) s"
timeout 100 python3 -m pytest "$ROOT/tests/adapters/test_torch_cuda.py" -k "captured_steps or capture_that_fails" \
  -q -n 8 -p no:cacheprovider -rfE --durations=5 > "$OUT/capture_pytest.txt" 2>&1
echo "pytest rc $?"; grep -E "passed|failed" "$OUT/capture_pytest.txt" | tail -2; grep -E "^(FAILED|ERROR)" "$OUT/capture_pytest.txt" | head -20
echo "== captured GPT step at $((SECONDS-T0)) s"
timeout 120 python3 "$ROOT/records/gpu-next/captured.py" reference > "$OUT/capture_gpt.txt" 2>&1
echo "captured.py rc $?"; grep -v "^precond_ref: compiling" "$OUT/capture_gpt.txt" | tail -16
echo "== done at $((SECONDS-T0)) s"
