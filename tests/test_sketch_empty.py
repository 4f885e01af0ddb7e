"""The FD step of an empty sketch by the m x m problem of X alone (``fd_update(maybe_empty=True)``,
Sketchy's deviation K8) against the incremental path's (k+m)-square core, and where it is taken."""

from __future__ import annotations

import numpy as np
import pytest

import precond_ref as pr
import precond_ref.sketch as sketch_module
from precond_ref.sketch import fd_apply, fd_init, fd_update, fd_update_apply
from precond_ref.testing.oracles import fd_covariance

PATHS = ("incremental", "incremental_gram")


def _data(seed, d, m, stack=()):
    """X = A diag(s) B^T with A, B orthonormal and s = 2^0 .. 2^-(m-1): a gap of 2 between
    neighbouring singular values, so each singular direction is conditioned by 1/(1 - 1/4)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(int(np.prod(stack, dtype=int))):
        a, _ = np.linalg.qr(rng.standard_normal((d, m)))
        b, _ = np.linalg.qr(rng.standard_normal((m, m)))
        out.append((a * 2.0 ** -np.arange(m)) @ b.T)
    return np.stack(out).reshape(stack + (d, m))


def _spy(monkeypatch):
    """A list that records each call of the empty-sketch path."""
    calls = []
    original = sketch_module._after_empty_sketch

    def counted(*args):
        calls.append(args[1].shape)
        return original(*args)

    monkeypatch.setattr(sketch_module, "_after_empty_sketch", counted)
    return calls


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("stack", [(), (3,)])
def test_empty_sketch_step_is_the_incremental_step(path, dtype, stack, monkeypatch):
    """With sigma = 0, Z = [0, X]: its left singular pairs are X's, so the m x m path gives the
    general path's sketch (FD step, Feinberg et al. 2023 Alg. 1; spec F-I5), to the rounding of two
    backward-stable decompositions: sigma'^2 and the statistic U diag(sigma'^2) U^T agree within
    c u s_0^2 (c = 8 sqrt(d), u the dtype's unit roundoff; on the Gram paths too, whose rounding is
    u s_0^2 on s^2), the weights (sigma'^2 + rho')^a relatively within |a| c u s_0^2 over the
    smallest s^2 they depend on (s_k^2 = 2^-2k s_0^2: X's singular values halve), the
    preconditioner applied to a probe within that times its largest weight over its smallest."""
    import array_api_compat.numpy as xp

    d, k, m = 20, 3, 6
    calls = _spy(monkeypatch)
    x = _data(0, d, m, stack).astype(dtype)
    opts = dict(exponent=-0.25, decay=0.9, eps=1e-7, cutoff=True, decomposition=path)
    start = fd_init(xp, d, k, dtype=getattr(xp, dtype), device=None, batch=stack)
    general, ok_general = fd_update(xp, start, x, **opts)
    assert not calls
    empty, ok_empty = fd_update(xp, start, x, maybe_empty=True, **opts)
    assert len(calls) == 1 and ok_general.tolist() == ok_empty.tolist()
    u = float(np.finfo(dtype).eps) / 2
    tol = 8 * np.sqrt(d) * u  # of s^2 relative to s_0^2 on both paths (the Gram path's eigenvalues too)
    s0 = float(np.abs(x).max()) * np.sqrt(d)  # >= the largest singular value
    np.testing.assert_allclose(fd_covariance(xp, empty), fd_covariance(xp, general), rtol=0, atol=tol * s0**2)
    np.testing.assert_allclose(empty["singular_values"] ** 2, general["singular_values"] ** 2, rtol=0, atol=tol * s0**2)
    np.testing.assert_allclose(empty["escaped_root"] ** 2, general["escaped_root"] ** 2, rtol=0, atol=tol * s0**2)
    for key in ("basis_weights", "complement_weight"):
        np.testing.assert_allclose(empty[key], general[key], rtol=0.25 * tol * 2.0 ** (2 * k))
    probe = _data(1, d, 2, stack).astype(dtype)
    want = fd_apply(xp, general, probe)
    weights = general["basis_weights"]
    spread = float((weights.max(axis=-1) / weights.min(axis=-1)).max())
    np.testing.assert_allclose(fd_apply(xp, empty, probe), want, rtol=0,
                               atol=0.25 * tol * 2.0 ** (2 * k) * spread * float(np.abs(want).max()))


@pytest.mark.parametrize("path", PATHS)
def test_empty_sketch_update_apply_is_update_then_apply(path):
    """fd_update_apply on the m x m path: the new sketch applied to the x it added, from the small
    decomposition's coordinates, is fd_apply of the new sketch (definition of fd_update_apply), to
    the apply's rounding amplified by w_perp / w (here w_perp = 0: by the largest weight over the
    smallest, 2^(m-1))."""
    import array_api_compat.numpy as xp

    d, k, m = 20, 3, 6
    x = _data(2, d, m, (2,))
    opts = dict(exponent=-0.5, decay=0.9, eps=1e-7, cutoff=True, decomposition=path, maybe_empty=True)
    new, ok, y = fd_update_apply(xp, fd_init(xp, d, k, dtype=xp.float64, device=None, batch=(2,)), x, **opts)
    assert ok.tolist() == [True, True]
    want = fd_apply(xp, new, x)
    np.testing.assert_allclose(y, want, rtol=0, atol=1e3 * 1e-15 * 2.0 ** (m - 1) * np.abs(want).max())


def test_a_sketch_with_mass_takes_the_general_path_bit_for_bit(monkeypatch):
    """``maybe_empty`` is a hint: where any sigma of the stack is nonzero (a second step, a loaded
    state) the step is the general path's, bit for bit, and the m x m path is never entered."""
    import array_api_compat.numpy as xp

    d, k, m = 20, 3, 6
    calls = _spy(monkeypatch)
    opts = dict(exponent=-0.5, decay=0.9, eps=1e-7, cutoff=True, decomposition="incremental")
    filled, _ = fd_update(xp, fd_init(xp, d, k, dtype=xp.float64, device=None, batch=(2,)), _data(3, d, m, (2,)), **opts)
    filled = {key: value.copy() for key, value in filled.items()}
    filled["singular_values"][0] = 0.0  # one empty sketch of the two: the stack is not empty
    filled["basis"][0] = 0.0
    x = _data(4, d, m, (2,))
    general, _ = fd_update(xp, filled, x, **opts)
    hinted, _ = fd_update(xp, filled, x, maybe_empty=True, **opts)
    assert not calls
    for key in general:
        np.testing.assert_array_equal(hinted[key], general[key])


