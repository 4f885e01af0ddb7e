#!/usr/bin/env bash
# Sketchy and S-AdaGrad on the GPU after the decomp branch (docs/methods/sketchy.md, "On a GPU"):
# the reference GPT's default eager step (the seventh run: S-AdaGrad 182 ms, 10.07x; Sketchy 274 ms),
# the host synchronisations of a step, and the eigh routes of the decompositions these steps batch.
# Set-up, here: bash ../shared/gpu/prepare.sh && cp records/gpu-next/decomp.sh .gpukit/
# then `run` with carry [".whl", ".gpukit"], timeout_s 150: bash .gpukit/decomp.sh  (about 80 s)
# Small files under $OUT only (a bench --out folder holds too many files to come back).
export PYTHONUNBUFFERED=1
T0=$SECONDS
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda, torch.cuda.is_available())"
} 2>&1 | tee "$OUT/versions.txt"
cd /tmp   # import the installed wheel, not the source tree

echo "== bench at $((SECONDS-T0)) s"
timeout 60 python3 -m precond_ref bench --model gpt --size reference --frameworks torch --methods sketchy,s_adagrad \
  --budget 2 --out /tmp/decomp_bench --no-progress > "$OUT/bench_gpt.txt" 2>&1
echo "bench rc $?"; grep "^| torch" "$OUT/bench_gpt.txt"; cp /tmp/decomp_bench/bench.json "$OUT/bench_gpt.json" 2>/dev/null

echo "== syncs and eigh routes at $((SECONDS-T0)) s"
timeout 45 python3 - > "$OUT/syncs_eigh.txt" 2>&1 <<'EOF'
"""Host synchronisations of S-AdaGrad's and Sketchy's steps 4-6 (the bench's settings, the reference
GPT, random gradients; a step of each refresh phase), then the median of 5 synchronised calls of
each eigh the two steps issue, as issued (float64 Gram of S-AdaGrad's 17 x 17 cores; float64 768
and 512 of Sketchy) and by the other routes (float32; one matrix against a stack of 6).
DEV=cpu SIZE=small runs it on a CPU (no synchronisations to count there)."""
import os, time, warnings
import torch
from precond_ref.benchmarks.common import contenders, torch_optimizer
from precond_ref.benchmarks.models import SIZES, build_torch

dev, cuda = os.environ.get("DEV", "cuda"), os.environ.get("DEV", "cuda") == "cuda"
size = SIZES["gpt"][os.environ.get("SIZE", "reference")]
sync = torch.cuda.synchronize if cuda else (lambda: None)
for method in ("s_adagrad", "sketchy"):
    torch.manual_seed(0)
    named = list(build_torch("gpt", size, torch.float32, dev).named_parameters())
    (c,), _ = contenders(method, False)
    opt, _ = torch_optimizer(c, named, "default")
    for _, p in named:
        p.grad = torch.randn_like(p) * 1e-3
    for _ in range(3):
        opt.step()
    sync()
    if cuda:
        torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = time.perf_counter()
        for _ in range(3):
            opt.step()
        sync()
        ms = (time.perf_counter() - t) / 3 * 1e3
    if cuda:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    print(f"{method}: {ms:.1f} ms a step (steps 4-6, synchronised), {len(syncs) / 3:.1f} host syncs a step", flush=True)
    del opt, named


def median_ms(fn, a, repeats=5):
    fn(a)
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(a)
        sync()
        times.append(time.perf_counter() - t)
    return sorted(times)[repeats // 2] * 1e3


for batch, n in ((6738, 17), (1, 768), (6, 768), (1, 512), (6, 512)):
    x = torch.randn(batch, n, 3 * n, device=dev, dtype=torch.float64)
    gram = x @ x.mT
    row = [f"eigh {batch} x {n} x {n}: float64 {median_ms(torch.linalg.eigh, gram):.2f} ms",
           f"float32 {median_ms(torch.linalg.eigh, gram.float()):.2f} ms"]
    if n == 17:
        row.append(f"svd float32 of the cores {median_ms(torch.linalg.svd, x[..., :n].float()):.2f} ms")
    print(", ".join(row), flush=True)
EOF
echo "syncs rc $?"; cat "$OUT/syncs_eigh.txt" | tail -12
echo "== done at $((SECONDS-T0)) s"; ls "$OUT"
