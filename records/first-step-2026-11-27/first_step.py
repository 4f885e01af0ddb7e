"""Three steps of one torch optimizer at GPT-2-small's shapes, each timed (docs/performance.md,
"The first step at GPT-2-small"): ``python first_step.py CLASS [on|off|eager]``, one per process.

The 148 float32 tensors of ``precond_ref.benchmarks.scale.gpt2_small_shapes`` (124M parameters),
random gradients, the class's defaults (the root-free classes with ``batch_size=8``); ``off`` is
``compile=False``, ``eager`` compiles with dynamo's ``eager`` backend (its trace, no code
generation). Experiments: ``WHOLE_GRAPH=1`` compiles an element-wise class's update of the whole
param group as one graph, as before the per-leaf kernel (``in_place_step`` switched off);
``PACK_ALL=1`` with it packs every leaf into one flat leaf under the compiler
(``precond_ref.engine.joined.FLAT_MAX_TRACED_ELEMENTS`` raised past every leaf). A first run's
compilation: ``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1``.
"""

import os
import sys
import time

import torch

import precond_ref.adapters.torch as pt
from precond_ref.benchmarks.scale import gpt2_small_shapes

if os.environ.get("WHOLE_GRAPH"):
    import precond_ref.adapters._torch_compile as torch_compile

    torch_compile.in_place_step = lambda transform: None
if os.environ.get("PACK_ALL"):
    import precond_ref.engine.joined as joined

    joined.FLAT_MAX_TRACED_ELEMENTS = 2**40

name = sys.argv[1]
extra = {"batch_size": 8} if name in ("RFRMSProp", "RFAdamW", "IFShampoo") else {}
if len(sys.argv) > 2:
    extra["compile"] = {"on": True, "off": False, "eager": {"backend": "eager"}}[sys.argv[2]]
torch.manual_seed(0)
named = [(n, torch.nn.Parameter(torch.randn(s, dtype=torch.float32) * 0.02)) for n, s in gpt2_small_shapes()]
print(name, extra, f"{sum(p.numel() for _, p in named) / 1e6:.1f}M parameters in {len(named)} tensors", flush=True)
opt = torch.optim.AdamW([p for _, p in named], lr=1e-3) if name == "AdamW" else getattr(pt, name)(named, **extra)
for step in range(3):
    for _, p in named:
        p.grad = torch.randn_like(p) * 1e-3
    start = time.perf_counter()
    opt.step()
    print(f"step {step}: {time.perf_counter() - start:.2f} s", flush=True)
