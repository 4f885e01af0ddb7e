"""Layout rules the engine applies to a tree of leaves before a method sees them: which leaves
form one block (a weight with its bias)."""

from __future__ import annotations

from typing import Any, Sequence

from ..transform import LeafGroup
from ..tree import Path, path_str

__all__ = ["weight_bias_groups"]

Array = Any


def weight_bias_groups(
    paths: Sequence[Path], leaves: Sequence[Array], *, kernel_out_last: bool = True
) -> list[LeafGroup]:
    """Pair each 2-D ``weight`` (out-first) or ``kernel`` (out-last) with its sibling ``bias``.

    The pairing rule of specs README section 5, shared by the methods that treat a layer's
    weight and bias as one block (MBF's homogeneous column, IF-Shampoo's ``grouping="weight_bias"``).
    A sibling ``bias`` is paired when it is 1-D with length equal to the weight's output size
    (``weight.shape[0]``; ``kernel.shape[-1]`` for Flax's out-last ``kernel``); every other leaf is
    a group of its own. Group keys are the path strings of the weights; groups are ordered by the
    position of their first member. ``kernel_out_last=False`` reads ``kernel`` leaves as out-first
    (for a caller that has already canonicalised them).
    """
    index = {tuple(path): i for i, path in enumerate(paths)}
    bias_of: dict[int, int] = {}
    for i, path in enumerate(paths):
        if not path or path[-1] not in ("weight", "kernel") or len(leaves[i].shape) != 2:
            continue
        j = index.get(tuple(path[:-1]) + ("bias",))
        if j is None or len(leaves[j].shape) != 1:
            continue
        out_last = kernel_out_last and path[-1] == "kernel"
        if leaves[j].shape[0] == leaves[i].shape[-1 if out_last else 0]:
            bias_of[i] = j
    paired = set(bias_of.values())
    groups = []
    for i, path in enumerate(paths):
        if i in paired:
            continue
        if i in bias_of:
            j = bias_of[i]
            groups.append(LeafGroup(path_str(path), (i, j), (path, paths[j])))
        else:
            groups.append(LeafGroup(path_str(path), (i,), (path,)))
    return groups
