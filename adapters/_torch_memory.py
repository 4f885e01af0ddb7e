"""A torch optimizer whose state alone would not fit in memory is refused when it is made.

The state's size comes from the core's own ``init`` run on meta-device copies of the parameters
(shapes and dtypes, no memory), so the estimate is the layout the first step will allocate, for
every method and setting. It is compared with the memory free on the parameters' device at
construction (on the CPU ``MemAvailable``, on CUDA ``torch.cuda.mem_get_info``); elsewhere (the
meta device, MPS, XLA) and for the sharded classes of ``torch_distributed`` nothing is checked. Only optimizers of at least ``CHECK_FROM_ELEMENTS``
parameter elements are checked: a smaller one's state fits wherever its parameters do, and the
estimate costs an ``init`` per construction.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from precond_ref.tree import tree_flatten, tree_unflatten

__all__ = ["CHECK_FROM_ELEMENTS", "available_bytes", "state_bytes", "check_state_fits"]

#: Parameter elements from which construction estimates the state (2**24: 64 MiB of float32).
CHECK_FROM_ELEMENTS = 2**24

#: What lowers each method's state, named in the refusal.
_REMEDIES = {
    "SAdaGrad": "its sketch holds rank x the parameter's elements: lower rank, or give some tensors to another optimizer",
    "Sketchy": "its sketches hold rank x each axis's length: lower rank or max_precondition_dim",
    "IFShampoo": "its factors are dense up to max_dense_dim per axis: lower max_dense_dim or factor_dtype=torch.bfloat16",
}


def available_bytes(device: torch.device) -> Optional[int]:
    """Memory free on ``device`` now, or None where it cannot be known."""
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as info:
                for line in info:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return None


def state_bytes(transform: Any, tree: Any) -> int:
    """Bytes of the state arrays ``transform.init(tree)`` makes (its 0-D counters aside), computed
    on meta copies of ``tree``'s tensors."""
    leaves, treedef = tree_flatten(tree)
    meta = tree_unflatten(treedef, [torch.empty_like(p, device="meta") for p in leaves])
    arrays = [a for entries in transform.init(meta).groups.values() for a in entries.values()]
    return sum(a.numel() * a.element_size() for a in arrays if isinstance(a, torch.Tensor))


def check_state_fits(opt: Any) -> None:
    """Raise ``MemoryError`` when ``opt``'s state for its parameters exceeds the free memory of
    their device, with the estimate, the free memory and what lowers the state."""
    if getattr(opt, "_accepts_dtensor", False):
        return  # sharded parameters: each rank holds a shard of the state, not estimated here
    groups = [g for g in opt.param_groups if g["params"]]
    if sum(p.numel() for g in groups for p in g["params"]) < CHECK_FROM_ELEMENTS:
        return
    needed: dict[torch.device, int] = {}
    params: dict[torch.device, int] = {}
    for group, paths in zip(opt.param_groups, opt._group_paths()):
        if not group["params"]:
            continue
        device = group["params"][0].device
        transform = opt._transform(group)
        needed[device] = needed.get(device, 0) + state_bytes(transform, opt._tree(paths, [p.detach() for p in group["params"]]))
        params[device] = params.get(device, 0) + sum(p.numel() * p.element_size() for p in group["params"])
    name = type(opt).__name__
    for device, nbytes in needed.items():
        free = available_bytes(device)
        if free is not None and nbytes > free:
            remedy = _REMEDIES.get(name, "precondition fewer or smaller tensors with it")
            raise MemoryError(
                f"{name}: the state for these parameters needs about {nbytes / 2**30:.1f} GiB "
                f"({nbytes / params[device]:.2f}x the parameters' {params[device] / 2**30:.2f} GiB), more than the "
                f"{free / 2**30:.1f} GiB of memory free on {device}; {remedy}"
            )
