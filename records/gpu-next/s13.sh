#!/usr/bin/env bash
# The next GPU run, in up to five calls. Set-up here, once: bash ../shared/gpu/prepare.sh && git rev-parse --short HEAD
# > .whl/COMMIT; then `run` with carry [".whl"]:
#   bash records/gpu-next/s13.sh                                   (call 1, timeout_s 540)
#   STEPS=gpt2bench,profile END_S=260 bash records/gpu-next/s13.sh  (call 2 at once, timeout_s 300: a machine stays warm
#     30 s; call 1 and its start leave about 320 s of the 15 device minutes)
#   STEPS=gpt2,cupycompare, then STEPS=reproduce                    (calls 3 and 4, in a session with time left)
# A call returns at most 8 files: each writes its logs under /tmp/res and packs them into $OUT/results.tgz (also on
# a timeout of a step; the run's own timeout loses the pack, so END bounds the steps well inside it); its console
# output is the summary. The twelfth run (records/gpu-h200-2026-11-29) measured the eager captured default, the
# compiled captured rows, the eigh routes, the variants, CuPy's layers and capture refusals and GPT-2-small; what it
# left, the most settling first:
#   call 1 (STEPS unset: tests,bench,jaxbench): the CUDA/CuPy tests (150 s; S-AdaGrad's compiled step under torch 2.11
#     and compare --backend cupy failed there); the reference GPT torch bench at the defaults (150 s), which now
#     capture the compiled step of AGD, DASGO, RF-RMSProp and RF-AdamW, and S-AdaGrad's step with the secular core
#     (its CUDA default now; 2.25x as the twelfth run's variant) (the README's GPU block: bench --readme-from);
#     the JAX GPT rows of Sketchy, IF-Shampoo, ASGO and S-AdaGrad (240 s; never measured on an H200; the FD cores now
#     take the float64 Gram's eigh without x64 too, where the tenth run's took the float32 SVD);
#   call 2: the bench's GPT-2-small training step (`--size gpt2`: every method's steady step and peak memory, the README
#     GPU block's GPT-2-small columns: bench --readme-from; 200 s), a profile of S-AdaGrad's, Sketchy's and ASGO's
#     steps (45 s: Sketchy's ~130 ms a step besides its order-768 eigh, where a CPU count finds 13 float32 eigh of
#     order 512 and 15 QR of 1024 x 512 a step, records/traffic-2026-11-29b);
#   call 3: GPT-2-small's first steps with random gradients (100 s), the main job on CuPy (150 s);
#   call 4: reproduce's GPU protocol (ASGO-3, MBF-1, MBF-4 on cuda; docs/reproduce.md, "GPU protocol").
#   call 5 (STEPS=compiledmatrix,jaxvariants): IF-Shampoo's, ASGO's and S-AdaGrad's compiled captured steps (never reached: the
#     twelfth run's last call spent its time on MBF's compilation; S-AdaGrad's secular core is ~66 bisection steps of
#     element-wise passes, which Inductor fuses), then JAX's S-AdaGrad and Sketchy variants (the secular core jitted
#     against the per-matrix decompositions).
# Other steps stay available by name (compiled, eigh, secular, variants, cupybench, diag, jaxautotune,
# jaxroutes, jaxcompile: each method's jitted JAX update compiled alone).
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
ROOT=$PWD; T0=$SECONDS; END=${END_S:-480}
FINAL_OUT=$OUT; OUT=/tmp/res; rm -rf "$OUT"; mkdir -p "$OUT"
pack() { tar czf "$FINAL_OUT/results.tgz" -C /tmp res; }; trap pack EXIT
# The seconds a step may take: its cap, or what is left of END (at least 1: `timeout 0` would mean no limit).
left() { local l=$((END - (SECONDS - T0))); [ "$l" -lt 1 ] && l=1; [ "$l" -lt "$1" ] && echo "$l" || echo "$1"; }
STEPS=${STEPS:-tests,bench,jaxbench}   # call 1
want() { [[ ",$STEPS," == *",$1,"* ]]; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PRECOND_REF_COMMIT=$(cat .whl/COMMIT 2>/dev/null)  # the bench names the commit it measured
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, jax, numpy, cupy, optax; print('torch', torch.__version__, torch.cuda.is_available(), '| jax', jax.__version__, jax.devices(), '| cupy', cupy.__version__, cupy.is_available(), '| numpy', numpy.__version__, '| optax', optax.__version__)"
  cat .whl/COMMIT 2>/dev/null
} 2>&1 | tee "$OUT/versions.txt"
cd /tmp
if want tests; then
  echo "== tests at $((SECONDS-T0)) s"
  timeout $(left 150) python3 -m pytest "$ROOT/tests" -k "cupy or cuda" -q -n 16 -p no:cacheprovider -rfE --durations=5 \
    --ignore="$ROOT/tests/test_docs.py" > "$OUT/pytest.txt" 2>&1
  echo "pytest rc $?"; grep -E "passed|failed" "$OUT/pytest.txt" | tail -2; grep -E "^(FAILED|ERROR)" "$OUT/pytest.txt" | cut -c1-300 | head -20
