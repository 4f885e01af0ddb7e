"""The optimizer these scripts time: class ``name`` (``sys.argv[1]``) eager (``compile=False``) over
``nn.Sequential`` of 400 ``Linear(8, 8)`` (800 tensors), its gradients set, after two steps."""
import sys
import warnings

import torch

import precond_ref.adapters.torch as pt

warnings.simplefilter("ignore")


def stepped_optimizer():
    name = sys.argv[1]
    m = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(400)])
    kw = {"batch_size": 4} if name == "IFShampoo" else {}
    opt = getattr(pt, name)(m.named_parameters(), compile=False, **kw)
    for p in m.parameters():
        p.grad = torch.randn_like(p) * 1e-2
    opt.step(); opt.step()
    return name, opt
