"""Layout rules the engine applies to a tree of leaves before a method sees them: which leaves
form one block (a weight with its bias), and such a group as the one tensor a method
preconditions (the bias an extra column of an out-first weight, an extra row of an out-last one);
and the hint for a state whose statistics were saved in other blocks (:func:`saved_blocks_hint`)."""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

from .._backend import cast
from ..transform import LeafGroup
from ..tree import Path, path_str

__all__ = ["weight_bias_groups", "layer_member", "unpaired_biases", "grouped_shape", "group_tensor", "ungroup_tensor",
           "saved_blocks_hint"]

Array = Any


# Where torch keeps the tensor a layer's ``weight`` (or ``bias``) is computed from, when the layer
# attribute is not a parameter itself: the one tensor of a parametrization
# (``torch.nn.utils.parametrize``: ``<layer>.parametrizations.<name>.original``) and the ``<name>_orig``
# of the hook-based ``torch.nn.utils.spectral_norm``. The pairing reads such a tensor as the layer's
# ``<name>`` (it is the tensor the optimizer steps; its shape is checked as the weight's would be).
_ORIG = ("weight_orig", "kernel_orig")
# The tensors a multi-tensor weight parametrization keeps instead of the weight (``original0``,
# ``original1``, ... of ``torch.nn.utils.parametrizations.weight_norm``; ``weight_g``/``weight_v`` of
# the hook-based ``torch.nn.utils.weight_norm``): none of them is the weight, so none is paired.
_SPLIT_WEIGHT = re.compile(r"original\d+")
_SPLIT_HOOK = ("weight_g", "weight_v")


def layer_member(path: Path) -> tuple[tuple, Any]:
    """``(layer path, member name)`` of a leaf as the weight/bias pairing reads it: the leaf's parent
    and last key, or for the tensor of a single-tensor parametrization
    (``(*layer, "parametrizations", name, "original")``) or of the hook-based spectral norm
    (``(*layer, "weight_orig")``) the layer and the name of the tensor computed from it."""
    path = tuple(path)
    if len(path) >= 3 and path[-3] == "parametrizations" and path[-1] == "original":
        return path[:-3], path[-2]
    if path and path[-1] in _ORIG:
        return path[:-1], path[-1][: -len("_orig")]
    return path[:-1], (path[-1] if path else None)


def weight_bias_groups(
    paths: Sequence[Path], leaves: Sequence[Array], *, kernel_out_last: bool = True
) -> list[LeafGroup]:
    """Pair each 2-D ``weight`` (out-first) or ``kernel`` (out-last) with its sibling ``bias``.

    The pairing rule of specs README section 5, shared by the methods that treat a layer's
    weight and bias as one block (MBF's homogeneous column, IF-Shampoo's ``grouping="weight_bias"``).
    A sibling ``bias`` is paired when it is 1-D with length equal to the weight's output size
    (``weight.shape[0]``; ``kernel.shape[-1]`` for Flax's out-last ``kernel``); every other leaf is
    a group of its own. A layer's weight or bias may also be the tensor of a single-tensor torch
    parametrization (``layer/parametrizations/weight/original``, as ``spectral_norm`` and
    ``orthogonal`` make) or of the hook-based ``spectral_norm`` (``layer/weight_orig``): it is
    paired as the plain ``weight`` would be (:func:`layer_member`); a plain ``weight``/``bias``
    leaf of the layer comes first. Group keys are the path strings of the weights; groups are
    ordered by the position of their first member. ``kernel_out_last=False`` reads ``kernel``
    leaves as out-first (for a caller that has already canonicalised them).
    """
    member: dict[tuple, int] = {}
    for plain in (True, False):  # a plain leaf named weight/bias is the layer's, before any alias
        for i, path in enumerate(paths):
            layer, name = layer_member(path)
            if (layer + (name,) == tuple(path)) == plain:
                member.setdefault((layer, name), i)
    bias_of: dict[int, int] = {}
    for (layer, name), i in member.items():
        if name not in ("weight", "kernel") or len(leaves[i].shape) != 2:
            continue
        j = member.get((layer, "bias"))
        if j is None or len(leaves[j].shape) != 1:
            continue
        out_last = kernel_out_last and name == "kernel"
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


def unpaired_biases(paths: Sequence[Path], leaves: Sequence[Array]) -> list[tuple[tuple, list[tuple]]]:
    """The layers whose 1-D ``bias`` :func:`weight_bias_groups` leaves as a group of its own because
    the layer's weight is kept as several tensors, none of them the weight: a multi-tensor torch
    parametrization (``layer/parametrizations/weight/original0``, ``original1``, ...: ``weight_norm``'s
    magnitude and direction) or the hook-based ``weight_norm`` (``layer/weight_g``, ``layer/weight_v``).
    Where none of those tensors has 3 or more axes (a linear layer's, whose plain weight would be
    paired; a convolution's weight never is), as ``(layer path, [paths of those tensors])``, in tree
    order: what an adapter names in a warning."""
    bias_alone = set()
    for group in weight_bias_groups(paths, leaves):
        layer, name = layer_member(group.paths[0])
        if len(group.indices) == 1 and name == "bias" and len(leaves[group.indices[0]].shape) == 1:
            bias_alone.add(layer)
    found: dict[tuple, list[int]] = {}
    for i, path in enumerate(paths):
        path = tuple(path)
        if len(path) >= 3 and path[-3:-1] == ("parametrizations", "weight") and _SPLIT_WEIGHT.fullmatch(str(path[-1])):
            found.setdefault(path[:-3], []).append(i)
        elif path and path[-1] in _SPLIT_HOOK:
            found.setdefault(path[:-1], []).append(i)
    out = []
    for layer, members in found.items():
        if layer in bias_alone and all(len(leaves[i].shape) < 3 for i in members):
            out.append((layer, [tuple(paths[i]) for i in members]))
    return out


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