fi
if want bench; then
  echo "== bench gpt torch at $((SECONDS-T0)) s"
  timeout $(left 150) python3 -m precond_ref bench --model gpt --size reference --frameworks torch --budget 2 \
    --out /tmp/gpt --no-progress > "$OUT/bench_gpt.txt" 2>&1
  echo "bench gpt rc $?"; grep "^| torch" "$OUT/bench_gpt.txt" | cut -d'|' -f3-9,13; cp /tmp/gpt/bench.json "$OUT/bench_gpt.json" 2>/dev/null
  grep -i "warn\|not captured\|error" "$OUT/bench_gpt.txt" | cut -c1-250 | sort | uniq -c | head -6
fi
if want compiled; then
  echo "== bench gpt torch compiled at $((SECONDS-T0)) s"
  # compile=True under the captured step: Inductor's fused kernels replayed in the CUDA graph. Counted on a CPU
  # (records/traffic-2026-11-29), the compiled steps move 6-10.5x the parameters' bytes (AGD, RF, DASGO; MBF
  # 15.8x) against 34-63x eagerly, AdamW(fused) 7x: is the fused captured step within the 1.05x / 1.10x targets,
  # and at what first-step cost? If so, compile=None should compile these classes under capture too.
  timeout $(left 130) python3 -m precond_ref bench --model gpt --size reference --frameworks torch --budget 2 \
    --methods agd,rf_rmsprop,rf_adamw,dasgo,mbf --torch-compile on --out /tmp/gptc --no-progress > "$OUT/bench_gpt_compiled.txt" 2>&1
  echo "bench gpt compiled rc $?"; grep "^| torch" "$OUT/bench_gpt_compiled.txt" | cut -d'|' -f3-9,13; cp /tmp/gptc/bench.json "$OUT/bench_gpt_compiled.json" 2>/dev/null
fi
if want compiledmatrix; then
  echo "== bench gpt torch compiled, IF-Shampoo and ASGO at $((SECONDS-T0)) s"
  # compile=True under capture for the matrix methods whose eager captured step is bytes-bound in part
  # (IF-Shampoo 1.35x, ASGO 1.52x, targets 1.25x; S-AdaGrad 2.25x with the secular core, target 1.6x, its step
  # counted on a CPU at 304x the parameters' bytes and 1,457 launches): do Inductor's fused kernels in the graph
  # close the gap, and at what first-step cost?
  timeout $(left 200) python3 -m precond_ref bench --model gpt --size reference --frameworks torch --budget 2 \
    --methods if_shampoo,asgo,s_adagrad --torch-compile on --out /tmp/gptcm --no-progress > "$OUT/bench_gpt_compiled_matrix.txt" 2>&1
  echo "bench gpt compiled matrix rc $?"; grep "^| torch" "$OUT/bench_gpt_compiled_matrix.txt" | cut -d'|' -f3-9,13
  cp /tmp/gptcm/bench.json "$OUT/bench_gpt_compiled_matrix.json" 2>/dev/null
