"""Container objects (tracked by the cyclic collector) that one eager step makes and that are still
alive after it, by type: what each step promotes towards the old generation (2 x 400 Linear(8, 8))."""
import collections, gc, sys, warnings

import torch

import precond_ref.adapters.torch as pt

warnings.simplefilter("ignore")
name = sys.argv[1]
m = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(400)])
kw = {"batch_size": 4} if name == "IFShampoo" else {}
opt = getattr(pt, name)(m.named_parameters(), compile=False, **kw)
for p in m.parameters():
    p.grad = torch.randn_like(p) * 1e-2
opt.step(); opt.step()
gc.collect(); gc.disable()
before = {id(o) for o in gc.get_objects()}
opt.step()
new = [o for o in gc.get_objects() if id(o) not in before]
gc.enable()
print(name, len(new), "per parameter:", round(len(new) / 800, 1), collections.Counter(type(o).__name__ for o in new).most_common(6))
