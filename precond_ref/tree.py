"""Trees of arrays: nested ``dict`` / ``list`` / ``tuple`` (``NamedTuple`` included).

The core needs exactly three things from a tree: its leaves in a fixed order, each leaf's *path*
(the tuple of keys and indices from the root, used for weight/bias pairing and error messages), and
a way to put new leaves back into the same structure. ``None`` is an empty subtree, as in optax.
Adapters with richer tree types (JAX pytrees, torch param groups) translate to this form.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, NamedTuple

__all__ = [
    "Path", "TreeDef", "tree_flatten", "tree_leaves", "tree_unflatten", "tree_map", "path_str", "to_entries",
    "from_entries",
]

Path = tuple[Hashable, ...]


_LEAF = object()  # a leaf's place in a skeleton


class TreeDef(NamedTuple):
    """The structure of a tree with its leaves replaced by a marker."""

    skeleton: Any
    paths: tuple[Path, ...]


def _sorted_keys(tree: dict) -> list:
    """Dict keys in sorted order, as JAX orders them, so a dict returned by ``jax.jit`` (sorted)
    has the structure of the one passed in; keys that do not sort keep their insertion order."""
    try:
        return sorted(tree)
    except TypeError:
        return list(tree)


def _skeleton(tree: Any, path: Path, leaves: list, paths: list[Path]) -> Any:
    """``tree`` with its leaves replaced by :data:`_LEAF`, each leaf appended to ``leaves`` and its
    path to ``paths`` (list comprehensions and ``range``, not generators and ``enumerate``, which
    dynamo traces as extra calls)."""
    if tree is None:
        return None
    if isinstance(tree, dict):
        return {k: _skeleton(tree[k], path + (k,), leaves, paths) for k in _sorted_keys(tree)}
    if isinstance(tree, (list, tuple)):
        if hasattr(tree, "_fields"):  # a NamedTuple
            return type(tree)(*[_skeleton(v, path + (f,), leaves, paths) for f, v in zip(tree._fields, tree)])
        return type(tree)([_skeleton(tree[i], path + (i,), leaves, paths) for i in range(len(tree))])
    leaves.append(tree)
    paths.append(path)
    return _LEAF


def tree_flatten(tree: Any) -> tuple[list[Any], TreeDef]:
    """Leaves of ``tree`` in depth-first order and the structure to rebuild it.

    Dict keys are visited in sorted order (JAX's order); ``NamedTuple`` fields are path keys by name.
    """
    leaves, paths = [], []  # filled by the walk, in depth-first order
    skeleton = _skeleton(tree, (), leaves, paths)
    return leaves, TreeDef(skeleton, tuple(paths))


def tree_leaves(tree: Any) -> list[Any]:
    """The leaves of :func:`tree_flatten` alone, in its order, from one walk that builds no
    skeleton or paths: for pairing the leaves of trees of one structure (parameters and their
    updates); a leaf is appended where its container's walk meets it, without a call of its own."""
    if not isinstance(tree, (dict, list, tuple)):
        return [] if tree is None else [tree]
    leaves: list[Any] = []
    _add_leaves(tree, leaves)
    return leaves


def _add_leaves(tree: Any, leaves: list) -> None:
    for value in ([tree[k] for k in _sorted_keys(tree)] if isinstance(tree, dict) else tree):
        if isinstance(value, (dict, list, tuple)):
            _add_leaves(value, leaves)
        elif value is not None:
            leaves.append(value)


def _fill(skeleton: Any, leaves: Any) -> Any:
    if skeleton is None:
        return None
    if skeleton is _LEAF:
        return next(leaves)
    if isinstance(skeleton, dict):
        return {k: _fill(v, leaves) for k, v in skeleton.items()}
    if hasattr(skeleton, "_fields"):  # a NamedTuple (a skeleton's other nodes: lists and tuples)
        return type(skeleton)(*[_fill(v, leaves) for v in skeleton])
    return type(skeleton)([_fill(v, leaves) for v in skeleton])


def tree_unflatten(treedef: TreeDef, leaves: list[Any]) -> Any:
    """Inverse of :func:`tree_flatten`."""
    if len(leaves) != len(treedef.paths):
        raise ValueError(f"expected {len(treedef.paths)} leaves, got {len(leaves)}")
    return _fill(treedef.skeleton, iter(leaves))


def tree_map(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """Apply ``fn`` leaf-wise to trees of identical structure."""
    leaves, treedef = tree_flatten(tree)
    others = []
    for other in rest:
        other_leaves, other_def = tree_flatten(other)
        if other_def.paths != treedef.paths:
            raise ValueError(
                "tree structures differ: "
                f"{[path_str(p) for p in treedef.paths]} vs {[path_str(p) for p in other_def.paths]}"
            )
        others.append(other_leaves)
    return tree_unflatten(treedef, [fn(*args) for args in zip(leaves, *others)])


def path_str(path: Path) -> str:
    """``('layer1', 'weight')`` -> ``'layer1/weight'``; the root leaf is ``'.'``."""
    return "/".join(str(k) for k in path) if path else "."


def to_entries(fields: Any) -> dict[str, Any]:
    """A state of named fields as the flat entries a group's state stores: ``{path_str(path): leaf}``.

    A method writes its per-group state as ``NamedTuple``s (tuples for one entry per axis or per
    tile); checkpoints (torch's ``state_dict``, optax states) hold flat string keys. The key of a
    leaf is its path: ``Tile(factor=(K0, K1))`` -> ``{"factor/0": K0, "factor/1": K1}``.
    """
    leaves, treedef = tree_flatten(fields)
    return {path_str(path): leaf for path, leaf in zip(treedef.paths, leaves)}


def from_entries(template: Any, entries: Any, prefix: str = "") -> Any:
    """Inverse of :func:`to_entries`: ``template``'s structure (any leaves) filled from ``entries``.

    ``template`` is the method's layout of the group (e.g. ``Tile(factor=(None, None))`` is not a
    template: ``None`` is an empty subtree; use any non-``None`` placeholder such as ``0``).
    A missing entry raises ``KeyError`` naming it. One walk of ``template``, the key (under
    ``prefix``) grown as the walk descends, without building its skeleton and paths first: what
    dynamo traces is then one call per node of the template, not three walks and a join per leaf.
    """
    if template is None:
        return None
    if isinstance(template, dict):
        return {k: from_entries(template[k], entries, f"{prefix}/{k}" if prefix else str(k))
                for k in _sorted_keys(template)}
    if not isinstance(template, (list, tuple)):
        return entries[prefix or "."]
    if hasattr(template, "_fields"):  # a NamedTuple
        return type(template)(*[from_entries(v, entries, f"{prefix}/{f}" if prefix else f)
                                for f, v in zip(template._fields, template)])
    return type(template)([from_entries(v, entries, f"{prefix}/{i}" if prefix else str(i))
                           for i, v in enumerate(template)])
