r"""Loop oracle of AGD (Yue, Ye, Jiang, Liu, Zhang, "AGD: an Auto-switchable Optimizer using Stepwise
Gradient Difference for Preconditioning Matrix", NeurIPS 2023, arXiv:2312.01658; spec ``agd.md``).

Plain float64 NumPy, one leaf and one element at a time, written from the spec and the factory
docstring of :func:`precond_ref.agd`, not from the fast code; tested equal to it
(``tests/testing/test_loop_oracles.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...transform import check_mode
from ._tree import build, leaves, value_at

__all__ = ["LoopAGD"]


class LoopAGD:
    r"""AGD (paper Algorithm 1; spec ``agd.md`` §2.2-2.3), per element, ``step(grads, params) -> updates``.

    Principled mode (default), per coordinate, from :math:`m_0 = b_0 = 0`, :math:`t` = count + 1::

        g   ← g + λ·θ                                  ("l2" decay only)
        m̂_prev = m / (1 − β₁^{t−1})   (0 at t = 1)
        m   ← β₁·m + (1 − β₁)·g;       m̂ = m / (1 − β₁^t)
        s   = m̂ − m̂_prev                               the stepwise difference (paper eq. 2)
        b   ← β₂·b + (1 − β₂)·s²;      b̂ = b / (1 − β₂^t)   (amsgrad: b_max ← max(b_max, b), b̂ from b_max)
        r   = m̂ / max(√b̂, δ)                            the auto-switch; clip: r ∈ [−clip, clip]
        θ   ← θ − η·r − η·λ·θ                           ("fixed": − λ·θ; "l2": no decay term)
        win: z ← (z − η·r)/(1 + λη);  θ ← (θ − 2η·r + 2z)/(3 + 2ηλ),  z₀ = θ₀ (D4), no decay term

    Faithful mode (the authors' ``agd.py``): the same arithmetic with their float32 bias-correction
    scalars (their step counter is a float32 tensor, spec §2.2 rounding note), computed here with
    NumPy float32 scalars as the library does: each power ``β^t`` in float64 from float32 ``β``,
    rounded once to float32; ``√(1 − β₂^t)`` in float64, rounded once. Their ratio is
    ``r = m / max(√b, δ·√bc2)`` (the clip bounds this raw ratio, D3) and the step ``η·√bc2/bc1·r``;
    Win starts at ``z₀ = 0``.
    """

    def __init__(self, params: dict, *, learning_rate: Any = 1e-3, b1: float = 0.9, b2: float = 0.999,
                 delta: Any = 1e-5, weight_decay: float = 0.0, weight_decay_mode: str = "decoupled",
                 amsgrad: bool = False, clip: Any = None, win: bool = False, mode: str = "principled"):
        check_mode(mode)  # a misspelt mode would run the principled rule
        self.h = dict(lr=learning_rate, b1=b1, b2=b2, delta=delta, wd=weight_decay, decay=weight_decay_mode,
                      amsgrad=amsgrad, clip=clip, win=win, faithful=mode == "faithful")
        self.count = 0
        self.m = {p: np.zeros(x.shape) for p, x in leaves(params)}
        self.b = {p: np.zeros(x.shape) for p, x in leaves(params)}
        self.b_max = {p: np.zeros(x.shape) for p, x in leaves(params)}
        self.z = {p: (np.zeros(x.shape) if mode == "faithful" else x.copy()) for p, x in leaves(params)}

    def step(self, grads: dict, params: dict) -> dict:
        h = self.h
        t = self.count + 1
        eta, delta, wd = value_at(h["lr"], self.count), value_at(h["delta"], self.count), h["wd"]
        decay = None if wd == 0 or h["win"] else h["decay"]
        theta_all = dict(leaves(params))
        updates = {}
        for p, g in leaves(grads):
            theta = theta_all[p]
            u = np.zeros_like(g)
            for i in np.ndindex(g.shape):
                u[i] = self._element(p, i, g[i], theta[i], t, eta, delta, wd, decay)
            updates[p] = u
        self.count += 1
        return build(updates)

    def _element(self, p, i, g, theta, t, eta, delta, wd, decay) -> float:
        h = self.h
        b1, b2 = h["b1"], h["b2"]
        if decay == "l2":
            g = g + wd * theta
        m_prev = self.m[p][i]
        m = b1 * m_prev + (1 - b1) * g
        self.m[p][i] = m
        if not h["faithful"]:
            m_hat_prev = 0.0 if t == 1 else m_prev / (1 - b1 ** (t - 1))
            m_hat = m / (1 - b1**t)
            s = m_hat - m_hat_prev
            b = b2 * self.b[p][i] + (1 - b2) * s * s
            self.b[p][i] = b
            if h["amsgrad"]:
                self.b_max[p][i] = max(self.b_max[p][i], b)
                b = self.b_max[p][i]
            r = m_hat / max(np.sqrt(b / (1 - b2**t)), delta)
            if h["clip"] is not None:
                r = min(max(r, -h["clip"]), h["clip"])
            u = eta * r  # the step η·r
        else:
            one = np.float32(1.0)
            power = lambda beta, k: np.float32(np.float64(np.float32(beta)) ** np.float64(k))  # noqa: E731
            bc1 = one - power(b1, t)
            bc1_prev = one if t == 1 else one - power(b1, t - 1)
            bc2 = one - power(b2, t)
            sqrt_bc2 = np.float32(np.sqrt(np.float64(bc2)))
            eta32 = np.float32(eta) * sqrt_bc2 / bc1  # η_adj = η·√bc2/bc1 in float32
            floor = np.float64(np.float32(delta) * sqrt_bc2)  # δ·√bc2
            s = m * np.float64(one / bc1) - m_prev * np.float64(one / bc1_prev)
            b = b2 * self.b[p][i] + (1 - b2) * s * s
            self.b[p][i] = b
            if h["amsgrad"]:
                self.b_max[p][i] = max(self.b_max[p][i], b)
                b = self.b_max[p][i]
            r = m / max(np.sqrt(b), floor)
            if h["clip"] is not None:
                r = min(max(r, -h["clip"]), h["clip"])
            u = np.float64(eta32) * r
        if h["win"]:
            return self._win(p, i, theta, u, r, eta, wd) - theta
        if decay == "decoupled":
            return -u - eta * wd * theta
        if decay == "fixed":
            return -u - wd * theta
        return -u

    def _win(self, p, i, theta, u, r, eta, wd) -> float:
        """Win's extrapolation (an extra of the authors' code) with the step ``u`` (= η_adj·r); the new θ."""
        if not self.h["faithful"]:
            z = (self.z[p][i] - u) / (1 + wd * eta)
            self.z[p][i] = z
            return (theta - 2 * u + 2 * z) / (3 + 2 * eta * wd)
        t = self.count + 1
        power = lambda beta, k: np.float32(np.float64(np.float32(beta)) ** np.float64(k))  # noqa: E731
        bc1, bc2 = np.float32(1) - power(self.h["b1"], t), np.float32(1) - power(self.h["b2"], t)
        eta32 = np.float32(eta) * np.float32(np.sqrt(np.float64(bc2))) / bc1
        wd32 = np.float32(wd)
        shrink = np.float64(np.float32(1) / (np.float32(1) + wd32 * eta32))  # 1/(1 + λ η_adj), float32
        tau = np.float32(1) / (np.float32(3) + (np.float32(2) * eta32) * wd32)  # τ, float32
        z = (self.z[p][i] - u) * shrink
        self.z[p][i] = z
        return theta * np.float64(tau) + np.float64(-tau * (np.float32(2) * eta32)) * r \
            + np.float64(np.float32(2) * tau) * z
