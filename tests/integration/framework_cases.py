"""Shared pieces of the framework integration tests: the optimizers, a tiny model and its data.

Every test here trains a tiny float32 model for a few steps on CPU, twice (uninterrupted, and
interrupted then resumed through the framework's own checkpointing), and compares the losses and
the final parameters exactly: a resume that restores everything the step reads continues with the
very same arithmetic, so the two runs must agree bit for bit.
"""

from __future__ import annotations

import pytest
import torch

import precond_ref.adapters.torch as pt

# (id, class, keyword arguments): small intervals so that refreshes happen on both sides of the
# interruption; the root-free methods get a fixed batch_size (the same B in every framework's run
# and in the plain loop it is compared with).
TORCH_OPTIMIZERS = {
    "agd": (pt.AGD, dict(lr=1e-2)),
    "mbf": (pt.MBF, dict(lr=1e-2, damping=0.1, statistics_every=1, precondition_every=3)),
    "asgo": (pt.ASGO, dict(lr=1e-2, precondition_every=3)),
    "dasgo": (pt.DASGO, dict(lr=1e-2)),
    "if_shampoo": (pt.IFShampoo, dict(lr=1e-2, batch_size=4, precondition_every=3)),
    "rf_rmsprop": (pt.RFRMSProp, dict(lr=1e-2, batch_size=4)),
    "rf_adamw": (pt.RFAdamW, dict(lr=1e-2, batch_size=4)),
    "sketchy": (pt.Sketchy, dict(lr=1e-2, rank=2, precondition_every=3)),
    "s_adagrad": (pt.SAdaGrad, dict(lr=1e-2, rank=2)),
}
# The representative few for the costlier frameworks: the element-wise method, the paired
# block method, a matrix-root method and a root-free Kronecker method.
REPRESENTATIVE = ["agd", "mbf", "asgo", "if_shampoo"]



def make_optimizer(name: str, named_parameters) -> torch.optim.Optimizer:
    cls, kwargs = TORCH_OPTIMIZERS[name]
    return cls(named_parameters, **kwargs)


def make_mlp(seed: int = 0) -> torch.nn.Module:
    """A 4-8-1 tanh MLP in float32, the same weights for the same seed."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 8, dtype=torch.float32), torch.nn.Tanh(), torch.nn.Linear(8, 1, dtype=torch.float32)
    )


def batches(count: int, size: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` fixed regression batches (inputs, targets), float32."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(count, size, 4, generator=g, dtype=torch.float32)
    y = torch.randn(count, size, 1, generator=g, dtype=torch.float32)
    return list(zip(x, y))


def parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_parameters(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), (k, (a[k] - b[k]).abs().max().item())
