"""AGD's step helpers (``precond_ref/methods/agd.py``) against the plain formulas they state (float64).

The step calls these helpers one equation a line; each test here checks one helper against the
formula its docstring states, with a tolerance from the rounding model of the two forms.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

agd_module = importlib.import_module("precond_ref.methods.agd")

EPS = np.finfo(np.float64).eps
RNG = np.random.default_rng(32)
G = RNG.normal(size=64) * np.logspace(-3, 3, 64)
M_PREV = RNG.normal(size=64) * np.logspace(3, -3, 64)


def _config(b1, b2, lr=0.1, delta=1e-3, wd=0.0, faithful=False, win=False):
    return agd_module.AGDConfig(lr, b1, b2, delta, wd, amsgrad=False, clip=None, win=win, faithful=faithful, decay=None)


def _step_scalars(backend, rule, config, t):
    """``rule``'s step scalars at step ``t`` as the runner makes them for a float64 state
    (``engine.elementwise.step_scalars``: each array field cast to float64)."""
    from precond_ref.engine.elementwise import step_scalars

    count = backend.asarray(np.asarray(t - 1, dtype=np.int32))
    return step_scalars(backend.xp, rule, config, count, lambda v: v, {}, backend.xp.float64, None)


def _scalars(backend, b1, b2, t, lr=0.1, delta=1e-3, wd=0.0, win=False):
    """The step's scalars of principled AGD (``agd._agd_scalars``) at step ``t``, float64."""
    return _step_scalars(backend, agd_module.AGD, _config(b1, b2, lr, delta, wd, win=win), t)