@pytest.mark.parametrize("backend, mode, host_step, taken", [
    ("numpy", "principled", True, True), ("torch", "principled", True, True), ("numpy", "principled", False, True),
    ("torch", "principled", False, False), ("numpy", "faithful", True, False),
])
def test_sketchy_takes_the_m_by_m_path_on_a_first_call_known_on_the_host(backend, mode, host_step, taken, monkeypatch):
    """Where Sketchy takes the empty-sketch path (deviation K8): on the first call when the call
    number is known on the host (``update(step=0)``, as the torch classes pass it, or a NumPy
    state's counters; not a torch state's, a tensor), in principled mode, on the axes whose FD step
    is incremental (k + m < d), and never again; faithful mode keeps the authors' decomposition
    (even where asked for the incremental one). A weight of 12 x 5 (not merged) with rank 3: axis 0
    (d = 12, m = 5) is incremental, axis 1 (d = 5) is not."""
    import torch

    to = (lambda a: torch.from_numpy(a)) if backend == "torch" else (lambda a: a)
    calls = _spy(monkeypatch)
    params = {"w": to(np.random.default_rng(0).standard_normal((12, 5)))}
    opt = pr.sketchy(learning_rate=1e-2, rank=3, mode=mode, merge_dims=4,
                     decomposition="incremental" if mode == "faithful" else None)
    state = opt.init(params)
    for step in range(3):
        grads = {"w": to(np.random.default_rng(step + 1).standard_normal((12, 5)))}
        _, state = opt.update(grads, state, params, **({"step": step} if host_step else {}))
        assert calls == ([(1, 5, 5)] if taken else []), step
    sigma = np.asarray(state.groups[next(iter(state.groups))]["sketches/0/0/singular_values"])
    assert sigma.shape == (3,) and (sigma > 0).all()
