r"""Loop oracle of MBF, the mini-block Fisher method (Bahamou, Goldfarb, Ren, "A Mini-Block Fisher
Method for Deep Neural Networks", AISTATS 2023, arXiv:2202.04124; spec ``mbf.md`` sections 2.2-2.4).

Plain float64 NumPy: explicit Python loops over layers, mini-blocks and row chunks,
``np.linalg.inv`` per block, written from the spec and the factory docstring of
:func:`precond_ref.mbf`, not from the fast code; tested equal to it
(``tests/testing/test_loop_oracles.py``, ``tests/methods/test_mbf.py``). ``step(grads, params) ->
updates``.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

from ...transform import check_mode
from ._tree import build, leaves, path_str, value_at, weight_bias_pairs

__all__ = ["LoopMBF"]


def fc_statistic(fc_blocks: str, h_g: np.ndarray) -> np.ndarray:
    """The FC statistic of ``H_g`` (O, I+1): ``Σ_r h_r h_rᵀ / (I+1)`` over its mini-blocks ``h_r``, the
    columns (``"columns_avg"``) or the authors' chunks of O entries of its row-major flattening
    (``"official_chunks"``, B1)."""
    o, n = h_g.shape
    if fc_blocks == "official_chunks":
        chunks = [h_g.reshape(-1)[r * o : (r + 1) * o] for r in range(n)]
    else:
        chunks = [h_g[:, r] for r in range(n)]
    return sum(np.outer(c, c) for c in chunks) / n


def fc_precondition(fc_blocks: str, f_inv: np.ndarray, h_m: np.ndarray) -> np.ndarray:
    """``D``: ``F⁻¹`` applied to every mini-block of ``H_m`` (O, I+1), columns or the authors' chunks."""
    o, n = h_m.shape
    if fc_blocks == "official_chunks":
        chunks = [h_m.reshape(-1)[r * o : (r + 1) * o] for r in range(n)]
        return np.concatenate([f_inv @ c for c in chunks]).reshape(o, n)
    return np.stack([f_inv @ h_m[:, r] for r in range(n)], axis=1)


