"""Layout rules the engine applies to a tree of leaves before a method sees them: which leaves
form one block (a weight with its bias), and such a group as the one tensor a method
preconditions (the bias an extra column of an out-first weight, an extra row of an out-last one);
and the hint for a state whose statistics were saved in other blocks (:func:`saved_blocks_hint`)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from .._backend import cast
from ..transform import LeafGroup
from ..tree import Path, path_str

__all__ = ["weight_bias_groups", "grouped_shape", "group_tensor", "ungroup_tensor", "saved_blocks_hint"]

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


def grouped_shape(shapes: Sequence[tuple], out_first: bool) -> tuple[tuple, tuple]:
    """(unsqueezed, squeezed) shape of the tensor a group preconditions (bias as an extra column/row)."""
    if len(shapes) == 1:
        full = tuple(shapes[0])
    else:
        rows, cols = shapes[0]
        full = (rows, cols + 1) if out_first else (rows + 1, cols)
    squeezed = tuple(d for d in full if d != 1) or (1,)
    return full, squeezed


def group_tensor(xp, leaves, full, squeezed, out_first: bool, dtype):
    """A group's leaves (a weight, or a weight and its bias) as one tensor of shape ``squeezed`` in
    ``dtype`` (:func:`grouped_shape`)."""
    leaves = [cast(xp, x, dtype) for x in leaves]
    if len(leaves) == 1:
        return leaves[0] if tuple(leaves[0].shape) == squeezed else xp.reshape(leaves[0], squeezed)
    weight, bias = leaves
    if out_first:
        grouped = xp.concat([weight, xp.reshape(bias, (full[0], 1))], axis=1)
    else:
        grouped = xp.concat([weight, xp.reshape(bias, (1, full[1]))], axis=0)
    return xp.reshape(grouped, squeezed)


def ungroup_tensor(xp, grouped, shapes, full, out_first: bool):
    """The inverse of :func:`group_tensor`: the members of ``shapes`` cut back out of ``grouped``."""
    if len(shapes) == 1:
        return (grouped if tuple(grouped.shape) == tuple(shapes[0]) else xp.reshape(grouped, shapes[0]),)
    grouped = xp.reshape(grouped, full)
    rows, cols = shapes[0]
    if out_first:
        weight, bias = grouped[:, :cols], grouped[:, cols]
    else:
        weight, bias = grouped[:rows, :], grouped[rows, :]
    return weight, xp.reshape(bias, shapes[1])


def saved_blocks_hint(found: dict[str, tuple], layout: dict[str, tuple], settings: Callable[[tuple], str]) -> str:
    """``build_transform``'s ``layout_hint`` of a layout of blocked statistics: for a state whose
    ``statistic`` entries (``found``, ``{entry: (shape, dtype)}``) are not the blocks these settings
    make (``layout``), one saved with other block settings: both, and ``settings(shape)``, the
    arguments that continue it, from its ``statistic``'s shape."""
    have, want = ({k: v[0] for k, v in entries.items() if k.startswith("statistic")} for entries in (found, layout))
    if have == want or "statistic" not in have or "statistic" not in want:
        return ""
    return (f" Or a state saved with other block settings: its statistic blocks are {have}, these settings make "
            f"{want}; build the optimizer with {settings(have['statistic'])} to continue from it")
