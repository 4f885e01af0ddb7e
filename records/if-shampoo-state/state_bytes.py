"""Byte table of IF-Shampoo's state at GPT-2-small, by leaf kind and entry kind (meta device)."""
import sys, json, collections
import torch
import precond_ref.adapters.torch as pt
from precond_ref.tree import tree_flatten, tree_unflatten
from precond_ref.benchmarks.scale import gpt2_small_shapes

kwargs = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
if "structures" in kwargs and isinstance(kwargs["structures"], dict): kwargs["structures"] = {int(k): v for k, v in kwargs["structures"].items()}
for k, v in list(kwargs.items()):
    if v == "bfloat16": kwargs[k] = torch.bfloat16
with torch.device("meta"):
    named = [(n, torch.nn.Parameter(torch.empty(s, dtype=torch.float32))) for n, s in gpt2_small_shapes()]
pbytes = sum(p.numel() * 4 for _, p in named)
opt = pt.IFShampoo(named, lr=1e-3, batch_size=8, **kwargs)
table = collections.Counter()
for group, paths in zip(opt.param_groups, opt._group_paths()):
    tree = opt._tree(paths, [p.detach() for p in group["params"]])
    leaves, treedef = tree_flatten(tree)
    meta = tree_unflatten(treedef, [torch.empty_like(p, device="meta") for p in leaves])
    state = opt._transform(group).init(meta)
    shape_of = {"/".join(p): tuple(t.shape) for p, t in zip(paths, group["params"])}
    for gkey, entries in state.groups.items():
        shp = shape_of[gkey]
        for key, a in entries.items():
            if not isinstance(a, torch.Tensor):
                continue
            name = str(gkey)
            if len(shp) == 1: kind = "1-D (biases, LN)"
            elif "wte" in name or "wpe" in name: kind = "embeddings"
            else: kind = "2-D blocks"
            ek = "param momentum" if key.startswith("momentum") else ("factor momentum" if "factor_momentum" in key else ("factors" if "factor/" in key else key))
            if ek in ("factors", "factor momentum") and a.shape[-1] != 64:
                ek += " (partial tiles)"
            table[(kind, ek, str(a.dtype).replace("torch.", ""))] += a.numel() * a.element_size()
total = sum(table.values())
print(f"kwargs={kwargs} total {total/pbytes:.4f}x ({total/2**30:.3f} GiB over {pbytes/2**30:.3f} GiB params)")
for (kind, ek, dt), b in sorted(table.items()):
    print(f"| {kind} | {ek} | {dt} | {b/2**20:.2f} MiB | {b/pbytes:.5f}x | {100*b/total:.1f}% |")
