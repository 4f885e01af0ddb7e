"""State bytes and step time of Sketchy / S-AdaGrad against full-factor Shampoo and Adam, in one run.

    python benchmarks/bench_sketchy.py [--device cuda] [--repeats 10] [--shapes 1024x1024,4096x1024]
                                       [--rank 128] [--jax]

For each weight shape every optimizer gets the same parameter and a fixed random gradient; after
warm-up the median wall time of ``repeats`` steps is printed with its ratio to ``torch.optim.Adam``
measured in the same run, and the optimizer state's size in bytes. "Shampoo (full factors)" is a
minimal dense reference written here (L, R statistics of sizes m² and n², inverse 4th roots by
eigh every step, RMSProp graft and momentum as Sketchy's), i.e. what Sketchy's sketches replace.
``--jax`` also times the optax adapter (jit) against ``optax.adam``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from precond_ref.adapters.torch import SAdaGrad, Sketchy


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class FullShampoo(torch.optim.Optimizer):
    """Dense-factor Shampoo with Sketchy's pipeline (graft, momentum): the memory/time baseline."""

    def __init__(self, params, lr=1e-3, b2=0.999, eps=1e-7, momentum=0.9):
        super().__init__(params, dict(lr=lr, b2=b2, eps=eps, momentum=momentum))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                g, st = p.grad, self.state[p]
                if not st:
                    m, n = g.shape
                    st["L"] = torch.zeros(m, m, dtype=g.dtype, device=g.device)
                    st["R"] = torch.zeros(n, n, dtype=g.dtype, device=g.device)
                    st["graft"] = torch.zeros_like(g)
                    st["momentum"] = torch.zeros_like(g)
                b2 = group["b2"]
                st["L"].mul_(b2).add_(g @ g.T)
                st["R"].mul_(b2).add_(g.T @ g)
                roots = []
                for key in ("L", "R"):
                    w, v = torch.linalg.eigh(st[key])
                    w = w.clamp_min(0) + group["eps"] * w.max()
                    roots.append((v * w.pow(-0.25)) @ v.T)
                direction = roots[0] @ g @ roots[1]
                st["graft"].mul_(0.999).addcmul_(g, g, value=0.001)
                graft = g / (st["graft"] + 1e-23).sqrt()
                u = direction * (graft.norm() / direction.norm().clamp_min(1e-30))
                st["momentum"].mul_(group["momentum"]).add_(u)
                p.add_(u + group["momentum"] * st["momentum"], alpha=-group["lr"])


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for st in opt.state.values():
        for value in (st.values() if isinstance(st, dict) else []):
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
            elif isinstance(value, dict):
                total += sum(v.numel() * v.element_size() for v in value.values() if torch.is_tensor(v))
    return total


def _time_steps(make: Callable, shape, device: str, warmup: int, repeats: int):
    gen = torch.Generator(device="cpu").manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape, generator=gen).to(device))
    grad = torch.randn(shape, generator=gen).to(device)
    opt = make([p])
    times = []
    for i in range(warmup + repeats):
        p.grad = grad
        _sync(device)
        start = time.perf_counter()
        opt.step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times), _state_bytes(opt)


def bench_cases(rank: int = 128) -> dict[str, Callable]:
    return {
        "torch Adam": lambda ps: torch.optim.Adam(ps, lr=1e-3),
        f"Sketchy principled (k={rank}, svd)": lambda ps: Sketchy(ps, rank=rank),
        f"Sketchy principled (k={rank}, gram)": lambda ps: Sketchy(ps, rank=rank, decomposition="gram"),
        f"Sketchy faithful (k={rank})": lambda ps: Sketchy(ps, rank=rank, mode="faithful"),
        f"Sketchy (k={rank}, every 10)": lambda ps: Sketchy(ps, rank=rank, precondition_every=10),
        f"S-AdaGrad (k={rank // 4}, blocks 65536)": lambda ps: SAdaGrad(ps, rank=rank // 4, block_size=65536),
        "Shampoo (full factors)": lambda ps: FullShampoo(ps),
    }


def _bench_jax(shape, rank, warmup, repeats):
    import jax
    import optax

    import precond_ref.adapters.jax as pj

    key = jax.random.PRNGKey(0)
    p = {"w": jax.random.normal(key, shape)}
    g = {"w": jax.random.normal(jax.random.PRNGKey(1), shape)}
    out = {}
    for name, opt in (("optax adam", optax.adam(1e-3)), (f"optax sketchy (k={rank})", pj.sketchy(1e-3, rank=rank))):
        state = opt.init(p)
        step = jax.jit(opt.update)
        times = []
        for i in range(warmup + repeats):
            start = time.perf_counter()
            u, state = step(g, state, p)
            jax.block_until_ready(u)
            if i >= warmup:
                times.append(time.perf_counter() - start)
        nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state) if hasattr(x, "dtype"))
        out[name] = (statistics.median(times), nbytes)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--shapes", default="1024x1024,4096x1024")
    parser.add_argument("--jax", action="store_true")
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    for shape in shapes:
        print(f"\nshape {shape} ({shape[0] * shape[1] * 4 / 2**20:.1f} MiB of float32 parameters), device {args.device}")
        results = {name: _time_steps(make, shape, args.device, args.warmup, args.repeats)
                   for name, make in bench_cases(args.rank).items()}
        adam_time = results["torch Adam"][0]
        for name, (t, nbytes) in results.items():
            print(f"  {name:40s} {t * 1e3:9.2f} ms  x{t / adam_time:8.1f} Adam   state {nbytes / 2**20:8.2f} MiB")
        if args.jax:
            jres = _bench_jax(shape, args.rank, args.warmup, args.repeats)
            base = jres["optax adam"][0]
            for name, (t, nbytes) in jres.items():
                print(f"  {name:40s} {t * 1e3:9.2f} ms  x{t / base:8.1f} optax adam   state {nbytes / 2**20:8.2f} MiB")


if __name__ == "__main__":
    main()
