"""Makes the checkpoint fixtures of IF-Shampoo's state-name migration (tests/methods/test_if_shampoo_state.py).

Run WITH THE OLD CODE (main 2fdbd40, the last version whose state entries were formatted keys
``factor_n``, ``factor_momentum_n``, ``tile_t/factor_n``, ``momentum_n``), e.g.::

    git worktree add --detach /tmp/old 2fdbd40
    mkdir /tmp/oldpkg && cp -r /tmp/old/precond_ref /tmp/oldpkg/ && cp -r /tmp/old/adapters /tmp/oldpkg/precond_ref/adapters
    PYTHONPATH=/tmp/oldpkg python tests/data/if_shampoo_legacy_make.py tests/data

It trains, in float64, a tiny model whose groups cover every old layout (block_size=4): a weight+bias
group cut into ragged tiles, a weight cut into equal tiles, an unblocked 1-D leaf, and a
weight+bias group squeezed to one axis; then saves

* ``if_shampoo_legacy_torch.pt``: torch ``state_dict()`` of the principled and the faithful
  optimizer after ``N0`` steps, the parameters then, the batches of the next ``K`` steps and the
  parameters after each of them;
* ``if_shampoo_legacy_core.npz``: the core ``PrecondState`` (NumPy arrays) of ``pr.if_shampoo`` on a
  parameter tree after ``N0`` steps of a quadratic, as flat entries ``group::name``, and the
  parameters after each of the next ``K`` steps.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import torch

import precond_ref as pr
from precond_ref.adapters import torch as pt
from precond_ref.tree import path_str, tree_flatten, tree_map

N0, K, BATCH = 5, 4, 16
TORCH_KW = {"principled": dict(block_size=4), "faithful": dict(mode="faithful")}


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = torch.nn.Linear(6, 8, dtype=torch.float64)  # (8, 7) with its bias: ragged tiles 4+4 x 4+3
        self.l2 = torch.nn.Linear(8, 8, bias=False, dtype=torch.float64)  # 2 x 2 equal tiles
        self.scale = torch.nn.Parameter(torch.linspace(0.5, 1.5, 4, dtype=torch.float64))  # unblocked
        self.l3 = torch.nn.Linear(8, 1, dtype=torch.float64)  # (1, 9) squeezed to (9,): tiles 4+4+1

    def forward(self, x):
        h = torch.tanh(self.l2(torch.tanh(self.l1(x))))
        return self.l3(h * self.scale.repeat(2))


def batches(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(BATCH, 6, generator=g, dtype=torch.float64),
             torch.randn(BATCH, 1, generator=g, dtype=torch.float64)) for _ in range(n)]


def train(model, opt, data):
    after = []
    for x, y in data:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        after.append([p.detach().clone() for p in model.parameters()])
    return after


def make_torch(torch_kw: dict = TORCH_KW) -> dict:
    """Each mode's state_dict and parameters after N0 steps, and the parameters after K more."""
    out = {"batches": batches(K, 1)}
    for mode, kw in torch_kw.items():
        torch.manual_seed(0)
        model = Tiny()
        opt = pt.IFShampoo(model.named_parameters(), lr=1e-2, batch_size=BATCH, grouping="weight_bias", **kw)
        train(model, opt, batches(N0, 0))
        out[mode] = {
            "state_dict": copy.deepcopy(opt.state_dict()),  # the optimizer updates its state in place
            "params": [p.detach().clone() for p in model.parameters()],
            "after": train(model, opt, out["batches"]),
        }
    return out


def core_params():
    rng = np.random.default_rng(2)
    return {
        "l1": {"weight": rng.standard_normal((8, 6)), "bias": rng.standard_normal(8)},
        "l2": {"weight": rng.standard_normal((8, 8))},
        "scale": rng.standard_normal(4),
    }


def flat(tree, tag: str) -> dict:
    leaves, treedef = tree_flatten(tree)
    return {f"{tag}::{path_str(path)}": leaf for path, leaf in zip(treedef.paths, leaves)}


def grads(params, step: int):
    """The gradient of ½Σ‖w − c‖² with c drawn per step (a moving target)."""
    rng = np.random.default_rng(100 + step)
    return tree_map(lambda w: w - rng.standard_normal(w.shape), params)


CORE_KW = dict(learning_rate=1e-2, batch_size=BATCH, block_size=4, grouping="weight_bias")


def make_core(core_kw: dict = CORE_KW) -> dict:
    """The core state and parameters after N0 steps of ``if_shampoo(**core_kw)``, and the parameters after K more."""
    opt = pr.if_shampoo(**core_kw)
    params = core_params()

    state = opt.init(params)
    for step in range(N0):
        updates, state = opt.update(grads(params, step), state, params)
        params = pr.apply_updates(params, updates)
    out = {"count": np.asarray(state.count), "nonfinite_count": np.asarray(state.nonfinite_count)}
    for group, entries in state.groups.items():
        for name, value in entries.items():
            out[f"state::{group}::{name}"] = np.asarray(value)
    out.update(flat(params, "params"))
    for step in range(N0, N0 + K):
        updates, state = opt.update(grads(params, step), state, params)
        params = pr.apply_updates(params, updates)
        out.update(flat(params, f"after{step - N0}"))
    return out


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent)
    torch.save(make_torch(), folder / "if_shampoo_legacy_torch.pt")
    np.savez(folder / "if_shampoo_legacy_core.npz", **make_core())
