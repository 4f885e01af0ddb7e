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

import itertools
import math
from typing import Any, Callable, Optional

import numpy as np

from ...blocking import block_bounds
from ...transform import check_mode
from ._tree import build, leaves, value_at, weight_bias_pairs

__all__ = ["LoopRFRMSProp", "LoopRFAdamW", "LoopIFShampoo"]


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

    def __init__(self, params: dict, *, learning_rate: Any = 0.316, b2: float = 0.999, damping: float = 1e-4,
                 momentum: float = 0.0, weight_decay: float = 0.0, batch_size: Optional[int] = None,
                 initial_scale: float = 1.0, scale_by_batch_size: bool = True, mode: str = "principled"):
        check_mode(mode)  # a misspelt mode would run the principled rule
        self.h = dict(lr=learning_rate, b2=b2, lam=damping, alpha1=momentum, kappa=weight_decay,
                      B=batch_size, scaled=scale_by_batch_size, faithful=mode == "faithful")
        self.count = 0
        self.s = {p: np.full(x.shape, float(initial_scale)) for p, x in leaves(params)}
        self.v = {p: np.zeros(x.shape) for p, x in leaves(params)}

    def step(self, grads: dict, params: dict, batch_size: Optional[int] = None) -> dict:
        h = self.h
        B = (batch_size if batch_size is not None else h["B"]) if h["scaled"] else 1
        eta = value_at(h["lr"], self.count)
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

    def __init__(self, params: dict, *, learning_rate: Any = 1.0, b1: float = 0.9, b2: float = 0.999,
                 damping: float = 1e-4, weight_decay: float = 0.0, bias_correction: bool = False,
                 batch_size: Optional[int] = None, initial_scale: float = 1.0, scale_by_batch_size: bool = True,
                 mode: str = "principled"):
        check_mode(mode)  # a misspelt mode would run the principled rule
        self.h = dict(lr=learning_rate, b1=b1, b2=b2, lam=damping, kappa=weight_decay, bc=bias_correction,
                      B=batch_size, scaled=scale_by_batch_size, faithful=mode == "faithful")
        self.count = 0
        self.m = {p: np.zeros(x.shape) for p, x in leaves(params)}
        self.s = {p: np.full(x.shape, float(initial_scale)) for p, x in leaves(params)}

    def step(self, grads: dict, params: dict, batch_size: Optional[int] = None) -> dict:
        h = self.h
        B = (batch_size if batch_size is not None else h["B"]) if h["scaled"] else 1
        eta = value_at(h["lr"], self.count)
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


def _mode_times(y: np.ndarray, k: np.ndarray, n: int) -> np.ndarray:
    """The spec's mode product ``Y ×_n Kᵀ``: contract axis ``n`` of ``Y`` with the first index of ``K``
    (for a matrix on axis 0, ``Kᵀ Y``); a diagonal factor (a vector ``k``) scales axis ``n`` by ``k``."""
    if k.ndim == 1:
        shape = [1] * y.ndim
        shape[n] = k.shape[0]
        return y * k.reshape(shape)
    return np.moveaxis(np.tensordot(k, y, axes=([0], [n])), 0, n)


