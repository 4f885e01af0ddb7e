"""The FD step of a sketch larger than ``precond_ref.sketch.FD_ROWS_BYTES``: its products with the
frame [U, fresh] taken by blocks of rows (:func:`precond_ref.sketch.frame_products_in_rows`), the
new basis written over the old one where the array can be written. The bound is lowered here so
that a small sketch takes that path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from array_api_compat import array_namespace

import precond_ref.adapters.torch as pt
from precond_ref import sketch as fd
from precond_ref._backend import matmul, matmul_into, owned_state
from precond_ref.engine import axes

_OPTIONS = dict(exponent=-0.5, eps=1e-7, relative_eps=True, cutoff=True, decomposition="auto")


def _state(xp, d, k, dtype, steps, seed, batch=()):
    """A sketch after ``steps`` whole-product FD steps of Gaussian columns, and the next column."""
    rng = np.random.default_rng(seed)
    sketch = fd.fd_init(xp, d, k, dtype=dtype, device=None, batch=batch)
    for _ in range(steps):
        column = xp.asarray(rng.standard_normal((*batch, d, 1)), dtype=dtype)
        sketch, _, _ = fd.fd_update_apply(xp, sketch, column, **_OPTIONS)
    return sketch, xp.asarray(rng.standard_normal((*batch, d, 1)), dtype=dtype)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("steps", [0, 3, 12])
def test_step_by_rows_is_the_whole_step(monkeypatch, dtype, steps):
    """One FD step of a sketch over the bound (by row blocks) against the same step under it (whole
    products), from the same sketch and column. Both paths compute the same small decomposition;
    they differ only in how the library orders each entry's sum of k + 1 products in
    F R and F c (F = [U, fresh] (d, k + 1), R its rotation, c the coefficients of the direction), so
    entry-wise |by rows - whole| <= 2 (k + 1) u (|F| |R|) (the standard bound gamma_{k+1} for each
    of two orderings); the small fields are bitwise equal. The input basis is overwritten (torch)."""
    torch_dtype = getattr(torch, dtype)
    xp = array_namespace(torch.zeros(1))
    d, k = 203, 8
    sketch, x = _state(xp, d, k, torch_dtype, steps, seed=steps)
    whole, ok, out = fd.fd_update_apply(xp, {key: v.clone() for key, v in sketch.items()}, x, **_OPTIONS)
    given = {key: v.clone() for key, v in sketch.items()}
    monkeypatch.setattr(fd, "FD_ROWS_BYTES", 7 * (k + 1) * torch.finfo(torch_dtype).bits // 8)  # blocks of 7 rows
    with owned_state():
        rows, ok_rows, out_rows = fd.fd_update_apply(xp, given, x, **_OPTIONS)
    assert rows["basis"].data_ptr() == given["basis"].data_ptr()  # written over the old basis
    assert bool(torch.equal(ok, ok_rows))
    for key in fd.SKETCH_KEYS[1:]:
        assert torch.equal(rows[key], whole[key]), key
    u = torch.finfo(torch_dtype).eps / 2
    # |F| |R| with |R| <= 1 entry-wise (columns of an orthogonal matrix) and |fresh| <= 1: bounded by
    # a row's sum of |U| plus 1
    scale = sketch["basis"].abs().sum(dim=-1, keepdim=True) + 1.0
    assert torch.all((rows["basis"] - whole["basis"]).abs() <= 2 * (k + 1) * u * scale)
    # each coefficient is a weight times a coordinate of x on an orthonormal frame: at most
    # max(w, w_perp) |x|
    largest = torch.maximum(whole["basis_weights"].max(), whole["complement_weight"]) * torch.linalg.vector_norm(x)
    assert torch.all((out_rows - out).abs() <= 2 * (k + 1) * u * largest * scale)


def test_rows_into_a_new_array_where_the_basis_may_not_be_written(monkeypatch):
    """The pure core writes no array it was given: outside ``owned_state`` a writable NumPy basis,
    and within it a read-only one, are not written: the row blocks are joined into a new array,
    and the caller's sketch is unchanged; the values are those of the in-place path (the same
    blocks), which only a writable basis within ``owned_state`` takes."""
    xp = array_namespace(np.zeros(1))
    sketch, x = _state(xp, 97, 5, np.float64, 4, seed=1)
    monkeypatch.setattr(fd, "FD_ROWS_BYTES", 10 * 6 * 8)
    writable = {key: np.array(v, copy=True) for key, v in sketch.items()}
    pure = {key: np.array(v, copy=True) for key, v in sketch.items()}
    frozen = {key: np.array(v, copy=True) for key, v in sketch.items()}
    frozen["basis"].flags.writeable = False
    before = frozen["basis"].copy()
    with owned_state():
        a, _, out_a = fd.fd_update_apply(xp, writable, x, **_OPTIONS)
        b, _, out_b = fd.fd_update_apply(xp, frozen, x, **_OPTIONS)
    c, _, out_c = fd.fd_update_apply(xp, pure, x, **_OPTIONS)
    assert a["basis"] is writable["basis"] and b["basis"] is not frozen["basis"] and c["basis"] is not pure["basis"]
    np.testing.assert_array_equal(frozen["basis"], before)
    np.testing.assert_array_equal(pure["basis"], before)
    for other, out in ((b, out_b), (c, out_c)):
        np.testing.assert_array_equal(a["basis"], other["basis"])
        np.testing.assert_array_equal(out_a, out)


@pytest.mark.parametrize("batch", [(), (3,)])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_rows_written_over_the_basis_are_the_joined_rows_on_torch(monkeypatch, dtype, batch):
    """On torch, within ``owned_state``, each row block of F R is written by the matmul itself into
    U's rows (strided views of U where the sketch is a stack): the step returns the caller's basis
    tensor, holding the same bits as the blocks joined into a new array outside ``owned_state``
    (the same products of the same blocks), and the same F c."""
    xp = array_namespace(torch.zeros(1))
    sketch, x = _state(xp, 61, 6, getattr(torch, dtype), 5, seed=2, batch=batch)
    monkeypatch.setattr(fd, "FD_ROWS_BYTES", 3 * (batch[0] if batch else 1) * 7 * 8)  # blocks of a few rows
    pure = {key: v.clone() for key, v in sketch.items()}
    given = {key: v.clone() for key, v in sketch.items()}
    joined, _, out_joined = fd.fd_update_apply(xp, pure, x, **_OPTIONS)
    with owned_state():
        written, _, out_written = fd.fd_update_apply(xp, given, x, **_OPTIONS)
    assert written["basis"] is given["basis"] and joined["basis"] is not pure["basis"]
    assert torch.equal(pure["basis"], sketch["basis"])  # the pure core's input is left as it was
    assert not torch.equal(joined["basis"], sketch["basis"])  # the step changed the basis
    assert torch.equal(written["basis"], joined["basis"])
    assert torch.equal(out_written, out_joined)


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("batch", [(), (1,), (3,)])
def test_matmul_into_writes_the_product_into_the_view(lib, dtype, batch):
    """``matmul_into`` writes ``a @ b`` into a block of rows of a larger array (strided where it is
    a stack): the same bits as the product formed alone, in that array's memory, its other rows
    untouched; with an operand of another dtype, or one that needs a gradient (torch), it assigns."""
    rng = np.random.default_rng(3)
    whole = rng.standard_normal((*batch, 40, 16)).astype(dtype)
    a, b = rng.standard_normal((*batch, 9, 17)).astype(dtype), rng.standard_normal((*batch, 17, 16)).astype(dtype)
    if lib == "torch":
        whole, a, b = torch.from_numpy(whole), torch.from_numpy(a), torch.from_numpy(b)
    xp = array_namespace(whole)
    before = xp.asarray(whole, copy=True)
    want = matmul(xp, a, b)
    matmul_into(xp, a, b, whole[..., 20:29, :])
    assert bool(xp.all(whole[..., 20:29, :] == want))
    assert bool(xp.all(whole[..., :20, :] == before[..., :20, :])) and bool(xp.all(whole[..., 29:, :] == before[..., 29:, :]))
    other = xp.astype(b, xp.float64 if dtype == "float32" else xp.float32)
    matmul_into(xp, a, other, whole[..., :9, :])
    assert bool(xp.all(whole[..., :9, :] == xp.astype(matmul(xp, a, other), whole.dtype)))
    if lib == "torch":
        needs_gradient = b.clone().requires_grad_(True)
        matmul_into(xp, a, needs_gradient, whole[..., 30:39, :])
        assert torch.equal(whole[..., 30:39, :].detach(), want)


def test_torch_optimizer_steps_a_large_sketch_in_place(monkeypatch):
    """Through the torch class: a parameter whose sketch is over the bound (lowered) keeps its basis
    tensor across steps (written in place), and the first step's update equals the whole path's to
    the rounding of the frame products (float64; the first step's frame is [0, x/|x|], one nonzero
    term per entry, so the two agree to a unit roundoff of the update)."""
    def run(patched):
        torch.manual_seed(0)
        model = torch.nn.Linear(40, 30, dtype=torch.float64)
        opt = pt.SAdaGrad(model.parameters(), lr=0.1, rank=4)
        if patched:
            monkeypatch.setattr(fd, "FD_ROWS_BYTES", 256)
            monkeypatch.setattr(axes, "FLAT_STACK_BYTES", 256)
        pointers, weights = [], []
        for step in range(3):
            model.zero_grad()
            model(torch.linspace(-1, 1, 40, dtype=torch.float64)[None] * (step + 1)).square().sum().backward()
            opt.step()
            state = opt.state[model.weight]
            pointers.append(next(v.data_ptr() for key, v in state.items() if key.endswith("basis")))
            weights.append(model.weight.detach().clone())
        monkeypatch.undo()
        return pointers, weights

    pointers, weights = run(True)
    _, reference = run(False)
    assert pointers[0] == pointers[1] == pointers[2]
    assert torch.allclose(weights[0], reference[0], rtol=0, atol=4 * torch.finfo(torch.float64).eps * 0.1)
    assert all(torch.isfinite(w).all() for w in weights)


def test_a_block_over_the_bound_is_stepped_alone():
    """``bounded_chunks(alone_from=...)`` (``flat_runs`` off a CPU, where stacks may hold more than
    ``FLAT_STACK_BYTES``): a member over ``alone_from`` bytes is a chunk of its own, though the
    stack limit would take it with its equals, so it is stepped in its own arrays (a lone member's
    stack is the member itself: no joined copy to write into)."""
    members = [(np.zeros((1, 40, 3)),), (np.zeros((1, 40, 3)),), (np.zeros((1, 10, 3)),), (np.zeros((1, 10, 3)),)]
    assert axes.bounded_chunks(np, members, limit=2**20) == [[0, 1], [2, 3]]
    assert axes.bounded_chunks(np, members, limit=2**20, alone_from=8 * 3 * 30) == [[0], [1], [2, 3]]