class LoopMBF:
    r"""MBF (paper Algorithm 1 with the authors' schedule; spec ``mbf.md`` §2.2-2.4), per mini-block.

    Groups (specs README §5): a 2-D ``weight`` with its sibling ``bias`` is one FC layer
    ``H = [W | b]`` (O, I+1); any other 2-D leaf is an FC layer ``H = W``; a weight with ≥ 3 axes is
    a conv (O, C, q), q = Π kernel (q = 1: the element-wise limit); every other leaf takes the
    diagonal rule. With i = updates already applied, per group::

        m   ← μ·m + g                                                heavy ball, raw gradient
        F_b ← ρ·F_b + (1 − ρ)·g_b g_bᵀ                 if i % T1 == 0   FC: Σ_r h_r h_rᵀ/(I+1), shared
        F_b⁻¹ ← (sym(F_b) + λ_b I)⁻¹, symmetrised      if (i ≤ T2 and i % T1 == 0) or i % T2 == (p_b·T2)//P
        D_b = F_b⁻¹ m_b
        ν   = min(1, √(κ / (α²·⟨D, m⟩)))                            KL clip per layer (B7; κ = 0: ν = 1)
        w   ← (1 − α·wd)·w − α·ν·D
      diagonal rule, per element:
        a ← μ·a + (1 − μ)·g;  v ← β₂'·v + (1 − β₂')·a²  (or g²);  D = a/(ε + √(v/(1 − β₂'^{i+1})))
        w ← (1 − α·wd)·w − α·D

    Principled mode: FC rows cut into chunks of ``block_size`` (each chunk its own statistic, B4),
    ``λ_b = max(λ, 100·ε₆₄·‖F_b‖_F)`` (B6, which changes nothing unless ‖F_b‖/λ ≳ 4e13), and the
    phase ``p_b`` of a block: the matrix blocks of one size, in the order layer, FC row chunk or
    conv (output, input) pair, are split into P contiguous shares, the k-th of n in share p when
    ``n·p//P ≤ k < n·(p+1)//P``; element-wise parts are in share 0. Faithful mode: one O×O block,
    ``"official_chunks"``, plain ``inv(F + λI)``, P = 1, no KL clip.
    """

    def __init__(self, params: dict, *, learning_rate: Any = None, damping: float = 1e-3, momentum: float = 0.9,
                 b2: float = 0.9, weight_decay: float = 0.0, statistics_every: int = 10,
                 precondition_every: int = 100, fc_blocks: Optional[str] = None, diagonal_b2: float = 0.999,
                 diagonal_eps: float = 1e-8, diagonal_second_moment: str = "momentum",
                 max_block_dim: Optional[int] = None, kl_clip: Optional[float] = None, mode: str = "principled",
                 block_size: Optional[int] = None, refresh_phases: Optional[int] = None):
        check_mode(mode)  # a misspelt mode would run the principled rule
        faithful = mode == "faithful"
        if learning_rate is None:  # the mode's default step size: the authors' 1e-5, principled 1e-3
            learning_rate = 1e-5 if faithful else 1e-3
        fc_blocks = fc_blocks or ("official_chunks" if faithful else "columns_avg")
        if block_size is None and not faithful and fc_blocks == "columns_avg":
            block_size = 128
        if refresh_phases is None:
            refresh_phases = 1 if faithful else max(1, precondition_every // statistics_every)
        self.h = dict(lr=learning_rate, damping=damping, mu=momentum, rho=b2, wd=weight_decay,
                      t1=statistics_every, t2=precondition_every, fc=fc_blocks, db2=diagonal_b2, eps=diagonal_eps,
                      sm=diagonal_second_moment, kl=(0.0 if faithful else 1e-4) if kl_clip is None else kl_clip,
                      faithful=faithful, P=refresh_phases)
        self.count = 0
        flat = dict(leaves(params))
        self.groups = weight_bias_pairs(params)
        self.state: dict[str, dict] = {}
        by_size: dict[int, list] = {}  # block size -> [(group key, block index)] in order
        for group in self.groups:
            key, w = path_str(group[0]), flat[group[0]]
            if len(group) == 2 or w.ndim == 2:
                o, width = w.shape[0], w.shape[1] + len(group) - 1
                if max_block_dim is not None and o > max_block_dim:
                    st = {"kind": "elementwise", "F": np.zeros((o, width)), "Finv": np.full((o, width), 1 / damping)}
                else:
                    rows = [(a, min(a + block_size, o)) for a in range(0, o, block_size)] if block_size and o > block_size else [(0, o)]
                    st = {"kind": "fc", "rows": rows, "F": [np.zeros((b - a, b - a)) for a, b in rows],
                          "Finv": [np.eye(b - a) / damping for a, b in rows]}
                    for j, (a, b) in enumerate(rows):
                        by_size.setdefault(b - a, []).append((key, j))
                st["m"] = np.zeros((o, width))
            elif w.ndim >= 3:
                o, c, q = w.shape[0], w.shape[1], math.prod(w.shape[2:])
                if q == 1:
                    st = {"kind": "elementwise", "F": np.zeros((o, c, 1)), "Finv": np.full((o, c, 1), 1 / damping)}
                else:
                    st = {"kind": "conv", "F": np.zeros((o, c, q, q)), "Finv": np.broadcast_to(np.eye(q) / damping, (o, c, q, q)).copy()}
                    for oo in range(o):
                        for cc in range(c):
                            by_size.setdefault(q, []).append((key, (oo, cc)))
                st["m"] = np.zeros((o, c, q))
            else:
                st = {"kind": "diagonal", "a": np.zeros(w.shape), "v": np.zeros(w.shape)}
            st["paths"] = group
            self.state[key] = st
        P = refresh_phases
        self.phase = {}
        for blocks in by_size.values():
            n = len(blocks)
            for k, block in enumerate(blocks):
                self.phase[block] = next(p for p in range(P) if n * p // P <= k < n * (p + 1) // P)

    def _due(self, block) -> bool:
        h, i = self.h, self.count
        if i <= h["t2"] and i % h["t1"] == 0:
            return True
        return i % h["t2"] == self.phase.get(block, 0) * h["t2"] // h["P"]

    def _inverse(self, f: np.ndarray) -> np.ndarray:
        """``(F + λI)⁻¹``; principled: symmetrised before and after, damping raised to the floor (B2, B6)."""
        h = self.h
        if h["faithful"]:
            return np.linalg.inv(f + h["damping"] * np.eye(f.shape[0]))
        lam = max(h["damping"], np.finfo(np.float64).eps / 1e-2 * np.linalg.norm(f))
        inv = np.linalg.inv((f + f.T) / 2 + lam * np.eye(f.shape[0]))
        return (inv + inv.T) / 2

    def step(self, grads: dict, params: dict) -> dict:
        h, i = self.h, self.count
        alpha = value_at(h["lr"], i)
        stats_now = i % h["t1"] == 0
        g_all, w_all = dict(leaves(grads)), dict(leaves(params))
        updates = {}
        for key, st in self.state.items():
            paths = st["paths"]
            g = [g_all[p] for p in paths]
            if st["kind"] == "diagonal":
                st["a"] = h["mu"] * st["a"] + (1 - h["mu"]) * g[0]
                x = st["a"] if h["sm"] == "momentum" else g[0]
                st["v"] = h["db2"] * st["v"] + (1 - h["db2"]) * x**2
                d = st["a"] / (h["eps"] + np.sqrt(st["v"] / (1 - h["db2"] ** (i + 1))))
                updates[paths[0]] = -alpha * d - alpha * h["wd"] * w_all[paths[0]]
                continue
            w = g[0]
            if w.ndim >= 3:
                g_b = w.reshape(st["m"].shape)
            else:
                g_b = np.concatenate([w, g[1][:, None]], 1) if len(g) == 2 else w
            st["m"] = h["mu"] * st["m"] + g_b
            m = st["m"]
            d = np.zeros_like(m)
            if st["kind"] == "fc":
                for j, (a, b) in enumerate(st["rows"]):
                    if stats_now:
                        st["F"][j] = h["rho"] * st["F"][j] + (1 - h["rho"]) * fc_statistic(h["fc"], g_b[a:b])
                    if self._due((key, j)):
                        st["Finv"][j] = self._inverse(st["F"][j])
                    d[a:b] = fc_precondition(h["fc"], st["Finv"][j], m[a:b])
            elif st["kind"] == "conv":
                o, c = m.shape[:2]
                for oo in range(o):
                    for cc in range(c):
                        if stats_now:
                            st["F"][oo, cc] = h["rho"] * st["F"][oo, cc] + (1 - h["rho"]) * np.outer(g_b[oo, cc], g_b[oo, cc])
                        if self._due((key, (oo, cc))):
                            st["Finv"][oo, cc] = self._inverse(st["F"][oo, cc])
                        d[oo, cc] = st["Finv"][oo, cc] @ m[oo, cc]
            else:  # element-wise: the block-size-1 limit, refreshed in share 0
                if stats_now:
                    st["F"] = h["rho"] * st["F"] + (1 - h["rho"]) * g_b**2
                if self._due(None):
                    st["Finv"] = 1 / (st["F"] + h["damping"])
                d = st["Finv"] * m
            nu = 1.0
            if h["kl"] != 0:
                quadratic = alpha**2 * float(np.sum(d * m))
                nu = math.sqrt(h["kl"] / quadratic) if quadratic > h["kl"] else 1.0
            step = -alpha * nu * d
            if w.ndim >= 3:
                pieces = [step.reshape(w.shape)]
            else:
                pieces = [step[:, : w.shape[1]], step[:, w.shape[1]]] if len(g) == 2 else [step]
            for p, s in zip(paths, pieces):
                updates[p] = s - alpha * h["wd"] * w_all[p]
        self.count += 1
        return build(updates)