@pytest.mark.parametrize("b1", [0.0, 0.3, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("t", [1, 2, 3, 10, 300])
def test_stepwise_difference_is_the_papers_difference(property_backend, b1, t):
    """``_stepwise_difference`` (either rewriting, with its coefficients from ``_difference_coefficients``) equals the paper's s_t = m^_t - m^_{t-1}.

    Plain formula (spec §2.1): s_t = m_t/(1 - b1^t) - m_{t-1}/(1 - b1^{t-1}), with m^_0 = 0, where
    m_t = b1 m_{t-1} + (1 - b1) g_t is the momentum the step passes in. Rounding model: the plain
    form is off by about eps (|m^_t| + |m^_{t-1}|) (two divisions, one subtraction); the rewrite
    s_t = a g_t - d m_t (b1 >= 1/2) reads m_t, whose own rounding eps (|b1 m_{t-1}| + |(1-b1) g_t|)
    it scales by |d|, and forms a, d in about five roundings each; both take 1 - b1^t and
    1 - b1^{t-1} from a rounded power, which the subtraction conditions by b1^t/(1 - b1^t): so
    8 eps times the magnitudes of every term involved, so conditioned, bounds the difference. Both rewritings are
    checked: b1 >= 1/2 takes the form from the new momentum, b1 < 1/2 the form from the old one.
    """
    backend = property_backend
    xp = backend.xp
    m_prev = np.zeros_like(M_PREV) if t == 1 else M_PREV
    m_new = b1 * m_prev + (1.0 - b1) * G
    c = _scalars(backend, b1, 0.999, t)
    got = backend.to_numpy(
        agd_module._stepwise_difference(c, backend.asarray(G), backend.asarray(m_prev), backend.asarray(m_new))
    )
    bc1, bc1_prev = 1.0 - b1**t, 1.0 - b1 ** (t - 1)
    m_hat, m_hat_prev = m_new / bc1, (m_prev / bc1_prev if t > 1 else np.zeros_like(G))
    want = m_hat - m_hat_prev
    a = (1.0 - b1) / (b1 * bc1_prev) if (t > 1 and b1 > 0) else 0.0
    d = a / bc1 if t > 1 else 1.0 / bc1
    # 1 - b1^t loses b1^t/(1 - b1^t) of relative accuracy (the power's rounding, 500 eps for
    # b1 = 0.999 at t = 2), and each form may round the power differently.
    cond = b1**t / bc1 + (b1 ** (t - 1) / bc1_prev if t > 1 else 0.0)
    scale = (1.0 + cond) * (np.abs(m_hat) + np.abs(m_hat_prev)) + np.abs(a * G) + abs(d) * (
        np.abs(m_new) + np.abs(b1 * m_prev) + np.abs((1.0 - b1) * G)
    )
    assert np.all(np.abs(got - want) <= 8 * EPS * scale), float(np.max(np.abs(got - want) / scale / EPS))


def test_stepwise_difference_reads_the_new_momentum_for_large_b1(property_backend):
    """For b1 >= 1/2 the helper's value depends on m_{t-1} only through m_t (the rewrite's point:
    a compiled step then has no loop reading the old momentum); for b1 < 1/2 it reads m_{t-1}.
    Checked by passing a wrong m_{t-1}: the large-b1 result must not move."""
    backend = property_backend
    xp = backend.xp
    m_new = 0.9 * M_PREV + 0.1 * G
    args = (backend.asarray(G), backend.asarray(M_PREV), backend.asarray(m_new))
    wrong = (backend.asarray(G), backend.asarray(2.0 * M_PREV), backend.asarray(m_new))
    c = _scalars(backend, 0.9, 0.999, 5)
    same = [backend.to_numpy(agd_module._stepwise_difference(c, *x)) for x in (args, wrong)]
    np.testing.assert_array_equal(same[0], same[1])
    c = _scalars(backend, 0.3, 0.999, 5)
    moved = [backend.to_numpy(agd_module._stepwise_difference(c, *x)) for x in (args, wrong)]
    assert not np.array_equal(moved[0], moved[1])


@pytest.mark.parametrize("t", [1, 7, 1000])
def test_ratio_is_the_switched_adaptive_ratio(property_backend, t):
    """``_auto_switch`` (principled, unclipped) is m^_t / max(sqrt(b^_t), delta) with m^ = m/(1 - b1^t), b^ = b/(1 - b2^t):
    element-wise within the rounding model below, and the switch picks delta exactly where
    sqrt(b^) < delta.

    Rounding model (u = eps/2, each side computed independently: the step in the backend's
    arithmetic, the reference in NumPy/Python float64):

    - the powers b^t: neither side's ``pow`` is correctly rounded by contract (NumPy's SIMD pow
      and the C library's differ, numpy/numpy#23289); each is faithful, within 1 ulp <= eps b^t,
      and exact where b^t is representable (t = 1);
    - 1 - b^t: exact for b^t >= 1/2 (Sterbenz), else one rounding u; the subtraction multiplies
      the power's relative error by c = b^t/(1 - b^t) (142 for b2 = 0.999 at t = 7);
    - m/bc1 one rounding; v/bc2 one, its square root halves the relative error it reads and
      rounds once; the maximum is exact; the last division rounds once.

    One side: eps (c1 + c2/2) + 4.5 u; the two sides' difference at most twice that,
    2 eps (c1 + c2/2) + 4.5 eps, taken as 2 eps (c1 + c2/2) + 5 eps.
    """
    backend = property_backend
    b1, b2, delta = 0.9, 0.999, 1e-3
    v = np.abs(G) ** 2 * 1e-3
    c = _scalars(backend, b1, b2, t, delta=delta)
    config = _config(b1, b2, delta=delta)
    got = backend.to_numpy(agd_module._auto_switch(backend.xp, config, c, backend.asarray(M_PREV), backend.asarray(v)))
    want = (M_PREV / (1 - b1**t)) / np.maximum(np.sqrt(v / (1 - b2**t)), delta)

    def conditioning(b):  # the relative error of 1 - b^t per relative error of a rounded b^t
        return 0.0 if t == 1 else b**t / (1 - b**t)

    rtol = 2 * EPS * (conditioning(b1) + conditioning(b2) / 2) + 5 * EPS
    np.testing.assert_allclose(got, want, rtol=rtol, atol=0)
    if t > 1:  # another pow: each power 1 ulp off, both raising the ratio (1 - b1^t down, 1 - b2^t up)
        ulp_off = c._replace(
            bc1=backend.asarray(np.asarray(1.0 - np.nextafter(b1**t, 1.0))),
            bc2=backend.asarray(np.asarray(1.0 - np.nextafter(b2**t, 0.0))),
        )
        moved = backend.to_numpy(agd_module._auto_switch(backend.xp, config, ulp_off, backend.asarray(M_PREV), backend.asarray(v)))
        np.testing.assert_allclose(moved, want, rtol=rtol, atol=0)
    assert np.any(np.sqrt(v / (1 - b2**t)) < delta) and np.any(np.sqrt(v / (1 - b2**t)) > delta)


def test_faithful_corrections_are_the_authors_float32_scalars(property_backend):
    """``_faithful_scalars`` gives the authors' float32 scalars (spec §2.2 steps 2, 7, 9), which the
    runner casts to the float64 state:
    1/(1 - b1^t), 1/(1 - b1^{t-1}) (1 at t = 1), lr sqrt(1 - b2^t)/(1 - b1^t) and delta sqrt(1 - b2^t),
    each operation rounded to float32 (+ - * / are correctly rounded; the powers are float32(b)^t
    rounded once, the square root is the correctly rounded one). Exact equality: every step is one
    IEEE float32 operation, written here in NumPy float32 scalars."""
    backend = property_backend
    f = np.float32
    b1, b2, lr, delta = 0.9, 0.95, 0.05, 1e-5
    for t in (1, 2, 9, 40):
        c = _step_scalars(backend, agd_module.AGD_FAITHFUL, _config(b1, b2, lr, delta, faithful=True), t)
        power = lambda b, n: f(np.float64(f(b)) ** n)  # noqa: E731
        bc1, bc2 = f(1) - power(b1, t), f(1) - power(b2, t)
        bc1_prev = f(1) if t == 1 else f(1) - power(b1, t - 1)
        root = f(np.sqrt(np.float64(bc2)))
        eta32 = f(f(lr) * root) / bc1
        want = dict(inv_bc1=f(1) / bc1, inv_bc1_prev=f(1) / bc1_prev, eta=eta32, floor=f(delta) * root)
        for name, value in want.items():
            got = backend.to_numpy(getattr(c, name))
            assert got.dtype == np.float64 and float(got) == float(np.float64(value)), (t, name)


def test_win_is_the_stated_extrapolation(property_backend):
    """``_win_iterate`` and ``_win_step``: z' = (z - eta r)/(1 + wd eta), theta' = (theta - 2 eta r
    + 2 z')/(3 + 2 eta wd), within 8 eps of the magnitudes involved (a handful of roundings per
    element)."""
    backend = property_backend
    eta, wd = 0.1, 0.3
    config = _config(0.9, 0.999, lr=eta, wd=wd, win=True)
    c = _scalars(backend, 0.9, 0.999, 3, lr=eta, wd=wd, win=True)
    theta, z, r = (backend.asarray(a) for a in (M_PREV, 0.5 * M_PREV + 0.1, G))
    z_new = agd_module._win_iterate(config, c, z, r)
    new_theta = backend.to_numpy(agd_module._win_step(config, c, theta, z_new, r))
    z_new = backend.to_numpy(z_new)
    theta, z, r = M_PREV, 0.5 * M_PREV + 0.1, G
    want_z = (z - eta * r) / (1 + wd * eta)
    want_theta = (theta - 2 * eta * r + 2 * want_z) / (3 + 2 * eta * wd)
    scale = np.abs(theta) + np.abs(z) + np.abs(eta * r)
    assert np.all(np.abs(z_new - want_z) <= 8 * EPS * scale)
    assert np.all(np.abs(new_theta - want_theta) <= 8 * EPS * scale)
