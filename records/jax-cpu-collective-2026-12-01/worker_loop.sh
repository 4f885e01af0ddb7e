#!/bin/bash
# run the JAX sharding worker N times under CPU load; record failures
cd /work/main && source .venv/bin/activate
export XLA_FLAGS="--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1"
export JAX_PLATFORMS=cpu
for b in 1 2 3; do ( while true; do :; done ) & done
for i in $(seq 1 ${N:-12}); do
  s=$(date +%s); python tests/distributed/jax_worker.py > /tmp/rep/out$i.txt 2>/tmp/rep/err$i.txt; rc=$?
  echo "run $i rc $rc $(( $(date +%s)-s ))s $(grep -c rendezvous /tmp/rep/err$i.txt)" >> /tmp/rep/log.txt
done
kill $(jobs -p)
