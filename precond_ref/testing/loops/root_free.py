r"""Loop oracles of the root-free methods: RF-RMSProp, RF-AdamW and IF-Shampoo.

Lin, Dangel, Eschenhagen, Bae, Turner, Makhzani, "Can We Remove the Square-Root in Adaptive Gradient
Methods? A Second-Order Perspective", ICML 2024, arXiv:2402.03496; spec ``root_free.md``. Each
class keeps its state in plain dicts of float64 NumPy arrays and walks one leaf (one tile) and one
step at a time, one equation a line; it is written from the spec and the factory docstrings of
:mod:`precond_ref.methods.root_free`, not from the fast code, and is tested equal to it
(``tests/testing/test_loop_oracles.py``).

Every ``step(grads, params, batch_size=None)`` returns the updates (``new params = params +
updates``), as the library's ``update`` does. Learning rates are numbers or schedules
``count -> float``; ``count`` is the number of updates already applied.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np

from ._tree import build, leaves, path_str, weight_bias_pairs

__all__ = ["LoopRFRMSProp", "LoopRFAdamW", "LoopIFShampoo"]


def _value(x: Any, count: int) -> float:
    return float(x(count)) if callable(x) else float(x)


class LoopRFRMSProp:
    r"""RF-RMSProp (paper Figure 1 / Algorithm 1; spec ``root_free.md`` §2.1-2.2), per element.

    Per leaf, with :math:`s_0` = ``initial_scale``, :math:`B` the batch size (1 without
    ``scale_by_batch_size``)::

        s ← b2·s + (1 − b2)·B·g²          no bias correction (s₀ = 1 replaces it)
        Δ ← g / (s + λ)                    no square root; λ outside the EMA
        Δ ← Δ + κ·θ                        weight decay, not preconditioned
        v ← α₁·v + Δ;  Δ ← v               heavy ball (only when α₁ ≠ 0)
        θ ← θ − η_t·Δ

    ``mode="faithful"`` differs only in R2 (λ = 0 allowed; an exactly zero denominator gives a zero
    step) and in its float32 state (R1), which this float64 oracle does not reproduce: compare it
    with ``state_dtype=float64``.
    """

    def __init__(self, params: dict, *, learning_rate: Any = 1e-2, b2: float = 0.999, damping: float = 1e-4,
                 momentum: float = 0.0, weight_decay: float = 0.0, batch_size: Optional[int] = None,
                 initial_scale: float = 1.0, scale_by_batch_size: bool = True, mode: str = "principled"):
        self.h = dict(lr=learning_rate, b2=b2, lam=damping, alpha1=momentum, kappa=weight_decay,
                      B=batch_size, scaled=scale_by_batch_size, faithful=mode == "faithful")
        self.count = 0
        self.s = {p: np.full(x.shape, float(initial_scale)) for p, x in leaves(params)}
        self.v = {p: np.zeros(x.shape) for p, x in leaves(params)}

    def step(self, grads: dict, params: dict, batch_size: Optional[int] = None) -> dict:
        h = self.h
        B = (batch_size if batch_size is not None else h["B"]) if h["scaled"] else 1
        eta = _value(h["lr"], self.count)
        theta = dict(leaves(params))
        updates = {}
        for p, g in leaves(grads):
            self.s[p] = h["b2"] * self.s[p] + (1 - h["b2"]) * (B * (g * g))
            denom = self.s[p] + h["lam"]
            delta = np.zeros_like(g)
            for i in np.ndindex(g.shape):  # one element at a time; R2: a zero denominator, a zero step
                delta[i] = 0.0 if (h["faithful"] and denom[i] == 0.0) else g[i] / denom[i]
            delta = delta + h["kappa"] * theta[p]
            if h["alpha1"] != 0:
                self.v[p] = h["alpha1"] * self.v[p] + delta
                delta = self.v[p]
            updates[p] = -eta * delta
        self.count += 1
        return build(updates)


class LoopRFAdamW:
    r"""RF-AdamW, the labelled extra (spec ``root_free.md`` §2.7, ``myoptim/rfadamw.py``), per element.

    With :math:`s = B v` (:math:`s_0` = ``initial_scale``, the authors' :math:`v_0 = 1/B`) and
    :math:`c_i = 1 - b_i^t` if ``bias_correction`` else 1 (:math:`t` = count + 1)::

        θ ← θ·(1 − η·κ)                    decoupled weight decay, first
        m ← b1·m + (1 − b1)·g
        s ← b2·s + (1 − b2)·B·g²
        θ ← θ − (η / c1)·m / (s / c2 + λ)

    Faithful mode: R1-R2 as :class:`LoopRFRMSProp` (compare with ``state_dtype=float64``).
    """

    def __init__(self, params: dict, *, learning_rate: Any = 1e-3, b1: float = 0.9, b2: float = 0.999,
                 damping: float = 1e-4, weight_decay: float = 0.0, bias_correction: bool = False,
                 batch_size: Optional[int] = None, initial_scale: float = 1.0, scale_by_batch_size: bool = True,
                 mode: str = "principled"):
        self.h = dict(lr=learning_rate, b1=b1, b2=b2, lam=damping, kappa=weight_decay, bc=bias_correction,
                      B=batch_size, scaled=scale_by_batch_size, faithful=mode == "faithful")
        self.count = 0
        self.m = {p: np.zeros(x.shape) for p, x in leaves(params)}
        self.s = {p: np.full(x.shape, float(initial_scale)) for p, x in leaves(params)}

    def step(self, grads: dict, params: dict, batch_size: Optional[int] = None) -> dict:
        h = self.h
        B = (batch_size if batch_size is not None else h["B"]) if h["scaled"] else 1
        eta = _value(h["lr"], self.count)
        t = self.count + 1
        c1 = 1 - h["b1"] ** t if h["bc"] else 1.0
        c2 = 1 - h["b2"] ** t if h["bc"] else 1.0
        theta = dict(leaves(params))
        updates = {}
        for p, g in leaves(grads):
            decay = -eta * h["kappa"] * theta[p]
            self.m[p] = h["b1"] * self.m[p] + (1 - h["b1"]) * g
            self.s[p] = h["b2"] * self.s[p] + (1 - h["b2"]) * (B * (g * g))
            denom = self.s[p] / c2 + h["lam"]
            step = np.zeros_like(g)
            for i in np.ndindex(g.shape):
                step[i] = 0.0 if (h["faithful"] and denom[i] == 0.0) else self.m[p][i] / denom[i]
            updates[p] = decay - (eta / c1) * step
        self.count += 1
        return build(updates)