class LoopIFShampoo:
    r"""IF-Shampoo (paper Figure 3; spec ``root_free.md`` §2.3-2.5), one group and one tile at a time.

    A group (one leaf, or with ``grouping="weight_bias"`` a 2-D ``weight`` with its ``bias`` as an
    extra column) is a tensor G of shape (d_1, …, d_N), size-1 axes squeezed (a 0-D leaf: (1,)). Its
    axes are cut into tiles (principled: every dense axis longer than ``block_size`` by
    :func:`precond_ref.blocking.block_bounds`, S9; tiles in row-major order), each tile an
    independent IF-Shampoo block with factors K_n (identity at start; a vector for a diagonal axis:
    ``structures="diagonal"``, longer than ``max_dense_dim``, or the axis of
    a vector group with ``structures=None`` (principled default), S12, which is cut like a dense axis). Per tile, on its refresh steps, from
    the old factors of all axes at once::

        Y   = √B·G ×_1 K_1ᵀ ×_2 K_2ᵀ … ×_N K_Nᵀ         (×_n: contract axis n with K's first index;
                                                         matrix: Y = K_1ᵀ G K_2)
        t_i = Tr(K_iᵀK_i)/d_i
        M_n = ½[λ·Π_{i≠n} t_i·K_nᵀK_n + Y_(n)Y_(n)ᵀ/Π_{i≠n} d_i − I]   (diagonal axis: its diagonal)
        m_n ← α₂·m_n + (1 − α₂)·M_n                     (α₂ = 0: m_n = M_n)
        K_n ← K_n − β₂/max(1, ‖m_n‖_F)·K_n m_n         (without ``clamp_factor_step``: β₂)

    every step, with the current factors and the raw G, per group::

        D = G ×_1 P_1 … ×_N P_N,  P_n = K_n K_nᵀ       tile by tile
        ν = min(1, √(κ_clip/(η²·⟨D, G⟩)))               principled KL clip per group (S8)
        U = ν·D + κ·W;  v ← α₁·v + U;  W ← W − η·v      per leaf

    The refresh steps: ``count % T == 0`` (or ``T(count)`` for a callable); principled with an
    integer T > 1 (``spread_refresh``, S10), tile t refreshes on the first update and when
    ``count % T == t % T``. Principled mode also keeps a tile's factors when its gradient is exactly
    zero (S2) or its new factors are not finite (S3). β₂ is ``preconditioner_lr`` (a number or a
    schedule) times ``preconditioner_lr_scale(path)`` of the group's first leaf, if given.
    Faithful mode (SIRFShampoo): T = 1 by default, no tiles, no clip, no S2/S3; its neutral scaling
    devices (K_n/√d_n, σ_n) change only rounding and are not stated. Dict ``structures`` and Flax
    ``kernel`` leaves are not covered.
    """

    def __init__(self, params: dict, *, learning_rate: Any = None, momentum: float = 0.9,
                 preconditioner_lr: Any = 0.01, preconditioner_momentum: float = 0.5, damping: float = 1e-3,
                 weight_decay: float = 0.0, batch_size: Optional[int] = None, precondition_every: Any = None,
                 structures: Optional[str] = None, max_dense_dim: Optional[int] = None, grouping: str = "per_parameter",
                 preconditioner_lr_scale: Optional[Callable] = None, clamp_factor_step: bool = True,
                 kl_clip: Optional[float] = None, mode: str = "principled", block_size: Optional[int] = None,
                 spread_refresh: Optional[bool] = None):
        check_mode(mode)  # a misspelt mode would run the principled rule
        faithful = mode == "faithful"
        if learning_rate is None:  # the mode's default step size: the authors' 1e-3, principled 0.1
            learning_rate = 1e-3 if faithful else 0.1
        if structures is None and faithful:
            structures = "dense"
        T = (1 if faithful else 2) if precondition_every is None else precondition_every
        block_size = (None if faithful else 64) if block_size is None else block_size
        spread = (not faithful if spread_refresh is None else spread_refresh) and isinstance(T, int) and T > 1
        self.h = dict(lr=learning_rate, alpha1=momentum, beta2=preconditioner_lr, alpha2=preconditioner_momentum,
                      lam=damping, kappa=weight_decay, B=batch_size, T=T, clamp=clamp_factor_step,
                      kl=(0.0 if faithful else 0.1) if kl_clip is None else kl_clip, faithful=faithful)
        self.count = 0
        flat = dict(leaves(params))
        groups = weight_bias_pairs(params) if grouping == "weight_bias" else [(p,) for p in flat]
        self.groups = []
        for paths in groups:
            w = flat[paths[0]]
            full = w.shape if len(paths) == 1 else (w.shape[0], w.shape[1] + 1)
            dims = tuple(d for d in full if d != 1) or (1,)
            vector = structures is None and len(dims) == 1  # S12: diagonal, cut into blocks as a dense axis
            diagonal = [structures == "diagonal" or vector or (max_dense_dim is not None and d > max_dense_dim)
                        for d in dims]
            bounds = [((0, d),) if diag and not vector else block_bounds(d, block_size) for d, diag in zip(dims, diagonal)]
            tiles = []
            for t, index in enumerate(itertools.product(*bounds)):
                sizes = [b - a for a, b in index]
                K = [np.ones(s) if diag else np.eye(s) for s, diag in zip(sizes, diagonal)]
                tiles.append({"index": index, "phase": t % T if spread else 0, "K": K, "m": [np.zeros_like(k) for k in K]})
            scale = 1.0 if preconditioner_lr_scale is None else float(preconditioner_lr_scale(paths[0]))
            self.groups.append({"paths": paths, "full": full, "dims": dims, "tiles": tiles, "scale": scale,
                                "v": [np.zeros(flat[p].shape) for p in paths]})

    def _due(self, phase: int) -> bool:
        T, count = self.h["T"], self.count
        if callable(T):
            return bool(T(count))
        return count == 0 or count % T == phase

    def _factor_step(self, G: np.ndarray, tile: dict, B: float, beta2: float) -> None:
        """Figure 3's simultaneous factor update of one tile (spec §2.3), in place in ``tile``."""
        h, K, N = self.h, tile["K"], G.ndim
        dims = G.shape
        Y = np.sqrt(B) * G
        for n in range(N):
            Y = _mode_times(Y, K[n], n)  # Y = √B·G ×_1 K_1ᵀ … ×_N K_Nᵀ
        t = [np.sum(k * k) / d if k.ndim == 1 else np.trace(k.T @ k) / d for k, d in zip(K, dims)]
        new_K, new_m = [], []
        for n in range(N):
            others = math.prod(t[i] for i in range(N) if i != n)
            d_rest = math.prod(dims[i] for i in range(N) if i != n)
            Y_n = np.moveaxis(Y, n, 0).reshape(dims[n], -1)  # mode-n unfolding
            if K[n].ndim == 1:
                M = 0.5 * (h["lam"] * others * K[n] ** 2 + np.sum(Y_n * Y_n, axis=1) / d_rest - 1.0)
            else:
                M = 0.5 * (h["lam"] * others * (K[n].T @ K[n]) + (Y_n @ Y_n.T) / d_rest - np.eye(dims[n]))
            if h["alpha2"] != 0:
                M = h["alpha2"] * tile["m"][n] + (1 - h["alpha2"]) * M
            size = beta2 / max(1.0, np.linalg.norm(M)) if h["clamp"] else beta2
            new_K.append(K[n] - size * (K[n] * M if K[n].ndim == 1 else K[n] @ M))
            new_m.append(M)
        if not h["faithful"]:
            if not np.any(G != 0):  # S2: an all-zero gradient keeps the factors
                return
            if not all(np.all(np.isfinite(a)) for a in new_K + new_m):  # S3: unusable factors are kept
                return
        tile["K"], tile["m"] = new_K, new_m

    def step(self, grads: dict, params: dict, batch_size: Optional[int] = None) -> dict:
        h = self.h
        B = float(batch_size if batch_size is not None else h["B"])
        eta = value_at(h["lr"], self.count)
        g_all, w_all = dict(leaves(grads)), dict(leaves(params))
        updates = {}
        for group in self.groups:
            paths = group["paths"]
            g = g_all[paths[0]]
            G = (g if len(paths) == 1 else np.concatenate([g, g_all[paths[1]][:, None]], axis=1)).reshape(group["dims"])
            D = np.zeros_like(G)
            for tile in group["tiles"]:
                cut = tuple(slice(a, b) for a, b in tile["index"])
                if self._due(tile["phase"]):
                    self._factor_step(G[cut], tile, B, value_at(h["beta2"], self.count) * group["scale"])
                D_t = G[cut]
                for n, k in enumerate(tile["K"]):  # D = G ×_n P_n, P_n = K_n K_nᵀ
                    D_t = _mode_times(D_t, k * k if k.ndim == 1 else k @ k.T, n)
                D[cut] = D_t
            if h["kl"] != 0:
                quadratic = eta**2 * float(np.sum(D * G))
                D = D * (math.sqrt(h["kl"] / quadratic) if quadratic > h["kl"] else 1.0)
            D = D.reshape(group["full"])
            pieces = [D] if len(paths) == 1 else [D[:, :-1], D[:, -1]]
            for j, (p, D_p) in enumerate(zip(paths, pieces)):
                U = D_p.reshape(w_all[p].shape) + h["kappa"] * w_all[p]
                if h["alpha1"] != 0:
                    group["v"][j] = h["alpha1"] * group["v"][j] + U
                    U = group["v"][j]
                updates[p] = -eta * U
        self.count += 1
        return build(updates)
