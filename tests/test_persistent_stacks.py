"""Persistent stacks: ``_backend.joined`` / ``stacked`` equal ``concat`` / ``stack`` of their
pieces, and are views exactly when the pieces are consecutive, C-contiguous pieces of one
allocation (docs/engine.md, "Persistent stacks")."""

from __future__ import annotations

import array_api_compat
import numpy as np
import pytest
import torch

from precond_ref._backend import joined, stacked

BACKENDS = ["numpy", "torch"]


def _namespace(name):
    return array_api_compat.array_namespace(np.zeros(1) if name == "numpy" else torch.zeros(1))


def _array(name, values):
    return np.asarray(values, dtype=np.float64) if name == "numpy" else torch.tensor(values, dtype=torch.float64)


def _shares(name, a, b):
    """Whether ``a`` and ``b`` lie in one allocation."""
    if name == "numpy":
        return (a if a.base is None else a.base) is (b if b.base is None else b.base)
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _equal(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and bool((np.asarray(a) == np.asarray(b)).all())


def _pieces(name, whole, lengths):
    out, start = [], 0
    for n in lengths:
        out.append(whole[start : start + n])
        start += n
    return out


@pytest.mark.parametrize("name", BACKENDS)
def test_consecutive_pieces_join_as_a_view(name):
    """A view, equal to the concatenation, when the pieces are consecutive slices of one allocation
    (the hand-back of the previous step), also for pieces reshaped (a leaf's own shape)."""
    xp = _namespace(name)
    whole = _array(name, np.arange(24.0).reshape(6, 4))
    pieces = _pieces(name, whole, (1, 3, 2))
    out = joined(xp, pieces)
    assert _equal(out, xp.concat(pieces, axis=0)) and _shares(name, out, whole)
    rows = [xp.reshape(p, (-1,)) for p in xp.unstack(whole, axis=0)]
    out = stacked(xp, rows)
    assert _equal(out, xp.stack(rows)) and _shares(name, out, whole)
    # a view that reaches beyond the first piece covers exactly the pieces: writing it writes them
    out = joined(xp, pieces[1:])
    out[...] = -1
    assert _equal(whole[:1], _array(name, np.arange(4.0).reshape(1, 4))) and bool((np.asarray(whole[1:]) == -1).all())


def _not_joined(name):
    xp = _namespace(name)
    whole = _array(name, np.arange(24.0).reshape(6, 4))
    other = _array(name, np.arange(8.0).reshape(2, 4))
    wide = _array(name, np.arange(48.0).reshape(6, 8))
    return {
        "gap": [whole[0:1], whole[2:4]],
        "reversed": [whole[2:4], whole[0:2]],
        "overlapping": [whole[0:3], whole[2:4]],
        "repeated": [whole[0:2], whole[0:2]],
        "other allocation": [whole[0:2], other],
        "another dtype": [whole[0:2], xp.astype(whole[2:4], xp.float32)],
        "not contiguous": [wide[0:2, :4], wide[2:4, :4]],
        "own allocations": [other, _array(name, np.ones((2, 4)))],
        "empty piece": [whole[0:2], whole[2:2], whole[2:4]],
    }


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("case", list(_not_joined("numpy")))
def test_other_pieces_are_copied(name, case):
    """A copy equal to the concatenation (and, for equal shapes, the stack), sharing no memory with
    any piece, for pieces that are not consecutive pieces of one allocation of one dtype."""
    xp = _namespace(name)
    pieces = _not_joined(name)[case]
    if case == "another dtype":
        out = joined(xp, pieces)
        assert out.shape == (4, 4) and not any(_shares(name, out, p) for p in pieces)
        return
    out = joined(xp, pieces)
    assert _equal(out, xp.concat(pieces, axis=0))
    assert not any(_shares(name, out, p) for p in pieces if p.shape[0])
    if all(p.shape == pieces[0].shape for p in pieces):
        out = stacked(xp, pieces)
        assert _equal(out, xp.stack(pieces)) and not any(_shares(name, out, p) for p in pieces)


def test_torch_pieces_that_require_grad_or_are_subclasses_are_copied():
    """Autograd and tensor subclasses (a Parameter, a DTensor, a compiler's fake tensor) get the
    concatenation: a view of the first piece would route every gradient to it."""
    xp = _namespace("torch")
    whole = torch.arange(8.0, dtype=torch.float64, requires_grad=True)
    pieces = [whole[:4], whole[4:]]
    assert not _shares("torch", joined(xp, pieces), whole)
    plain = torch.arange(8.0, dtype=torch.float64)
    pieces = [torch.nn.Parameter(plain[:4], requires_grad=False), plain[4:]]
    assert not _shares("torch", joined(xp, pieces), plain)


def test_torch_compile_gets_the_concatenation():
    """Under torch.compile the join is the plain concatenation (dynamo's aliasing guards)."""
    xp = _namespace("torch")
    whole = torch.arange(8.0, dtype=torch.float64)

    def fn(a, b):
        return joined(xp, [a, b]) * 1

    out = torch.compile(fn, backend="eager", fullgraph=True)(whole[:4], whole[4:])
    assert torch.equal(out, whole)


def test_jax_and_strict_get_the_concatenation():
    """Arrays without views (JAX, array_api_strict) always concatenate."""
    strict = pytest.importorskip("array_api_strict")
    pieces = [strict.asarray([1.0, 2.0], dtype=strict.float64), strict.asarray([3.0], dtype=strict.float64)]
    assert strict.all(joined(strict, pieces) == strict.asarray([1.0, 2.0, 3.0], dtype=strict.float64))
    jnp = pytest.importorskip("jax.numpy")
    x = jnp.arange(4.0)
    assert (joined(jnp, [x[:2], x[2:]]) == x).all()



@pytest.mark.parametrize("name", BACKENDS)
def test_selected_by_runs(name):
    """``selected_by_runs`` equals ``where(pred, new, old)`` pair by pair (the non-finite rule's
    selection), and selects each run of news that are consecutive pieces of one allocation at once:
    its results are then views of one new allocation (the next step's join needs no copy)."""
    from precond_ref._backend import consecutive_runs, selected_by_runs

    xp = _namespace(name)
    news_whole = _array(name, np.arange(20.0))
    olds_whole = _array(name, -np.arange(20.0))
    news = [xp.reshape(news_whole[0:6], (2, 3)), news_whole[6:10], news_whole[12:16], news_whole[16:20]]  # a gap at 10:12
    olds = [xp.reshape(olds_whole[0:6], (2, 3)), olds_whole[6:10], _array(name, np.ones(4)), olds_whole[16:20]]
    assert consecutive_runs(xp, [news]) == [(0, 2), (2, 4)]
    assert consecutive_runs(xp, [news, olds]) == [(0, 2), (2, 3), (3, 4)]
    for pred in (True, False):
        ok = xp.asarray(pred)
        out = selected_by_runs(xp, ok, news, olds)
        for got, new, old in zip(out, news, olds):
            assert _equal(got, xp.where(ok, new, old))
        assert _shares(name, out[0], out[1]) and _shares(name, out[2], out[3]) and not _shares(name, out[1], out[2])
        assert not any(_shares(name, o, news_whole) or _shares(name, o, olds_whole) for o in out)


@pytest.mark.parametrize("name", BACKENDS)
def test_runs_never_flatten_a_non_contiguous_array(name):
    """A non-contiguous array (a transposed slice) lies in no run, and a run of news whose olds are
    not all contiguous is selected pair by pair: flattening such an array would copy it, an
    operation a step did not issue before (the non-finite rule's selection adds no copies). The
    selections still equal ``where(pred, new, old)``."""
    from precond_ref._backend import consecutive_runs, selected_by_runs

    xp = _namespace(name)
    whole = xp.reshape(_array(name, np.arange(24.0)), (4, 6))
    transposed = xp.reshape(_array(name, np.arange(12.0)), (3, 4)).mT  # (4, 3), not contiguous
    news = [whole[0:2], whole[2:4]]
    assert consecutive_runs(xp, [news]) == [(0, 2)]
    assert consecutive_runs(xp, [[whole[0:2], transposed]]) == [(0, 1), (1, 2)]
    olds = [xp.reshape(_array(name, np.ones(12)), (2, 6)), xp.reshape(_array(name, -np.arange(12.0)), (6, 2)).mT]
    for pred in (True, False):
        ok = xp.asarray(pred)
        out = selected_by_runs(xp, ok, news, olds)
        for got, new, old in zip(out, news, olds):
            assert _equal(got, xp.where(ok, new, old))
        assert not _shares(name, out[0], out[1])  # pair by pair: two selections


@pytest.mark.parametrize("name", BACKENDS)
def test_plain_forms_copy_and_select_pair_by_pair(name):
    """Within ``precond_ref.plain_forms()`` a join and a stack of consecutive pieces of one
    allocation are the concatenation and the stack, new arrays sharing no memory with the pieces,
    and a run of such pieces is selected pair by pair; after the block, views again (the switch
    holds for the block that sets it, docs/engine.md "Persistent stacks")."""
    from precond_ref import plain_forms
    from precond_ref._backend import consecutive_runs, selected_by_runs

    xp = _namespace(name)
    whole = _array(name, np.arange(24.0).reshape(6, 4))
    pieces, rows = _pieces(name, whole, (1, 3, 2)), list(xp.unstack(whole, axis=0))
    with plain_forms():
        out, stack = joined(xp, pieces), stacked(xp, rows)
        assert consecutive_runs(xp, [pieces]) == [(0, 1), (1, 2), (2, 3)]
        selected = selected_by_runs(xp, xp.asarray(True), rows[:2], rows[2:4])
    assert _equal(out, xp.concat(pieces, axis=0)) and not _shares(name, out, whole)
    assert _equal(stack, xp.stack(rows)) and not _shares(name, stack, whole)
    assert all(_equal(s, r) for s, r in zip(selected, rows)) and not _shares(name, selected[0], selected[1])
    assert _shares(name, joined(xp, pieces), whole) and consecutive_runs(xp, [pieces]) == [(0, 3)]


def test_plain_forms_are_read_while_a_step_is_traced():
    """A compiled step reads the switch while it is traced (``torch.compile`` with
    ``fullgraph=True``: no graph break; ``jax.jit``): traced within ``plain_forms()`` it takes the
    plain forms (``computed_once`` is then the value itself, no reduction in the traced program)."""
    import jax
    import jax.numpy as jnp

    from precond_ref import plain_forms
    from precond_ref._backend import computed_once, plain

    fn = torch.compile(lambda x: x + (1.0 if plain() else 0.0), backend="eager", fullgraph=True)
    with plain_forms():
        assert torch.equal(fn(torch.zeros(2)), torch.ones(2))
        program = jax.jit(lambda v: computed_once(jnp, v)).lower(jnp.ones(3)).as_text()
    assert "reduce" not in program
    assert "reduce" in jax.jit(lambda v: computed_once(jnp, v)).lower(jnp.ones(3)).as_text()
