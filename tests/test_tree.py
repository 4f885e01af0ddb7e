"""precond_ref.tree: the flat state entries of a method's fields, and back."""

from __future__ import annotations

from typing import NamedTuple

from precond_ref.tree import from_entries, path_str, to_entries, tree_flatten, tree_leaves, tree_unflatten


class _A(NamedTuple):
    x: object
    y: object


class _B(NamedTuple):
    p: object
    q: object


def test_to_entries_and_tree_leaves_follow_flatten_order():
    """``to_entries`` keys each leaf by its path (:func:`path_str`) in :func:`tree_flatten`'s order,
    and ``tree_leaves`` (a walk of its own) gives the same leaves, for nested NamedTuples, tuples,
    lists, dicts (sorted keys, and keys that do not sort in insertion order), None subtrees, a root
    leaf and a root None."""
    cases = [
        ({"z": _A(x=(1, None, [2, 3]), y=None), "a": {"q": 4}}, {"a/q": 4, "z/x/0": 1, "z/x/2/0": 2, "z/x/2/1": 3}),
        ({"b": 1, 3: 2, "a": 3}, {"b": 1, "3": 2, "a": 3}),
        (_A(x=(), y=(5,)), {"y/0": 5}),
        (7, {".": 7}),
        (None, {}),
    ]
    for tree, expected in cases:
        assert list(to_entries(tree).items()) == list(expected.items())
        assert tree_leaves(tree) == tree_flatten(tree)[0] == list(expected.values())


def test_from_entries_keeps_templates_of_equal_values_apart():
    """Two NamedTuple types with equal values (equal as tuples) each get their own structure."""
    a, b = _A(x=0, y=(0, 0)), _B(p=0, q=(0, 0))
    assert a == b  # equal tuples: a cache keyed by value would mix them up
    assert from_entries(a, {"x": 1, "y/0": 2, "y/1": 3}) == _A(1, (2, 3))
    assert type(from_entries(b, {"p": 1, "q/0": 2, "q/1": 3})) is _B
    assert from_entries(_A(x=0, y=(0, 0)), to_entries(_A("u", ("v", "w")))) == _A("u", ("v", "w"))
    assert from_entries({"k": a}, {"k/x": 1, "k/y/0": 2, "k/y/1": 3}) == {"k": _A(1, (2, 3))}


def test_fields_from_entries_trace_under_dynamo_without_warning():
    """Under dynamo (``fullgraph``: no graph break) a state's fields rebuilt from its entries by a
    structure made outside the trace (IF-Shampoo's layout plan: ``tree_unflatten`` of the entries
    named by its paths) are the fields, with no warning."""
    import warnings

    import pytest

    torch = pytest.importorskip("torch")
    structure = tree_flatten(_A(x=(0, 0), y=0))[1]
    keys = [path_str(path) for path in structure.paths]

    def step(v):
        entries = {"x/0": v, "x/1": v * 2.0, "y": v * 3.0}
        state = tree_unflatten(structure, [entries[k] for k in keys])
        return state.x[0] + state.x[1] * 10.0 + state.y * 100.0

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert float(compiled(torch.tensor(1.0))) == 321.0
