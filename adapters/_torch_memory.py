"""A torch optimizer whose step would not fit in memory is refused when it is made.

The state's size comes from the core's own ``init`` run on meta-device copies of the parameters
(shapes and dtypes, no memory), so the estimate is the layout the first step will allocate, for
every method and setting. To it is added what a step holds beside the state (:func:`step_bytes`):
for S-AdaGrad the new arrays of its sketches within ``precond_ref.sketch.FD_ROWS_BYTES`` and the FD
step's workspace (a larger sketch is stepped by row blocks, its basis rewritten in place); for the
other methods the state's largest single array, written anew. The sum is compared with the memory
free on the parameters' device at construction (on the CPU ``MemAvailable``, on CUDA
``torch.cuda.mem_get_info``); elsewhere (the meta device, MPS, XLA) and for the sharded classes of
``torch_distributed`` nothing is checked. Only optimizers of at least ``CHECK_FROM_ELEMENTS``
parameter elements are checked: a smaller one's step fits wherever its parameters do, and the
estimate costs an ``init`` per construction.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from precond_ref import sketch
from precond_ref.engine import axes
from precond_ref.tree import tree_flatten, tree_unflatten

__all__ = ["CHECK_FROM_ELEMENTS", "available_bytes", "state_bytes", "state_arrays", "step_bytes", "check_state_fits"]

#: Parameter elements from which construction estimates the state (2**24: 64 MiB of float32).
CHECK_FROM_ELEMENTS = 2**24

#: What lowers each method's state, named in the refusal.
_REMEDIES = {
    "SAdaGrad": "its sketch holds rank x the parameter's elements: lower rank, or give some tensors to another optimizer",
    "Sketchy": "its sketches hold rank x each axis's length: lower rank or max_precondition_dim",
    "IFShampoo": "its factors and their momenta hold about twice the parameters (bf16, in block_size tiles): "
                 "preconditioner_momentum=0 (no factor momenta), or structures='diagonal'",
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


def state_arrays(transform: Any, tree: Any) -> dict[str, dict[str, tuple]]:
    """``{leaf: {entry: (shape, bytes)}}`` of the state arrays ``transform.init(tree)`` makes (its
    0-D counters aside), computed on meta copies of ``tree``'s tensors."""
    leaves, treedef = tree_flatten(tree)
    meta = tree_unflatten(treedef, [torch.empty_like(p, device="meta") for p in leaves])
    return {leaf: {key: (tuple(a.shape), a.numel() * a.element_size()) for key, a in entries.items()
                   if isinstance(a, torch.Tensor)}
            for leaf, entries in transform.init(meta).groups.items()}


def state_bytes(transform: Any, tree: Any) -> int:
    """Bytes of the state arrays ``transform.init(tree)`` makes (its 0-D counters aside), computed
    on meta copies of ``tree``'s tensors."""
    return sum(nbytes for entries in state_arrays(transform, tree).values() for _, nbytes in entries.values())


def step_bytes(name: str, arrays: dict[str, dict[str, tuple]], device: torch.device) -> int:
    """A bound on the bytes a step of the optimizer class ``name`` holds beside its state
    (``arrays``: :func:`state_arrays`) on ``device``.

    S-AdaGrad (``SAdaGrad``): a sketch whose basis (d, k) exceeds ``sketch.FD_ROWS_BYTES`` takes its
    FD step by blocks of rows and writes its new basis over the old one: two blocks of at most that
    many bytes (the frame [U, fresh] and its product) and about eight vectors of length d; the other
    sketches are stepped in stacks of at most ``engine.axes.FLAT_STACK_BYTES`` (CPU) or
    ``FLAT_ACCELERATOR_STACK_BYTES`` of basis, each holding its stacked input and its frame, and make
    new arrays for every entry. So: the new entries of every sketch within the bound (and every other
    entry) plus the largest of these workspaces. Any other class: its largest single state array,
    which a step writes anew while the old one is alive.
    """
    entries = [(key, shape, nbytes) for leaf in arrays.values() for key, (shape, nbytes) in leaf.items()]
    if not entries:
        return 0
    if name != "SAdaGrad":
        return max(nbytes for _, _, nbytes in entries)
    in_place = [(shape, nbytes) for key, shape, nbytes in entries
                if key.endswith("/basis") and nbytes > sketch.FD_ROWS_BYTES]
    itemsize = max(nbytes // max(1, math.prod(shape)) for _, shape, nbytes in entries)
    longest = max(shape[-2] for key, shape, _ in entries if key.endswith("/basis"))
    new = sum(nbytes for _, _, nbytes in entries) - sum(nbytes for _, nbytes in in_place)
    stack_limit = axes.FLAT_STACK_BYTES if device.type == "cpu" else axes.FLAT_ACCELERATOR_STACK_BYTES
    within = sum(nbytes for key, _, nbytes in entries if key.endswith("/basis") and nbytes <= sketch.FD_ROWS_BYTES)
    stacked = 2 * min(stack_limit, within)
    rows = 2 * sketch.FD_ROWS_BYTES if in_place else 0
    return new + max(stacked, rows) + 8 * longest * itemsize


def check_state_fits(opt: Any) -> None:
    """Raise ``MemoryError`` when ``opt``'s state for its parameters plus what its step holds beside
    it (:func:`step_bytes`) exceeds the free memory of their device, with the estimate (state and
    step), the free memory, the leaf with the largest state and what lowers the state."""
    if getattr(opt, "_accepts_dtensor", False):
        return  # sharded parameters: each rank holds a shard of the state, not estimated here
    groups = [g for g in opt.param_groups if g["params"]]
    if sum(p.numel() for g in groups for p in g["params"]) < CHECK_FROM_ELEMENTS:
        return
    name = type(opt).__name__
    arrays: dict[torch.device, dict] = {}
    params: dict[torch.device, int] = {}
    for group, paths in zip(opt.param_groups, opt._group_paths()):
        if not group["params"]:
            continue
        device = group["params"][0].device
        transform = opt._transform(group)
        arrays.setdefault(device, {}).update(state_arrays(transform, opt._tree(paths, [p.detach() for p in group["params"]])))
        params[device] = params.get(device, 0) + sum(p.numel() * p.element_size() for p in group["params"])
    for device, leaves in arrays.items():
        free = available_bytes(device)
        if free is None:
            continue
        state = sum(nbytes for entries in leaves.values() for _, nbytes in entries.values())
        step = step_bytes(name, leaves, device)
        if state + step > free:
            largest = max(leaves, key=lambda leaf: sum(nbytes for _, nbytes in leaves[leaf].values()))
            largest_bytes = sum(nbytes for _, nbytes in leaves[largest].values())
            remedy = _REMEDIES.get(name, "precondition fewer or smaller tensors with it")
            raise MemoryError(
                f"{name}: the state for these parameters needs about {state / 2**30:.1f} GiB ({state / params[device]:.2f}x "
                f"the parameters' {params[device] / 2**30:.2f} GiB; the most, {largest_bytes / 2**30:.2f} GiB, for parameter "
                f"{largest.replace('/', '.')!r}) and a step about {step / 2**30:.1f} GiB more beside it, "
                f"{(state + step) / 2**30:.1f} GiB in all, more than the {free / 2**30:.1f} GiB of memory free on "
                f"{device}; {remedy}"
            )
