"""``linalg.rank_one_update_eigh``: the eigendecomposition of diag(d) + z z^T by the secular
equation, against ``eigh`` of the same matrix.

Invariants (the rounding model of a backward-stable symmetric eigensolver, Golub and Van Loan
8.1 and Gu and Eisenstat 1994 for this method): the eigenvalues within ``c n u ||A||`` of ``eigh``'s,
``V diag(lambda) V^T`` within ``c n u ||A||`` of A, and ``V^T V`` within ``c n u`` of the identity,
``u`` the unit roundoff of the dtype, ``c = 4``.
"""

from __future__ import annotations

import numpy as np
import pytest

import sync_guard
from backends import BACKENDS
from precond_ref.linalg import rank_one_update_eigh

C = 4.0


def _cases(n: int, rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Problems an FD step makes (an empty sketch, shrunk directions at 0) and the hard ones of the
    secular equation (ties, tiny weights, poles a few ulps apart, extreme scales)."""
    d = np.sort(rng.random(n))[::-1] ** 2
    z = rng.standard_normal(n)
    zero_tail = np.concatenate([d[:-3], np.zeros(3)])
    z_zero_tail = z.copy()
    z_zero_tail[-3:-1] = 0.0
    tied = d.copy()
    tied[1:4] = tied[1]
    small = z.copy()
    small[::2] *= 1e-12
    return {
        "random": (d, z),
        "shrunk directions": (zero_tail, z_zero_tail),
        "empty sketch": (np.zeros(n), np.concatenate([np.zeros(n - 1), [3.0]])),
        "zero update": (d, np.zeros(n)),
        "tied poles": (tied, z),
        "tiny weights": (d, small),
        "poles ulps apart": (np.sort(1.0 + 1e-14 * rng.random(n)), z),
        "large": (d * 1e200, z * 1e100),
        "small": (d * 1e-200, z * 1e-100),
    }


def _check(d: np.ndarray, z: np.ndarray, values: np.ndarray, vectors: np.ndarray, u: float) -> None:
    a = np.diag(d.astype(np.float64)) + np.outer(z, z)
    n = len(d)
    norm = max(np.linalg.norm(a, 2), np.finfo(np.float64).tiny)
    bound = C * n * u
    assert np.all(np.diff(values) >= 0.0)
    assert np.max(np.abs(values - np.linalg.eigvalsh(a))) <= bound * norm
    assert np.linalg.norm(vectors @ np.diag(values) @ vectors.T - a, 2) <= bound * norm
    assert np.linalg.norm(vectors.T @ vectors - np.eye(n), 2) <= bound


@pytest.mark.parametrize("n", [4, 17, 65])
def test_against_eigh_float64(n: int) -> None:
    for name, (d, z) in _cases(n, np.random.default_rng(n)).items():
        values, vectors = rank_one_update_eigh(d, z)
        _check(d, z, np.asarray(values), np.asarray(vectors), np.finfo(np.float64).eps / 2)


def test_poles_one_or_two_ulps_apart() -> None:
    """25 poles one or two ulps apart and 5 far ones: the eigenvectors from the recomputed y_hat
    (step 5) stay orthogonal; from y itself they lose it (6 n u here)."""
    rng = np.random.default_rng(7)
    d = np.nextafter(0.5, 1.0) + np.zeros(25)
    for i in range(1, 25):
        d[i:] = np.nextafter(d[i:], 1.0) if i % 3 else np.nextafter(np.nextafter(d[i:], 1.0), 1.0)
    d = np.concatenate([d, np.sort(rng.random(5)) + 1.0])
    z = rng.standard_normal(30) * 10.0 ** rng.uniform(-3, 0, 30)
    values, vectors = rank_one_update_eigh(d, z)
    _check(d, z, values, vectors, np.finfo(np.float64).eps / 2)


def test_stack_of_problems_is_each_problem() -> None:
    """A stack of problems gives each problem's own decomposition (the same arithmetic per row)."""
    cases = list(_cases(9, np.random.default_rng(1)).values())[:4] + list(_cases(9, np.random.default_rng(1)).values())[5:7]
    d, z = np.stack([c[0] for c in cases]), np.stack([c[1] for c in cases])
    values, vectors = rank_one_update_eigh(d, z)
    for i, (di, zi) in enumerate(cases):
        one_values, one_vectors = rank_one_update_eigh(di, zi)
        np.testing.assert_array_equal(values[i], one_values)
        np.testing.assert_array_equal(vectors[i], one_vectors)


@pytest.mark.parametrize("backend", BACKENDS, ids=str)
def test_every_backend(backend) -> None:
    """Every namespace gives the decomposition to the rounding model (float32 backends too: the
    solve runs in float64 where the backend has it, so float32 results carry float32's rounding)."""
    rng = np.random.default_rng(3)
    solve = rank_one_update_eigh
    if backend.name == "jax":  # as a JAX user runs it: traced once, not dispatched op by op
        import jax

        solve = jax.jit(rank_one_update_eigh)
    for name, (d, z) in list(_cases(12, rng).items())[:6]:
        dtype = np.float64 if backend.has_float64 else np.float32
        values, vectors = solve(backend.asarray(d.astype(dtype)), backend.asarray(z.astype(dtype)))
        _check(d.astype(dtype), z.astype(dtype), backend.to_numpy(values).astype(np.float64),
               backend.to_numpy(vectors).astype(np.float64), np.finfo(dtype).eps / 2)


def test_float32_results_carry_float32_rounding() -> None:
    d, z = _cases(33, np.random.default_rng(4))["random"]
    values, vectors = rank_one_update_eigh(d.astype(np.float32), z.astype(np.float32))
    assert values.dtype == np.float32 and vectors.dtype == np.float32
    _check(d.astype(np.float32), z.astype(np.float32), values.astype(np.float64), vectors.astype(np.float64),
           np.finfo(np.float32).eps / 2)


def test_no_host_read() -> None:
    """The whole solve is device work: no value is read on the host, nothing copied to the device
    (what a captured CUDA step needs; ``eigh`` on CUDA reads its status on the host)."""
    d, z = _cases(8, np.random.default_rng(5))["shrunk directions"]
    gd, gz = sync_guard.wrap(d), sync_guard.wrap(z)
    with sync_guard.armed():
        values, vectors = rank_one_update_eigh(gd, gz)
    _check(d, z, sync_guard.unwrap(values), sync_guard.unwrap(vectors), np.finfo(np.float64).eps / 2)


def test_a_bisection_step_is_eight_operations(monkeypatch) -> None:
    """Each of the solve's bisection steps issues eight array operations (the docstring's cost: a
    geometric midpoint, the signed sum, one comparison, the bracket's two ends), whatever the
    stack: on a GPU each is a kernel of the captured step, 65 steps a call in float64. Counted as
    torch dispatches them (``benchmarks.counting.count_step``), on one step of the loop."""
    import torch

    from precond_ref import linalg
    from precond_ref.benchmarks.counting import count_step

    counted = []
    loop = linalg.iterate

    def iterate(xp, count, body, carry):
        counted.append((count, count_step(lambda: body(carry))["operations"]))
        return loop(xp, count, body, carry)

    monkeypatch.setattr(linalg, "iterate", iterate)
    for batch in (1, 5):
        d, z = _cases(9, np.random.default_rng(batch))["random"]
        rank_one_update_eigh(torch.from_numpy(np.tile(d, (batch, 1))), torch.from_numpy(np.tile(z, (batch, 1))))
    assert counted == [(65, 8), (65, 8)]
