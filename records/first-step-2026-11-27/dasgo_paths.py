"""DASGO's compiled step at GPT-2-small's shapes, leaf by leaf or as one graph of the whole param
group, on the same tensors (records/first-step-2026-11-27/dasgo_leaf.txt):
``PATH_MODE=leaf|whole|eager [LAYERS=12] [WTE=1] [NT=1] python dasgo_paths.py``.

``leaf`` runs the torch adapter's ``LeafCalls`` (a group of any size: ``PER_LEAF_MIN_TENSORS``
lowered to 1), ``whole`` the whole-group graph (the threshold raised past every group), ``eager``
``compile=False``. ``LAYERS`` transformer blocks (default 2: 28 tensors), or the 50257x768
embedding alone (``WTE=1``); random gradients; ``NT`` threads (default 1: this 2-core machine is
shared, and two threads stall in every OpenMP region). Prints the first step and the min and
median of the next 10.
"""
import os
import time

import torch

import precond_ref.adapters._torch_compile as torch_compile
import precond_ref.adapters.torch as pt
from precond_ref.benchmarks.scale import gpt2_small_shapes

torch.set_num_threads(int(os.environ.get("NT", "1")))
path = os.environ["PATH_MODE"]
torch_compile.PER_LEAF_MIN_TENSORS = 1 if path == "leaf" else 10**9
torch.manual_seed(0)
shapes = [("wte", (50257, 768))] if os.environ.get("WTE") else gpt2_small_shapes(layers=int(os.environ.get("LAYERS", "2")))
named = [(n, torch.nn.Parameter(torch.randn(s, dtype=torch.float32) * 0.02)) for n, s in shapes]
opt = pt.DASGO(named, compile=path != "eager")
gradients = [[torch.randn_like(p) * 1e-3 for _, p in named] for _ in range(2)]
times = []
for step in range(13):
    for (_, p), g in zip(named, gradients[step % 2]):
        p.grad = g
    start = time.perf_counter()
    opt.step()
    times.append(time.perf_counter() - start)
late = sorted(times[3:])
print(path, len(named), "tensors, threads", torch.get_num_threads(), "first step %.1f s" % times[0],
      "then ms/step min %.1f median %.1f" % (1e3 * late[0], 1e3 * late[len(late) // 2]), flush=True)
