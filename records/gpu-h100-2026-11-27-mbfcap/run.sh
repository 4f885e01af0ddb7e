#!/usr/bin/env bash
# MBFCAP's own device run: diagnostics, then the lead's script on the carried wheel and tests, then LU capture (expected to fail).
R=$PWD/build/mbfcap
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$R"/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
(cd /tmp && timeout 60 python3 "$R/diag.py" spd 2>&1 | tee "$OUT/diag_spd.txt")
WHL=$R/whl TESTS=$R/tests PYTEST_S=100 BENCH_S=80 bash "$R/mbfcap_gpu.sh"
(cd /tmp && timeout 30 python3 "$R/diag.py" lu 2>&1 | tail -3 | tee "$OUT/diag_lu.txt")
