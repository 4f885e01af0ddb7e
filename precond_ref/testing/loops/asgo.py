r"""Loop oracles of ASGO and DASGO (An, Liu, Pan, Ren, Ma, Goldfarb, Zhang, "ASGO: Adaptive Structured
Gradient Optimization", arXiv:2503.20762, NeurIPS 2025; spec ``asgo.md``).

Plain float64 NumPy, one leaf, one block of a side and one step at a time, ``np.linalg.eigh`` per
block, written from the spec and the factory docstrings of :func:`precond_ref.asgo` and
:func:`precond_ref.dasgo`, not from the fast code; tested equal to it
(``tests/testing/test_loop_oracles.py``). ``step(grads, params) -> updates``.

Leaves: a leaf with at least 2 axes is preconditioned as its matrix view (m, n) = (first axis,
product of the others); 0-D and 1-D leaves take the fallback Adam (:func:`fallback_adam`). Only the
default fallback rule (fewer than 2 axes) and out-first leaves are covered.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

from ...blocking import block_bounds, stable_hash
from ...linalg import POLAR_EXPRESS_COEFFICIENTS
from ...transform import check_mode
from ._tree import build, leaves, value_at

__all__ = ["LoopASGO", "LoopDASGO"]


def _lerp(start, end, weight: float):
    """``torch.lerp(start, end, weight)`` in its two-branch form (the authors' EMA, faithful mode)."""
    if abs(weight) < 0.5:
        return start + weight * (end - start)
    return end - (end - start) * (1.0 - weight)


def _ema(old, new, decay: float, faithful: bool):
    """``decay·old + (1 − decay)·new``; faithful: as the authors' ``old.lerp_(new, 1 − decay)``."""
    return _lerp(old, new, 1.0 - decay) if faithful else decay * old + (1 - decay) * new


def _matrix(x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[0], -1)


def _momentum(m: np.ndarray, g: np.ndarray, mu: float, faithful: bool) -> np.ndarray:
    """``M ← μ·M + (1 − μ)·G`` (faithful: in ``lerp`` form); principled mode flushes entries below
    the smallest normal float64 to zero (D12), which changes nothing on ordinary inputs."""
    m = _ema(m, g, mu, faithful)
    if not faithful:
        m[np.abs(m) < np.finfo(np.float64).tiny] = 0.0
    return m


def _matrix_side(w: np.ndarray, side: str) -> tuple[int, int, bool]:
    """(m, n) of the leaf's matrix view, and whether its preconditioned side is the left one
    (``"auto"``: the smaller side, the right one for a square matrix)."""
    m, n = _matrix(w).shape
    return m, n, {"left": True, "right": False, "auto": m < n}[side]


def _renormalise(u: np.ndarray, rms_target) -> np.ndarray:
    """``r·√(mn)·U/‖U‖_F`` (RMS of the step = r); a zero U stays zero (D2); U itself for ``None``."""
    if rms_target is None:
        return u
    norm = np.sqrt(sum(u[i, j] ** 2 for i in range(u.shape[0]) for j in range(u.shape[1])))
    return u if norm == 0 else u * (rms_target * math.sqrt(u.size) / norm)


def fallback_adam(state: dict, g: np.ndarray, w: np.ndarray, t: int, eta: float, h: dict, faithful: bool) -> np.ndarray:
    """The fallback Adam of a non-matrix leaf (bias-corrected), its update; ``t`` = count + 1::

        (faithful: g ← g + λ_f·w, torch.optim.Adam's L2 term)
        μ ← b1·μ + (1 − b1)·g;  ν ← b2·ν + (1 − b2)·g²
        u = −(η/(1 − b1^t))·μ / (√ν/√(1 − b2^t) + ε)   (principled: − η·λ_f·w, decoupled, D11)
    """
    b1, b2, eps, wd = h["fallback_b1"], h["fallback_b2"], h["fallback_eps"], h["fallback_weight_decay"]
    if faithful and wd != 0:
        g = g + wd * w
    state["mu"] = _ema(state["mu"], g, b1, faithful)
    state["nu"] = b2 * state["nu"] + (1 - b2) * (g * g)
    u = -(eta / (1 - b1**t)) * (state["mu"] / (np.sqrt(state["nu"]) / np.sqrt(1 - b2**t) + eps))
    if not faithful and wd != 0:
        u = u - eta * wd * w
    return u


def _one_sided_step(self, grads: dict, params: dict) -> dict:
    """One step of ASGO or DASGO (``self``), leaf by leaf: non-matrix leaves by :func:`fallback_adam`;
    a matrix leaf's momentum, its side's preconditioning (``self._precondition`` on the oriented
    gradient and momentum: rows are the preconditioned side), the RMS renormalisation and the
    decoupled decay: ``updates = −η·(r·√(mn)·U/‖U‖_F + λ·W)``."""
    h, eta, updates = self.h, value_at(self.h["lr"], self.count), {}
    faithful, w_all = h["faithful"], dict(leaves(params))
    for path, g in leaves(grads):
        st, w = self.state[path], w_all[path]
        if "mu" in st:
            updates[path] = fallback_adam(st, g, w, self.count + 1, eta, h, faithful)
            continue
        G = _matrix(g)
        st["M"] = _momentum(st["M"], G, h["b1"], faithful)
        u_o = self._precondition(st, *((G, st["M"]) if st["left"] else (G.T, st["M"].T)))
        u = _renormalise(u_o if st["left"] else u_o.T, h["r"])
        updates[path] = (-eta * (u + h["wd"] * _matrix(w))).reshape(g.shape)
    self.count += 1
    return build(updates)


_FALLBACK_DEFAULTS = dict(fallback_b1=0.9, fallback_b2=0.95, fallback_eps=1e-8, fallback_weight_decay=0.0)


def faithful_inverse_sqrt(p: np.ndarray, method: str, steps: int, eps: float) -> np.ndarray:
    """The authors' ``P^{-1/2}`` of the undamped statistic (spec §2.6), in P's dtype (float32); the
    authors' Polar-Express triples are the library's table of constants,
    :data:`precond_ref.linalg.POLAR_EXPRESS_COEFFICIENTS` (Amsel et al. 2025)::

        polar_express:  ν = 1.01·‖P + εI‖_F, Y = P/ν;  triples j < 8 divided by (1.01, 1.01³, 1.01⁵),
                        the eighth repeated
        newton_schulz:  ν = ‖P‖_F, Y = (P + εI)/(ν + ε);  the triple (2, −3/2, 1/2)
        Z = I;  per step: B = b·ZY + c·(ZY)²;  Y ← a·Y + Y B;  Z ← a·Z + B Z;   result Z/√ν
    """
    dtype = p.dtype.type
    eye = np.eye(p.shape[0], dtype=p.dtype)
    if method == "polar_express":
        nu = dtype(1.01) * np.linalg.norm(p + dtype(eps) * eye)
        y = p / nu
        pe = POLAR_EXPRESS_COEFFICIENTS
        safe = [(a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in pe[:-1]] + [pe[-1]]
        triples = [safe[min(j, len(safe) - 1)] for j in range(steps)]
    else:
        nu = np.linalg.norm(p)
        y = (p + dtype(eps) * eye) / (nu + dtype(eps))
        triples = [(2.0, -1.5, 0.5)] * steps
    z = eye.copy()
    for a, b, c in triples:
        zy = z @ y
        poly = dtype(b) * zy + dtype(c) * (zy @ zy)
        y = dtype(a) * y + y @ poly
        z = dtype(a) * z + poly @ z
    return z / np.sqrt(nu)


class LoopASGO:
    r"""ASGO (spec ``asgo.md`` §2.3-2.5): principled mode with the exact root (``root_method="eigh"``),
    and faithful mode (the authors' ``optimizers/asgo.py``, below).

    Per matrix leaf W (m×n) on its side (``"auto"``: left if m < n, else right; right is the left
    rule on the transpose), the side of length k cut into blocks of ``block_size``
    (:func:`precond_ref.blocking.block_bounds`), block j holding the rows X_j of the oriented gradient::

        M   ← μ·M + (1 − μ)·G                                   momentum, whole leaf
        P_j ← sym(β₂·P_j + (1 − β₂)·X_j X_jᵀ)                   ("sum": P_j + X_j X_jᵀ), stored symmetrised (D10)
        if block j is due:                                      phase (stable_hash(sides) + j) mod T
            s_j = δ·tr(P_j)/k_j + ε                             relative damping (D1), k_j the block size
            Z_j = V diag((max(λ_i, 0) + s_j)^{-1/2}) Vᵀ,  P_j = V diag(λ) Vᵀ   (eigh; algorithm 1's V^{-1/2})
        U_j = Z_j M_j                                           M_j the block's rows of the oriented momentum
        W   ← W − η·(r·√(mn)·U/‖U‖_F + λ·W)                     RMS renormalisation per leaf, decoupled decay

    A block is due on the first update and then when ``count % T`` equals its phase; ``T`` =
    ``precondition_every``; without ``spread_refresh`` (or T = 1) every block's phase is 0. The phase
    key is the leaf's matrix sides in increasing order ``str((min, max))`` hashed by
    :func:`precond_ref.blocking.stable_hash` (the library's schedule; the oracle calls that helper).
    A non-due block keeps its previous root. Momentum entries below the smallest normal float64 are
    flushed to zero (D12), which changes nothing on the test inputs. Principled mode always roots by
    ``eigh`` (the library's iterative roots approximate it; ``root_method`` is read in faithful mode).

    Faithful mode: no blocks, no damping, T = 1 by default, all blocks together; the EMAs in
    ``torch.lerp`` form; the statistic in float32 (``X Xᵀ`` rounded to float32 and not symmetrised),
    rooted by the authors' float32 iteration (:func:`faithful_inverse_sqrt`, ``eps`` in its
    normaliser only), a non-finite root replaced by the identity; ``Z`` cast back to float64 for
    ``U = Z M``. Matrix leaves only (the authors' code raises on others); 1-D leaves take the
    fallback Adam in ``torch.optim.Adam`` form.
    """

    def __init__(self, params: dict, *, learning_rate: Any = None, b1: float = 0.9, b2: float = 0.8,
                 weight_decay: float = 0.1, damping: Optional[float] = None, eps: Optional[float] = None,
                 precondition_every: Optional[int] = None, rms_target: Any = 0.2, accumulator: str = "ema",
                 side: str = "auto", block_size: Optional[int] = None, spread_refresh: Optional[bool] = None,
                 mode: str = "principled", root_method: Optional[str] = None, root_steps: int = 10, **fallback):
        check_mode(mode)  # a misspelt mode would run the principled rule
        faithful = mode == "faithful"
        if learning_rate is None:  # the mode's default step size: the authors' 1e-2, principled 0.0316
            learning_rate = 1e-2 if faithful else 0.0316
        if faithful:
            T, spread_refresh, block_size = precondition_every or 1, False, None
            damping, eps = 0.0, 1e-10 if eps is None else eps
        else:
            T, block_size = precondition_every or 2, block_size or 1024
            damping, eps = 1e-4 if damping is None else damping, 1e-30 if eps is None else eps
            spread_refresh = spread_refresh is not False
        self.h = dict(lr=learning_rate, b1=b1, b2=b2, wd=weight_decay, delta=damping, eps=eps, T=T, r=rms_target,
                      summed=accumulator == "sum", side=side, spread=spread_refresh and T > 1, faithful=faithful,
                      root=root_method or "polar_express", steps=root_steps, **{**_FALLBACK_DEFAULTS, **fallback})
        self.count = 0
        self.state = {}
        for path, w in leaves(params):
            if w.ndim < 2:  # the fallback Adam's moments
                self.state[path] = {"mu": np.zeros(w.shape), "nu": np.zeros(w.shape)}
                continue
            m, n, left = _matrix_side(w, side)
            bounds = block_bounds(m if left else n, block_size)
            sides = str(tuple(sorted((m, n))))
            stat = np.float32 if faithful else np.float64
            self.state[path] = {
                "left": left, "bounds": bounds, "M": np.zeros((m, n)),
                "P": [np.zeros((b - a, b - a), dtype=stat) for a, b in bounds],
                "Z": [np.eye(b - a) for a, b in bounds],
                "phase": [(stable_hash(sides) + j) % self.h["T"] if self.h["spread"] else 0 for j in range(len(bounds))],
            }

    def _due(self, phase: int) -> bool:
        return self.count == 0 or self.count % self.h["T"] == phase

    def _root(self, p: np.ndarray) -> np.ndarray:
        """``(P + sI)^{-1/2}``, ``s = δ·tr(P)/k + ε``, by ``eigh``, eigenvalues clamped at 0; faithful:
        the authors' iteration on the undamped P, the identity where it is not finite."""
        h = self.h
        if h["faithful"]:
            z = faithful_inverse_sqrt(p, h["root"], h["steps"], h["eps"])
            return z if np.all(np.isfinite(z)) else np.eye(p.shape[0], dtype=p.dtype)
        k = p.shape[0]
        s = h["delta"] * np.trace(p) / k + h["eps"]
        lam, v = np.linalg.eigh(p)
        return v @ np.diag((np.maximum(lam, 0.0) + s) ** -0.5) @ v.T

    def _precondition(self, st: dict, g_o: np.ndarray, m_o: np.ndarray) -> np.ndarray:
        """``U = blockdiag(Z_j)·M`` on the oriented side, the statistics and due roots refreshed."""
        h, faithful = self.h, self.h["faithful"]
        u_o = np.zeros_like(m_o)
        for j, (a, b) in enumerate(st["bounds"]):
            x = g_o[a:b]
            stat = (x @ x.T).astype(st["P"][j].dtype)
            p = st["P"][j] + stat if h["summed"] else _ema(st["P"][j], stat, h["b2"], faithful)
            st["P"][j] = p if faithful else (p + p.T) / 2
            if self._due(st["phase"][j]):
                st["Z"][j] = self._root(st["P"][j])
            u_o[a:b] = st["Z"][j].astype(np.float64) @ m_o[a:b]
        return u_o

    step = _one_sided_step


class LoopDASGO:
    r"""DASGO (spec ``asgo.md`` §2.6-2.7; the authors' ``optimizers/dasgo.py``), both modes.

    Per matrix leaf W (m×n), on the right side (the authors' choice; left: rows instead of columns)::

        M   ← μ·M + (1 − μ)·G
        q_j = Σ_i G_ij²                                         diag(GᵀG), one column at a time
        v_j ← β₂·v_j + (1 − β₂)·q_j
        U_ij = M_ij / √(v_j + ε)
        W   ← W − η·(r·√(mn)·U/‖U‖_F + λ·W)                     a zero U stays zero (D2)

    Faithful mode: the EMAs in ``torch.lerp`` form and the statistic v in float32 (as the authors'
    code, whatever the parameter dtype), its ``1/√(v + ε)`` formed in float32; emulated here with
    NumPy float32 scalars. Non-matrix leaves: :func:`fallback_adam`.
    """

    def __init__(self, params: dict, *, learning_rate: Any = 1e-2, b1: float = 0.9, b2: float = 0.95,
                 eps: float = 1e-8, weight_decay: float = 0.1, rms_target: Any = 0.2, side: str = "right",
                 mode: str = "principled", **fallback):
        check_mode(mode)  # a misspelt mode would run the principled rule
        self.h = dict(lr=learning_rate, b1=b1, b2=b2, eps=eps, wd=weight_decay, r=rms_target, side=side,
                      faithful=mode == "faithful", **{**_FALLBACK_DEFAULTS, **fallback})
        self.count = 0
        self.state = {}
        for path, w in leaves(params):
            if w.ndim < 2:
                self.state[path] = {"mu": np.zeros(w.shape), "nu": np.zeros(w.shape)}
                continue
            m, n, left = _matrix_side(w, side)
            dtype = np.float32 if mode == "faithful" else np.float64
            self.state[path] = {"left": left, "M": np.zeros((m, n)), "v": np.zeros(m if left else n, dtype=dtype)}

    def _precondition(self, st: dict, g_o: np.ndarray, m_o: np.ndarray) -> np.ndarray:
        """``U = diag(v + ε)^{-1/2} M`` on the oriented side (rows: the scaled axis), ``v`` refreshed."""
        h = self.h
        u_o = np.zeros_like(m_o)
        for j in range(g_o.shape[0]):
            q = sum(g_o[j, i] ** 2 for i in range(g_o.shape[1]))
            if h["faithful"]:
                st["v"][j] = _lerp(st["v"][j], np.float32(q), np.float32(1.0 - h["b2"]))
                scale = np.float64(np.float32(1.0) / np.sqrt(st["v"][j] + np.float32(h["eps"])))
            else:
                st["v"][j] = h["b2"] * st["v"][j] + (1 - h["b2"]) * q
                scale = 1.0 / np.sqrt(st["v"][j] + h["eps"])
            u_o[j] = m_o[j] * scale
        return u_o

    step = _one_sided_step
