"""How far data-parallel training moves from one process through the gradient's summation order.

Run: ``python tests/distributed/reduction_sensitivity.py [STEPS]`` (not collected; about a minute
on 2 CPU cores). For every method, in float32 and in float64, it prints the relative difference
of the parameters after STEPS steps (default 5) between

* torch: one process on the global batch, and the mean of the two ranks' shard gradients (which
  is what 2-rank DDP reduces, bit for bit: ``test_torch_distributed.py``), the workers' model
  and configurations;
* JAX: the 4-device ``NamedSharding`` run and the one-device run of ``jax_worker.py``.

and that difference over the dtype's eps: the amplification factor. A bug (a wrong reduction, a
block on the wrong parameter) moves the parameters at O(1) whatever the dtype; the optimizer's
conditioning amplifies a relative perturbation of the gradient of a few eps by a factor that
does not depend on the dtype. docs/distributed.md records the output.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

# First: jax_worker sets the environment jax needs before it is imported (4 host devices, the
# thread pool's size) and enables x64; float32 runs cast explicitly.
import jax_worker  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402

import precond_ref.adapters.torch as pt  # noqa: E402
import torch_worker  # noqa: E402

WORLD = 2


def torch_runs(name: str, dtype: torch.dtype, steps: int, seed: int = 1) -> float:
    cls, kwargs = torch_worker.CONFIGS[name]
    gen = torch.Generator().manual_seed(seed)
    xs = torch.randn(steps, torch_worker.GLOBAL_BATCH, 6, generator=gen, dtype=torch.float64).to(dtype)
    ys = torch.randn(steps, torch_worker.GLOBAL_BATCH, 3, generator=gen, dtype=torch.float64).to(dtype)
    out = {}
    for how in ("full", "mean"):
        net = torch_worker.model().to(dtype)
        opt = getattr(pt, cls)(net.named_parameters(), **kwargs)
        for x, y in zip(xs, ys):
            opt.zero_grad()
            if how == "full":
                torch_worker.loss_fn(net, x, y).backward()
            else:
                grads = []
                for r in range(WORLD):
                    net.zero_grad()
                    torch_worker.loss_fn(net, torch_worker.shard(x, r, WORLD), torch_worker.shard(y, r, WORLD)).backward()
                    grads.append([p.grad.clone() for p in net.parameters()])
                for p, *gs in zip(net.parameters(), *grads):
                    p.grad = sum(gs[1:], gs[0]) / WORLD
            opt.step()
        out[how] = torch.cat([p.detach().reshape(-1).double() for p in net.parameters()])
    return float(torch.linalg.vector_norm(out["mean"] - out["full"]) / torch.linalg.vector_norm(out["full"]))


def jax_runs(name: str, dtype, steps: int) -> float:
    factory, kwargs, extra = jax_worker.METHODS[name]
    params, _, _ = jax_worker.problem()
    k = jax.random.split(jax.random.PRNGKey(1), 2)
    xs = jax.random.normal(k[0], (steps, jax_worker.B, 8))
    ys = jax.random.normal(k[1], (steps, jax_worker.B, 4))
    params, xs, ys = jax.tree.map(lambda a: a.astype(dtype), (params, xs, ys))
    devices = jax.devices()
    mesh = Mesh(devices, ("x",))
    shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), jax_worker.SPECS)
    opt = factory(**kwargs)
    one, _, _, _ = jax_worker.train(opt, extra, jax.device_put(params, devices[0]), xs, ys)
    many, _, _, _ = jax_worker.train(opt, extra, jax.device_put(params, shardings), xs, ys)
    a = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(many)])
    b = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(one)])
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    torch.set_num_threads(1)
    eps32, eps64 = float(np.finfo(np.float32).eps), float(np.finfo(np.float64).eps)
    print(f"relative parameter difference after {steps} steps (and / eps of the dtype)")
    print(f"{'method':<11} {'torch f32':>18} {'torch f64':>18} {'jax f32':>18} {'jax f64':>18}")
    for name in jax_worker.METHODS:
        row = [
            torch_runs(name, torch.float32, steps), torch_runs(name, torch.float64, steps),
            jax_runs(name, np.float32, steps), jax_runs(name, np.float64, steps),
        ]
        cells = [f"{v:8.1e} ({v / e:6.0f})" for v, e in zip(row, (eps32, eps64, eps32, eps64))]
        print(f"{name:<11} " + " ".join(f"{c:>18}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