fi
if want eigh; then
  echo "== batched eigh routes at $((SECONDS-T0)) s"
  # Sketchy's FD cores, (15,768) and (5,512) float64 a step: is there a route that does a stack in one call, faster
  # than syevd matrix after matrix, and capturable? The script stops starting routes at END_S; its captures run last.
  t=$(left 100); timeout $t env END_S=$((t - 15)) python3 "$ROOT/records/gpu-next/eigh_routes.py" > "$OUT/eigh_routes.txt" 2>&1
  rc=$?; echo "eigh routes rc $rc"; grep -v -i "warn" "$OUT/eigh_routes.txt" | cut -c1-220
  if [ $rc -ne 0 ] && [ $rc -ne 124 ]; then   # a crash (the ctypes route can take the process down): the rest without it
    t=$(left 90); timeout $t env END_S=$((t - 15)) SKIP=cusolver python3 "$ROOT/records/gpu-next/eigh_routes.py" > "$OUT/eigh_routes_skip.txt" 2>&1
    echo "eigh routes without cusolver rc $?"; grep -v -i "warn" "$OUT/eigh_routes_skip.txt" | cut -c1-220
  fi
fi
if want secular; then
  echo "== s_adagrad's secular core at $((SECONDS-T0)) s"
  # The FD core by the secular equation (no host read): per-call times against svd/eigh, then the reference GPT's
  # captured S-AdaGrad with it (bench --variants row "secular"; the target is 1.6x AdamW(fused)).
  timeout $(left 20) python3 "$ROOT/records/gpu-next/secular_eigh.py" cuda 20 > "$OUT/secular_eigh.txt" 2>&1
  echo "secular rc $?"; cat "$OUT/secular_eigh.txt"
  timeout $(left 60) python3 -m precond_ref bench --model gpt --size reference --frameworks torch --budget 2 \
    --methods s_adagrad --variants --out /tmp/gpts --no-progress > "$OUT/bench_gpt_s_adagrad.txt" 2>&1
  echo "bench s_adagrad rc $?"; grep "^| torch" "$OUT/bench_gpt_s_adagrad.txt" | cut -d'|' -f3-9,13
fi
if want variants; then
  echo "== bench gpt torch variants of sketchy and asgo at $((SECONDS-T0)) s"
  # Sketchy's decomposition routes on the reference GPT (decomposition="subspace": the 2.5x; "gram",
  # "incremental gram", every 10, faithful) and ASGO's matmul-only root (polar express: captured on float64 too).
  timeout $(left 120) python3 -m precond_ref bench --model gpt --size reference --frameworks torch --budget 1 \
    --methods sketchy,asgo --variants --out /tmp/gptv --no-progress > "$OUT/bench_gpt_variants.txt" 2>&1
  echo "bench variants rc $?"; grep "^| torch" "$OUT/bench_gpt_variants.txt" | cut -d'|' -f3-9,13; cp /tmp/gptv/bench.json "$OUT/bench_gpt_variants.json" 2>/dev/null
fi
if want jaxbench; then
  echo "== bench gpt jax at $((SECONDS-T0)) s"
  # JAX's default settings (no x64): the FD cores now take the float64 Gram's eigh within a block that enables x64
  # (the tenth run's 118x for Sketchy on the H100 was the float32 SVD, 26 ms at order 640 against the Gram's 6.8 ms).
  # JAX_X64=1 runs the rows with x64 (the summary line then says "(x64)").
  JAX_ENABLE_X64=${JAX_X64:-0} timeout $(left 240) python3 -m precond_ref bench --model gpt --size reference --frameworks jax --budget 1 \
    --methods ${JAX_METHODS:-sketchy,if_shampoo,asgo,s_adagrad} --out /tmp/gptj --no-progress > "$OUT/bench_gpt_jax.txt" 2>&1
  echo "bench gpt jax rc $?"; cp /tmp/gptj/bench.json "$OUT/bench_gpt_jax.json" 2>/dev/null
  python3 -c "import json; d=json.load(open('/tmp/gptj/bench.json')); [print(r.get('label'), r.get('first_step_ms'), r.get('median_ms'), r.get('mean_ms')) for r in d['results'].get('gpt', [])]" 2>&1 | tail -12
fi
if want jaxcompile; then
  echo "== jax compile per method at $((SECONDS-T0)) s"
  # each method's jitted optax update alone on the reference GPT's shapes: trace and XLA compile seconds on the GPU
  # (records/jax-compile-2026-11-30 measured the CPU's; target 60 s a method)
  timeout $(left 300) python3 "$ROOT/records/jax-compile-2026-11-30/compile_step.py" reference > "$OUT/jax_compile.txt" 2>&1
  echo "jax compile rc $?"; tail -14 "$OUT/jax_compile.txt" | cut -c1-160
