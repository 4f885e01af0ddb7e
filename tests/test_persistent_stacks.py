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
    if name == "numpy":
        return np.shares_memory(a, b)
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


# ---------------------------------------------------------------------------------------------
# The torch optimizers: state handed back as views of one stack per entry, joined again as that
# stack; state_dict, torch.save and deepcopy unchanged by it.

import copy  # noqa: E402
import io  # noqa: E402

import precond_ref._backend as backend  # noqa: E402
import precond_ref.adapters.torch as pt  # noqa: E402
from precond_ref.benchmarks.counting import count_step  # noqa: E402

STACKING = {
    "ASGO": lambda m: pt.ASGO(m.parameters(), lr=1e-2),
    "DASGO": lambda m: pt.DASGO(m.parameters(), lr=1e-2),
    "IFShampoo": lambda m: pt.IFShampoo(m.parameters(), lr=1e-2, batch_size=4, precondition_every=2),
    "Sketchy": lambda m: pt.Sketchy(m.parameters(), lr=1e-2, rank=2, precondition_every=2),
    "SAdaGrad": lambda m: pt.SAdaGrad(m.parameters(), lr=1e-2, rank=2),
    "MBF": lambda m: pt.MBF(m.named_parameters(), lr=1e-2),
}


def _layers(seed=0):
    """Four equal 6x5 layers with biases (the equal blocks of all leaves stack), in float64."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(*(torch.nn.Linear(5 if i == 0 else 6, 6, dtype=torch.float64) for i in range(4)))


def _grads(model, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)


def _run(make, steps, model=None, opt=None, first=0):
    model = model or _layers()
    opt = opt or make(model)
    for t in range(first, first + steps):
        _grads(model, t)
        opt.step()
    return model, opt


def _copies_only(monkeypatch):
    monkeypatch.setattr(backend, "_consecutive_view", lambda arrays, new_axis: None)


@pytest.mark.parametrize("name", list(STACKING))
def test_persistent_stacks_change_no_number_and_save_operations(name, monkeypatch):
    """The trajectory with joins as views is bitwise the one with every join a copy (the plain
    formula ``concat``), and a warm step issues no more operations; for the matrix-stacking methods
    (ASGO, DASGO, IF-Shampoo) strictly fewer: their stacked state entries are not copied."""
    model, opt = _run(STACKING[name], 6)
    _grads(model, 6)
    views = count_step(opt.step)["operations"]
    with monkeypatch.context() as m:
        _copies_only(m)
        plain, plain_opt = _run(STACKING[name], 6)
        _grads(plain, 6)
        copies = count_step(plain_opt.step)["operations"]
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(model.parameters(), plain.parameters()):
        for key, value in opt.state[p].items():
            assert torch.equal(value, plain_opt.state[q][key]) if isinstance(value, torch.Tensor) else value == plain_opt.state[q][key]
    assert views < copies if name in ("ASGO", "DASGO", "IFShampoo") else views <= copies


@pytest.mark.parametrize("name", ["ASGO", "IFShampoo"])
def test_state_saved_loaded_and_copied_as_per_parameter_tensors(name):
    """With the state in views of shared stacks: ``torch.save`` of ``state_dict()`` writes each
    storage once (the file is about the state's bytes, not a stack per entry), and a run resumed
    from the saved state, or from a deepcopy, continues bitwise as the uninterrupted run."""
    model, opt = _run(STACKING[name], 4)
    state = opt.state_dict()
    tensors = [v for entries in state["state"].values() for v in entries.values() if isinstance(v, torch.Tensor)]
    assert any(v._base is not None for v in tensors)  # the state is in stacks
    nbytes = sum(v.numel() * v.element_size() for v in tensors)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    assert nbytes <= len(buffer.getvalue()) <= 1.05 * nbytes + 64 * 1024
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    resumed_model = copy.deepcopy(model)
    resumed = STACKING[name](resumed_model)
    resumed.load_state_dict(loaded)
    twin_model, twin = copy.deepcopy((model, opt))
    _run(None, 3, model, opt, first=4)
    _run(None, 3, resumed_model, resumed, first=4)
    _run(None, 3, twin_model, twin, first=4)
    for p, q, r in zip(model.parameters(), resumed_model.parameters(), twin_model.parameters()):
        assert torch.equal(p, q) and torch.equal(p, r)
