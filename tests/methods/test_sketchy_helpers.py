"""Each helper of Sketchy's step (precond_ref/methods/sketchy.py) computes the formula its docstring
states, checked on small NumPy arrays against that formula written out (float64; the helpers do
the same operations, so equality is to a few ulps: rtol 1e-15 or exact). The step composes them in
the order of the table in the module's docstring (the engine, ``engine.axes.kronecker_transform``,
runs them); docs/methods/sketchy.md maps each equation to these names, and the last test checks that
every name there exists."""

from __future__ import annotations

import functools
import importlib
import pathlib
import re

import array_api_compat.numpy as xp
import numpy as np
import pytest

from precond_ref.engine import axes

sk = importlib.import_module("precond_ref.methods.sketchy")
sketch_module = importlib.import_module("precond_ref.sketch")
rng = np.random.default_rng(0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("eps", [1e-3, 1e-23, 1e-40, 5e-324, 0.0])
def test_rmsprop_graft_is_g_over_root_of_v_and_zero_where_v_is_zero(eps, dtype):
    """D_g = G / sqrt(v + eps_g): the plain formula where eps_g is a normal number of the dtype
    (every denominator positive), else 0 where v = 0 (no 0/0 at an eps_g that is 0 or subnormal:
    1e-40 in float32, 5e-324 in float64). v = 0 at a zero G, and at a G whose square underflowed
    (1e-22 beside v = 0), which the plain formula divides by sqrt(eps_g); -0.0 equals 0.0 here."""
    g, v = rng.standard_normal((3, 4)).astype(dtype), rng.random((3, 4)).astype(dtype)
    g[0, 0] = v[0, 0] = 0.0
    g[1, 1], v[1, 1] = -0.0, 0.0
    g[2, 2], v[2, 2] = 1e-22, 0.0
    got = sk._rmsprop_graft(xp, g, v, eps)
    if dtype(eps) >= np.finfo(dtype).smallest_normal:
        want = g / np.sqrt(v + dtype(eps))
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            want = np.where(v > 0, g / np.sqrt(np.where(v > 0, v, 1) + dtype(eps)), 0).astype(dtype)
    assert got.dtype == dtype and np.all(np.isfinite(got))
    np.testing.assert_array_equal(got, want)


def _norm_ratio_rtol(n: int) -> float:
    """Two float64 evaluations of ``p ||d||_F / ||p||_F`` (n entries each), in any summation order,
    differ by at most ``2 (n + 4) u``: each norm's sum of squares carries ``n u`` (recursive
    summation, the squares' rounding included), halved by the square root, plus a rounding for the
    root, the quotient and the product: ``(n + 4) u`` for one evaluation (u = eps / 2)."""
    return 2 * (n + 4) * float(np.finfo(np.float64).eps) / 2


def test_grafted_direction_has_the_graft_norm_and_is_the_graft_before_start():
    """U = P ||D_g||_F / ||P||_F (0 for P = 0), spec ``fd_shampoo.md`` §2.3 step 4, each leaf's from
    its own norms though the scales of all leaves are made on their norms stacked
    (``engine.axes._scaled_by_norms``); D_g itself while count < start_preconditioning_step
    (``_started``)."""
    p, d = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    q, e = rng.standard_normal(5), rng.standard_normal(5)
    scale = functools.partial(sk._grafted, xp)
    got, other, zero = axes._scaled_by_norms(xp, scale, [p, q, np.zeros_like(p)], [d, e, d])
    np.testing.assert_allclose(got, p * (np.linalg.norm(d) / np.linalg.norm(p)), rtol=_norm_ratio_rtol(p.size))
    np.testing.assert_allclose(other, q * (np.linalg.norm(e) / np.linalg.norm(q)), rtol=_norm_ratio_rtol(q.size))
    np.testing.assert_array_equal(zero, np.zeros_like(p))
    start = sk.SketchyConfig(*(None,) * len(sk.SketchyConfig._fields))._replace
    for count, first, want in ((2, 3, d), (3, 3, got), (0, 0, got)):
        c = start(start_preconditioning_step=first)
        np.testing.assert_array_equal(sk._started(xp, c, np.asarray(count, dtype=np.int32), got, d), want)


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("ema", [True, False])
def test_momentum_trace_and_direction(nesterov, ema):
    """m_t = mu m + c U (c = 1 - mu with momentum_ema, else 1); direction c U + mu m_t (Nesterov)
    or m_t."""
    u, m, mu = rng.standard_normal(5), rng.standard_normal(5), 0.9
    direction, trace = sk._momentum(xp, u, m, mu, nesterov, ema)
    cu = (1 - mu) * u if ema else u
    np.testing.assert_array_equal(trace, cu + mu * m)
    np.testing.assert_array_equal(direction, cu + mu * (cu + mu * m) if nesterov else cu + mu * m)


def test_every_function_named_in_the_docs_table_exists():
    """The 'Where each equation is computed' table of docs/methods/sketchy.md names functions of
    sketchy.py (or ``sketch.<name>`` / ``blocking.<name>`` / ``linalg.<name>`` / ``axes.<name>`` of the engine) and
    closures of the factory; each exists."""
    page = (pathlib.Path(__file__).parents[2] / "docs/methods/sketchy.md").read_text()
    table = page.split("### Where each equation is computed", 1)[1].split("\n\n## ", 1)[0]
    names: set = set()
    for row in re.findall(r"^\|.*\| *(.*?) *\|$", table, re.M):
        names.update(re.findall(r"`([\w.]+)`", row))
    closures = {"update_group", "update_groups"}
    source = pathlib.Path(sk.__file__).read_text()
    assert len(names) >= 14
    for name in names:
        if name in closures:
            assert f"def {name}(" in source, name
        elif name.startswith(("sketch.", "blocking.", "linalg.", "axes.")):
            module, attr = name.split(".")
            package = "precond_ref.engine" if module == "axes" else "precond_ref"
            assert hasattr(importlib.import_module(f"{package}.{module}"), attr), name
        else:
            assert hasattr(sk, name), name


def test_the_hyperparameters_paragraph_states_the_resolved_precondition_every():
    """docs/methods/sketchy.md's ``sketchy`` hyperparameters name ``precondition_every`` once, with
    the defaults the factory resolves None to: :data:`PRINCIPLED_PRECONDITION_EVERY` (3) in
    principled mode and the authors' 1 in faithful mode."""
    page = (pathlib.Path(__file__).parents[2] / "docs/methods/sketchy.md").read_text()
    paragraph = page.split("## Hyperparameters", 1)[1].split("`sketchy`:", 1)[1].split("\n\n", 1)[0]
    stated = re.findall(r"`precondition_every` ([^,]*)", paragraph)
    assert stated == [f"None (principled {sk.PRINCIPLED_PRECONDITION_EVERY}"], stated
    assert "faithful 1" in paragraph.split("`precondition_every` None", 1)[1].split(")", 1)[0]