fi
if want jaxvariants; then
  echo "== bench gpt jax variants at $((SECONDS-T0)) s"
  # S-AdaGrad's and Sketchy's other cores under jax.jit: the secular core (no LAPACK call; the fixed bisection
  # jitted) against the default's per-matrix decompositions, and Sketchy's Gram, subspace and interval rows.
  JAX_ENABLE_X64=${JAX_X64:-0} timeout $(left 240) python3 -m precond_ref bench --model gpt --size reference --frameworks jax --budget 1 \
    --methods s_adagrad,sketchy --variants --out /tmp/gptjv --no-progress > "$OUT/bench_gpt_jax_variants.txt" 2>&1
  echo "bench gpt jax variants rc $?"; grep "^| jax" "$OUT/bench_gpt_jax_variants.txt" | cut -d'|' -f3-9
  cp /tmp/gptjv/bench.json "$OUT/bench_gpt_jax_variants.json" 2>/dev/null
fi
if want cupybench; then
  echo "== bench layers torch and cupy at $((SECONDS-T0)) s"
  # CuPy against torch on one 1024x1024 layer (the CuPy <= 1.3x torch), the captured CuPy step where it captures.
  timeout $(left 60) python3 -m precond_ref bench --frameworks torch,cupy --cases 1024x1024 --budget 1 \
    --out /tmp/layers --no-progress > "$OUT/bench_layers.txt" 2>&1
  echo "bench layers rc $?"; grep "^| " "$OUT/bench_layers.txt" | cut -d'|' -f2-9 | head -24; cp /tmp/layers/bench.json "$OUT/bench_layers.json" 2>/dev/null
fi
if want cupycompare; then
  echo "== the main job on CuPy at $((SECONDS-T0)) s"
  # compare --backend cupy (the mission's GPU runs through CuPy; its timing the issue asks to show), no tuning: every
  # method at its paper's settings, float64 as on the CPU, so the table can be held against the numpy backend's.
  timeout $(left 150) python3 -m precond_ref compare --backend cupy --device 0 --no-tune --seeds 2 --epochs 6 \
    --out /tmp/compare_cupy --no-progress --no-plot > "$OUT/compare_cupy.txt" 2>&1
  echo "compare cupy rc $?"; tail -20 "$OUT/compare_cupy.txt" | cut -c1-200
fi
if want diag; then
  echo "== cupy capture probes and diag at $((SECONDS-T0)) s"
  # What CuPy's stream capture holds: matmul, einsum and cuTENSOR's contraction with and without CuPy's cutensor
  # accelerator, and eigh (never run on a GPU yet); then which operation refuses each method's CuPy capture, with
  # CuPy's default routines and with CUPY_ACCELERATORS=cub,cutensor.
  timeout $(left 30) python3 "$ROOT/records/gpu-next/cupy_probe.py" > "$OUT/cupy_probe.txt" 2>&1
  echo "probe rc $?"; cut -c1-200 "$OUT/cupy_probe.txt" | head -20
  timeout $(left 60) python3 "$ROOT/records/gpu-next/cupy_capture_diag.py" > "$OUT/cupy_capture_diag.txt" 2>&1
  echo "diag rc $?"; cut -c1-200 "$OUT/cupy_capture_diag.txt" | head -40
  timeout $(left 60) env CUPY_ACCELERATORS=cub,cutensor python3 "$ROOT/records/gpu-next/cupy_capture_diag.py" > "$OUT/cupy_capture_diag_cutensor.txt" 2>&1
  echo "diag cutensor rc $?"; grep -v "^    " "$OUT/cupy_capture_diag_cutensor.txt" | cut -c1-200 | head -30
