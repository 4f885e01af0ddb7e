"""First steps and peak memory of each torch optimizer at GPT-2-small's shapes on CUDA (148 float32
tensors as precond_ref.benchmarks.scale makes them, random gradients, lr=1e-3, defaults: the captured
step where the class allows it): ``python first_steps_cuda.py [CLASS,...] [STEPS]`` prints, per class,
the seconds of each of its first STEPS steps (synchronised), the mean of the last three, and the peak
GPU memory over the parameters' bytes (state, gradients and the step's workspace included)."""
import sys
import time

import torch

import precond_ref.adapters.torch as pt
from precond_ref.benchmarks.scale import _ROOT_FREE, gpt2_small_shapes

classes = sys.argv[1].split(",") if len(sys.argv) > 1 and sys.argv[1] != "all" else [
    "AdamW", "AGD", "ASGO", "DASGO", "MBF", "RFRMSProp", "RFAdamW", "IFShampoo", "Sketchy", "SAdaGrad"]
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 8
print(torch.__version__, torch.cuda.get_device_name(), flush=True)
for name in classes:
    torch.manual_seed(0)
    named = [(n, torch.nn.Parameter(torch.randn(s, dtype=torch.float32, device="cuda") * 0.02)) for n, s in gpt2_small_shapes()]
    param_bytes = sum(p.numel() * p.element_size() for _, p in named)
    cls = torch.optim.AdamW if name == "AdamW" else getattr(pt, name)
    kwargs = {"fused": True} if name == "AdamW" else ({"batch_size": 8} if name in _ROOT_FREE else {})
    opt = cls([p for _, p in named] if name == "AdamW" else named, lr=1e-3, **kwargs)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    try:
        for _ in range(steps):
            for _, p in named:
                p.grad = torch.randn_like(p) * 1e-3
            torch.cuda.synchronize()
            start = time.perf_counter()
            opt.step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated()
        print(f"{name:10s} steps s: {[round(t, 2) for t in times]}  last3 mean {1e3 * sum(times[-3:]) / 3:.1f} ms  "
              f"peak {peak / param_bytes:.2f}x params ({peak / 2**30:.2f} GiB; params {param_bytes / 2**30:.2f} GiB)", flush=True)
    except Exception as err:  # noqa: BLE001 - one failing class must not hide the others
        print(f"{name:10s} FAILED {type(err).__name__}: {str(err)[:300]}", flush=True)
    del opt, named
    torch.cuda.empty_cache()
