"""S-AdaGrad at its defaults (rank 128) on GPT-2-small's shapes on CUDA, two steps (the eighth GPU
run's out-of-memory, since bounded: docs/performance.md, "Memory at GPT-2-small").

Run with the precond_ref wheel installed and torch with CUDA (next9.sh):
    timeout 120 python sagmem_gpu.py
Prints one JSON line: the construction estimate (state + step), each step's seconds, the peak
``torch.cuda.max_memory_allocated()`` over the state bytes and over state + parameters +
gradients, whether the largest sketch's basis kept its storage (written in place); or the
refusal message / the step's error. About 60 s on an H100 (most of it the first step's kernels).
"""

import json
import time

import torch

import precond_ref.adapters.torch as pt
from precond_ref import sketch
from precond_ref.adapters import _torch_memory
from precond_ref.benchmarks.scale import gpt2_small_shapes

device = torch.device("cuda")
torch.manual_seed(0)
named = [(n, torch.nn.Parameter(torch.randn(s, dtype=torch.float32, device=device) * 0.02))
         for n, s in gpt2_small_shapes()]
param_bytes = sum(p.numel() * p.element_size() for _, p in named)
row = {"device": torch.cuda.get_device_name(device), "free_gib": round(torch.cuda.mem_get_info(device)[0] / 2**30, 2),
       "param_gib": round(param_bytes / 2**30, 3), "FD_ROWS_BYTES": sketch.FD_ROWS_BYTES}
try:
    opt = pt.SAdaGrad(named, lr=1e-3)
except MemoryError as error:
    row["refused"] = str(error)
    print(json.dumps(row), flush=True)
    raise SystemExit(0)
(group,), (paths,) = opt.param_groups, opt._group_paths()
arrays = _torch_memory.state_arrays(opt._transform(group), opt._tree(paths, [p.detach() for p in group["params"]]))
estimate_state = sum(nbytes for entries in arrays.values() for _, nbytes in entries.values())
estimate_step = _torch_memory.step_bytes("SAdaGrad", arrays, device)
row.update(estimate_state_gib=round(estimate_state / 2**30, 2), estimate_step_gib=round(estimate_step / 2**30, 2))
wte = named[0][1]
times, pointers = [], []
try:
    for step in range(2):
        for _, p in named:
            p.grad = torch.randn_like(p) * 1e-3
        torch.cuda.synchronize()
        if step == 0:
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        opt.step()
        torch.cuda.synchronize()
        times.append(round(time.perf_counter() - start, 2))
        pointers.append(next(v.data_ptr() for k, v in opt.state[wte].items() if k.endswith("basis")))
except Exception as error:  # noqa: BLE001 - the out-of-memory error of the first step is the finding
    row["step_error"] = f"{type(error).__name__}: {str(error)[:600]}"
row["step_s"] = times
state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))
peak = torch.cuda.max_memory_allocated(device)
grads = param_bytes
row.update(
    state_gib=round(state / 2**30, 2), peak_allocated_gib=round(peak / 2**30, 2),
    peak_over_state=round(peak / max(state, 1), 3),
    peak_less_state_params_grads_gib=round((peak - state - param_bytes - grads) / 2**30, 2),
    wte_basis_in_place=len(set(pointers)) == 1 and len(pointers) == 2,
    finite=all(bool(torch.isfinite(p).all()) for _, p in named),
)
print(json.dumps(row), flush=True)
