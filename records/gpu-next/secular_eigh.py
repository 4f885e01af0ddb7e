"""S-AdaGrad's FD core decomposed three ways, timed on one device: the SVD of the (k+1)-square
core (``linalg.left_singular``, the default), ``eigh`` of its Gram, and the secular equation of its
rank-one Gram update (``linalg.rank_one_update_eigh``), eagerly and, on CUDA, replayed as a CUDA
graph (the secular path only: eigh and svd read their status on the host).

``python secular_eigh.py [DEVICE] [REPEATS]`` prints one line per (stack, order): ms per call.
"""
import sys
import time

import torch

from precond_ref.linalg import left_singular, rank_one_update_eigh, symmetric_eigh

device = sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu")
repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 20


def timed(fn, *args):
    fn(*args)
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        fn(*args)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeats * 1e3


def captured(fn, *args):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(*args)
    return timed(graph.replay)


print(f"device {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}), torch {torch.__version__}")
print("stack  order  svd(core)  eigh(gram)  secular  secular-captured   (ms per call)")
for stack in (16, 256):
    for k in (32, 128):
        gen = torch.Generator(device="cpu").manual_seed(0)
        sigma = torch.sort(torch.rand(stack, k, generator=gen), descending=True).values
        z = torch.randn(stack, k + 1, generator=gen)
        sigma, z = sigma.to(device), z.to(device)
        core = torch.zeros(stack, k + 1, k + 1, device=device)
        core[:, :k, :k] = torch.diag_embed(sigma)
        core[:, :, k] = z
        gram = core @ core.mT
        d = torch.cat([sigma * sigma, torch.zeros(stack, 1, device=device)], dim=-1)
        row = [timed(left_singular, core), timed(symmetric_eigh, gram), timed(rank_one_update_eigh, d, z)]
        row.append(captured(rank_one_update_eigh, d, z) if device == "cuda" else float("nan"))
        print(f"{stack:5d}  {k + 1:5d}  " + "  ".join(f"{v:9.3f}" for v in row), flush=True)
