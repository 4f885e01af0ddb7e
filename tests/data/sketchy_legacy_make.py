"""Makes tests/data/sketchy_legacy_{torch.pt,core.pkl}: Sketchy / S-AdaGrad states saved by precond_ref
at main 2fdbd40 (state entries under formatted keys ``axis{n}_{name}`` / ``axis{n}_run{j}_{name}``), and
the parameters of the next steps. Run with the OLD code first on the path:

    git worktree add --detach /tmp/old 2fdbd40
    PYTHONPATH=/tmp/old python tests/data/sketchy_legacy_make.py tests/data

Read by tests/methods/test_sketchy_legacy.py.
"""

import copy
import pickle
import sys

import numpy as np
import torch

import precond_ref as pr
from precond_ref.adapters import torch as pt

SAVED_AFTER, NEXT = 3, 3
# (10, 3): axis 0 cut into blocks 4, 4, 2 (two runs); (3, 4): no axis cut; (10,): graft only.
SKETCHY_SHAPES = {"cut": (10, 3), "whole": (3, 4), "bias": (10,)}
SKETCHY_OPTIONS = dict(rank=2, block_size=4, precondition_every=2, merge_dims=2)
# 20 entries in blocks 7, 7, 6 (two runs); 6 entries in one block.
S_ADAGRAD_SHAPES = {"cut": (4, 5), "whole": (2, 3)}
S_ADAGRAD_OPTIONS = dict(rank=2, block_size=7, momentum=0.5)


def gradients(shapes, steps, seed):
    rng = np.random.default_rng(seed)
    return [{k: rng.standard_normal(s) for k, s in shapes.items()} for _ in range(steps)]


def torch_case(cls, shapes, options, seed):
    rng = np.random.default_rng(seed + 100)
    params = {k: torch.nn.Parameter(torch.tensor(rng.standard_normal(s), dtype=torch.float64)) for k, s in shapes.items()}
    opt = cls(list(params.values()), lr=1e-2, **options)
    grads = gradients(shapes, SAVED_AFTER + NEXT, seed)

    def step(g):
        for k, p in params.items():
            p.grad = torch.tensor(g[k], dtype=torch.float64)
        opt.step()

    for g in grads[:SAVED_AFTER]:
        step(g)
    saved = {"state_dict": copy.deepcopy(opt.state_dict()),  # the live tensors change in place
              "params": {k: p.detach().clone() for k, p in params.items()}}
    after = []
    for g in grads[SAVED_AFTER:]:
        step(g)
        after.append({k: p.detach().clone() for k, p in params.items()})
    saved.update(grads=[{k: torch.tensor(v) for k, v in g.items()} for g in grads[SAVED_AFTER:]], after=after)
    return saved


def core_case(factory, shapes, options, seed):
    rng = np.random.default_rng(seed + 100)
    params = {k: rng.standard_normal(s) for k, s in shapes.items()}
    tx = factory(learning_rate=1e-2, **options)
    state = tx.init(params)
    grads = gradients(shapes, SAVED_AFTER + NEXT, seed)
    for g in grads[:SAVED_AFTER]:
        u, state = tx.update(g, state, params)
        params = {k: params[k] + u[k] for k in params}
    saved = {"state": state, "params": params}
    after = []
    for g in grads[SAVED_AFTER:]:
        u, state = tx.update(g, state, params)
        params = {k: params[k] + u[k] for k in params}
        after.append(params)
    saved.update(grads=grads[SAVED_AFTER:], after=after)
    return saved


if __name__ == "__main__":
    out = sys.argv[1]
    torch.save({
        "sketchy": torch_case(pt.Sketchy, SKETCHY_SHAPES, SKETCHY_OPTIONS, 0),
        "s_adagrad": torch_case(pt.SAdaGrad, S_ADAGRAD_SHAPES, S_ADAGRAD_OPTIONS, 1),
    }, f"{out}/sketchy_legacy_torch.pt")
    with open(f"{out}/sketchy_legacy_core.pkl", "wb") as f:
        pickle.dump({
            "sketchy": core_case(pr.sketchy, SKETCHY_SHAPES, SKETCHY_OPTIONS, 0),
            "s_adagrad": core_case(pr.s_adagrad, S_ADAGRAD_SHAPES, S_ADAGRAD_OPTIONS, 1),
        }, f)