fi
if want gpt2bench; then
  echo "== bench gpt2 torch at $((SECONDS-T0)) s"
  # GPT-2-small's shapes on the bench's GPT (163M parameters with its untied head, batch 8x1024 tokens): every
  # method's mean training step over AdamW(fused) and its peak memory (README GPU block: bench --readme-from).
  # --budget 2: Sketchy's and S-AdaGrad's training steps (~0.8 s) then time 3 steps, their refresh period (2 at
  # --budget 1); estimated 110-165 s in all, MBF's 201 warm-up steps (every pattern captured) the most of it.
  timeout $(left 200) python3 -m precond_ref bench --model gpt --size gpt2 --frameworks torch --budget 2 \
    --out /tmp/gpt2 --no-progress > "$OUT/bench_gpt2.txt" 2>&1
  echo "bench gpt2 rc $?"; grep "^| torch" "$OUT/bench_gpt2.txt" | cut -d'|' -f3-9,11,13; cp /tmp/gpt2/bench.json "$OUT/bench_gpt2.json" 2>/dev/null
fi
if want gpt2; then
  echo "== GPT-2-small first steps and peak memory at $((SECONDS-T0)) s"
  # Every class's first 4 steps at GPT-2-small shapes from random gradients (no forward), synchronised, and peak memory.
  timeout $(left 100) python3 "$ROOT/records/gpu-next/first_steps_cuda.py" all 4 > "$OUT/first_steps_cuda.txt" 2>&1
  echo "first steps rc $?"; grep "steps s\|FAILED" "$OUT/first_steps_cuda.txt" | cut -c1-220
fi
if want jaxautotune; then
  echo "== JAX Sketchy without XLA's autotuner at $((SECONDS-T0)) s"
  # JAX Sketchy's first step (its compilation: 86.7 s in the tenth run, the limit 60 s) without XLA's GEMM
  # autotuning: how much of it the autotuner is, and what the step costs without its choices.
  timeout $(left 150) env XLA_FLAGS=--xla_gpu_autotune_level=0 python3 -m precond_ref bench --model gpt --size reference \
    --frameworks jax --budget 1 --methods sketchy --out /tmp/gptj0 --no-progress > "$OUT/bench_gpt_jax_sketchy_autotune0.txt" 2>&1
  echo "bench gpt jax sketchy autotune 0 rc $?"; cp /tmp/gptj0/bench.json "$OUT/bench_gpt_jax_sketchy_autotune0.json" 2>/dev/null
  python3 -c "import json; d=json.load(open('/tmp/gptj0/bench.json')); [print(r.get('label'), r.get('first_step_ms'), r.get('median_ms'), r.get('mean_ms')) for r in d['results'].get('gpt', [])]" 2>&1 | tail -4
fi
if want profile; then
  echo "== profile of the uncaptured and slowest steps at $((SECONDS-T0)) s"
  # Where S-AdaGrad's 33 ms over AdamW go (its bytes explain ~6 ms), Sketchy's eigh calls, ASGO's refreshes.
  timeout $(left 45) python3 "$ROOT/records/gpu-next/profile_step.py" s_adagrad,sketchy,asgo reference 3 2>&1 \
    | grep -v Warning > "$OUT/profile_step.txt"
  echo "profile rc $?"; grep -E "^== |Self CUDA time total|Self CPU time total" "$OUT/profile_step.txt"
fi
if want jaxroutes; then
  echo "== jax svd routes at $((SECONDS-T0)) s"
  timeout $(left 120) python3 "$ROOT/records/gpu-next/jax_svd_routes.py" reference dec:incremental_gram,polar 2>&1 | grep -v Warning > "$OUT/jax_svd_routes.txt"
  echo "routes rc $?"; grep "sketchy update" "$OUT/jax_svd_routes.txt" | cut -c1-200
fi
if want reproduce; then
  echo "== reproduce's GPU claims at $((SECONDS-T0)) s"
  # The GPU protocol written in docs/reproduce.md before any GPU run: ASGO-3, MBF-1, MBF-4 on cuda, default sizes,
  # stopped at 8 minutes (a claim whose runs did not finish is "not measured").
  timeout $(left 470) python3 -m precond_ref reproduce --claims ASGO-3,MBF-1,MBF-4 --device cuda --out /tmp/repro \
    --no-progress --no-plot > "$OUT/reproduce_gpu.txt" 2>&1
  echo "reproduce rc $?"; tail -30 "$OUT/reproduce_gpu.txt" | cut -c1-220; cp /tmp/repro/reproduce.json "$OUT/reproduce_gpu.json" 2>/dev/null
fi
echo "== done at $((SECONDS-T0)) s"; ls "$OUT"
