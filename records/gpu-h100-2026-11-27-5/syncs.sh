#!/usr/bin/env bash
export PYTHONUNBUFFERED=1
install() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$1" "${@:2}"; }
[ -d /tmp/site/precond_ref ] || install /tmp/site .whl/*.whl || exit 1
P=$PWD/.gpukit/syncs.py; ROOT=$PWD; cd /tmp
PYTHONPATH=/tmp/site timeout 70 python3 $P mbf if_shampoo asgo s_adagrad > "$OUT/syncs.txt" 2>&1; echo "syncs rc $?"; grep "host synchronisations" "$OUT/syncs.txt"
PYTHONPATH=/tmp/site timeout 100 python3 -m pytest $ROOT/tests/adapters/test_torch_cuda.py -q -n 12 -p no:cacheprovider -rfE -k "eager" > "$OUT/cuda_tests.txt" 2>&1; echo "tests rc $?"; tail -3 "$OUT/cuda_tests.txt"; grep -E "^(FAILED|ERROR)" "$OUT/cuda_tests.txt" | head
