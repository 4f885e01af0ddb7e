"""Plain-Python helpers shared by the loop oracles: trees and schedules (no numerics here).

The oracles take nested dicts of float64 NumPy arrays, as the library does, and visit their leaves
in the library's order: dict keys sorted (JAX's order), a leaf named by its path ``"a/b"``.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np


def leaves(tree: Any, prefix: tuple = ()) -> Iterator[tuple[tuple, np.ndarray]]:
    """``(path, leaf)`` for every array of a nested dict, keys in sorted order."""
    if isinstance(tree, dict):
        for key in sorted(tree):
            yield from leaves(tree[key], prefix + (key,))
    else:
        yield prefix, np.asarray(tree, dtype=np.float64)


def value_at(x: Any, count: int) -> float:
    """A hyperparameter at step ``count`` (updates already applied): a number, or a schedule's value."""
    return float(x(count)) if callable(x) else float(x)


def path_str(path: tuple) -> str:
    """``("fc", "weight")`` -> ``"fc/weight"`` (the library's path string; the root is ``"."``)."""
    return "/".join(str(k) for k in path) if path else "."


def build(flat: dict[tuple, np.ndarray]) -> Any:
    """The nested dict of ``{path: array}`` (the inverse of :func:`leaves`)."""
    if () in flat:
        return flat[()]
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def weight_bias_pairs(params: Any) -> list[tuple[tuple, ...]]:
    """The groups of the library's weight/bias pairing (specs README section 5), in tree order: a 2-D
    ``weight`` with a sibling 1-D ``bias`` of length ``weight.shape[0]`` is one group
    ``(weight_path, bias_path)``; every other leaf is a group of its own."""
    flat = dict(leaves(params))
    bias_of = {}
    for path, leaf in flat.items():
        if path and path[-1] == "weight" and leaf.ndim == 2:
            bias = path[:-1] + ("bias",)
            if bias in flat and flat[bias].ndim == 1 and flat[bias].shape[0] == leaf.shape[0]:
                bias_of[path] = bias
    paired = set(bias_of.values())
    return [(p, bias_of[p]) if p in bias_of else (p,) for p in flat if p not in paired]
