#!/usr/bin/env bash
# GPU session 5, third call: per-step times and a profiled eager step (reference GPT): Sketchy, S-AdaGrad, MBF now and at 8abb850.
export PYTHONUNBUFFERED=1
install() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$1" "${@:2}"; }
[ -d /tmp/site/precond_ref ] || install /tmp/site .whl/*.whl || exit 1
[ -d /tmp/site_old/precond_ref ] || install /tmp/site_old .whl/old/*.whl .whl/array_api*.whl || exit 1
P=$PWD/.gpukit/gpuprof.py; cd /tmp
for m in mbf sketchy s_adagrad if_shampoo; do
  PYTHONPATH=/tmp/site timeout 60 python3 $P $m reference cuda > "$OUT/prof_$m.txt" 2>&1; echo "$m rc $?"; grep "ms" "$OUT/prof_$m.txt" | head -3
done
PYTHONPATH=/tmp/site_old timeout 60 python3 $P mbf reference cuda > "$OUT/prof_mbf_old.txt" 2>&1; echo "mbf old rc $?"; grep "ms" "$OUT/prof_mbf_old.txt" | head -3
