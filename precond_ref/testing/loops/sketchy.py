r"""Loop oracles of Sketchy (FD-Shampoo) and S-AdaGrad (Feinberg, Chen, Sun, Anil, Hazan, "Sketchy:
Memory-efficient Adaptive Regularization with Frequent Directions", NeurIPS 2023, arXiv:2302.03764;
spec ``fd_shampoo.md``).

Plain float64 NumPy, one leaf, one axis, one block and one step at a time, ``np.linalg.svd`` per
Frequent Directions step, written from the spec and the factory docstrings of
:func:`precond_ref.sketchy` and :func:`precond_ref.s_adagrad`, not from the fast code; tested equal
to it (``tests/testing/test_loop_oracles.py``) with the library's exact decompositions
(``decomposition="svd"``; S-AdaGrad's exact ``"incremental"`` path, taken when rank + 1 < d).
``step(grads, params) -> updates``.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

from ...blocking import block_bounds, merge_small_dims, stable_hash
from ...transform import check_mode
from ._tree import build, leaves, value_at

__all__ = ["LoopSketchy", "LoopSAdaGrad", "fd_step", "fd_apply"]

_U = np.finfo(np.float64).eps / 2  # unit roundoff


def new_sketch(d: int, k: int) -> dict:
    """An empty FD sketch of an axis (block) of length d keeping k directions."""
    return {"U": np.zeros((d, k)), "sigma": np.zeros(k), "rho": 0.0, "w": np.zeros(k), "w_perp": 0.0}


def fd_step(sk: dict, X: np.ndarray, *, exponent: float, beta: float, gamma: float, eps: float,
            relative_eps: bool, delta: float = 0.0, cutoff: bool, noise_is_mass: bool = False) -> dict:
    r"""One Frequent Directions step (paper Algorithm 1; spec §2.2 with K1, K3): the new sketch of
    ``β·Ḡ + X Xᵀ`` and its weights for the operator ``(Ḡ + ρI + εI)^a``::

        Z = [√β·U diag(σ), X];  Z = P diag(s) Qᵀ (thin SVD, s descending, r values)
        s_i ← 0 where s_i ≤ 10u·s_0                   (principled cutoff K3; faithful: the shrink only)
        c   = s_k if k < r else 0                      the (k+1)-th value
        σ'_i = √(max(s_i − c, 0))·√(s_i + c)            i < k
        ρ'  = γ·ρ + c²                                 γ = β (principled) or √β (faithful K1)
        e_i = s_i² + γ·ρ                               undeflated eigenvalues
        mask_i = σ'_i > 0 and s_i above the cutoff;  U' = P[:, :k]·mask;  σ ← σ'·mask
        ε_abs = ε·max_i e_i (relative) or ε;  shift = ε_abs + δ
        w_i = (e_i + shift)^a where mask_i, else 0
        w_⊥ = (ρ' + shift)^a if ρ' + δ > 0 (faithful Sketchy: or the step had a (k+1)-th value), else 0

    A non-finite result keeps the previous sketch (K4).
    """
    U, sigma, rho = sk["U"], sk["sigma"], sk["rho"]
    d, k = U.shape
    Z = np.concatenate([math.sqrt(beta) * U * sigma[None, :], X], axis=1)
    P, s, _ = np.linalg.svd(Z, full_matrices=False)
    r = s.shape[0]
    noise = s <= 10 * _U * s[0]
    if cutoff:
        s = np.where(noise, 0.0, s)
    c = max(s[k], 0.0) if k < r else 0.0
    if k < r and not cutoff and noise[k]:
        c = 0.0
    top = np.maximum(s[:k], 0.0)
    new = {"rho": gamma * rho + c * c}
    deflated = np.array([math.sqrt(max(top[i] - c, 0.0)) * math.sqrt(top[i] + c) for i in range(k)])
    e = top * top + gamma * rho
    mask = (deflated > 0) & ~noise[:k]
    new["U"] = P[:, :k] * mask[None, :]
    new["sigma"] = np.where(mask, deflated, 0.0)
    eps_abs = eps * np.max(e) if relative_eps else eps
    shift = eps_abs + delta
    new["w"] = np.array([(e[i] + shift) ** exponent if mask[i] else 0.0 for i in range(k)])
    present = new["rho"] + delta > 0 or (noise_is_mass and k < r and s[0] > 0)
    mass = new["rho"] + shift
    new["w_perp"] = mass**exponent if present and mass > 0 else 0.0
    if not all(np.all(np.isfinite(v)) for v in new.values()):
        return sk
    return new


def fd_apply(sk: dict, x: np.ndarray) -> np.ndarray:
    """``U diag(w) Uᵀ x + w_⊥ (x − U Uᵀ x)``: the sketch's operator on the columns of ``x`` (d, n)."""
    U = sk["U"]
    c = U.T @ x
    return U @ (sk["w"][:, None] * c) + sk["w_perp"] * (x - U @ c)


def fd_apply_with_own_mass(sk: dict, x: np.ndarray) -> np.ndarray:
    r"""The sketch applied to a column ``x`` it has not seen, with x's own mass on the sketch's frame
    (S-AdaGrad between refreshes, exponent −1/2)::

        c = Uᵀx;  r = x − U c (projected twice);  sat(t) = t/√(1 + t²)
        y = Σ_i u_i·(sat(w_i c_i) if w_i > 0 else sign(c_i)) + (sat(w_⊥‖r‖) if w_⊥ > 0 else 1)·r/‖r‖

    i.e. :math:`(S + D)^{-1/2} x` with S the masses behind the stored weights and D the diagonal of
    x xᵀ on the frame [U, r/‖r‖]; a residual ‖r‖ ≤ 10u‖x‖ counts as 0.
    """
    U = sk["U"]
    c = U.T @ x
    r = x - U @ c
    again = U.T @ r  # "twice is enough"
    c, r = c + again, r - U @ again
    norm = float(np.linalg.norm(r))
    along = np.array([[c[i, 0] * sk["w"][i] / math.hypot(1.0, sk["w"][i] * c[i, 0]) if sk["w"][i] > 0
                       else np.sign(c[i, 0])] for i in range(U.shape[1])])
    across = sk["w_perp"] * norm / math.hypot(1.0, sk["w_perp"] * norm) if sk["w_perp"] > 0 else 1.0
    if norm <= 10 * _U * float(np.linalg.norm(x)):
        across = 0.0
    unit = r / norm if norm > 0 else r
    return U @ along + across * unit


def _blocks_and_phases(merged: tuple, rank: int, block_size: Optional[int], T: int, first: int) -> list:
    """Per axis, its blocks ``(start, stop, rank, phase)``: the axis cut by
    :func:`precond_ref.blocking.block_bounds`; consecutive blocks of one length form a run, a run of
    c blocks is cut into min(c, T) contiguous pieces, and the pieces of the leaf, axis by axis, take
    the phases first, first + 1, ... (mod T)."""
    axes, unit = [], 0
    for d in merged:
        runs: list[list] = []
        for a, b in block_bounds(d, block_size):
            if runs and runs[-1][-1][1] - runs[-1][-1][0] == b - a:
                runs[-1].append((a, b))
            else:
                runs.append([(a, b)])
        blocks = []
        for run in runs:
            pieces, done = min(len(run), T), 0
            for i in range(pieces):
                count = len(run) * (i + 1) // pieces - done
                blocks += [(a, b, min(rank, b - a), (first + unit) % T) for a, b in run[done:done + count]]
                done += count
                unit += 1
        axes.append(blocks)
    return axes


def _first_phase(shape: tuple, T: int) -> int:
    """A leaf's first refresh phase from its shape: ``stable_hash(str(shape)) mod T`` (the library's
    schedule, by :func:`precond_ref.blocking.stable_hash`)."""
    return stable_hash(str(tuple(shape))) % T if T > 1 else 0


class LoopSketchy:
    r"""Sketchy (paper Algorithm 2, FD-Shampoo, as the authors' tearfree optimizer; spec §2.3-2.4).

    Per leaf with gradient G, merged to an order-N tensor (:func:`precond_ref.blocking.merge_small_dims`,
    size-1 axes squeezed in principled mode), each axis cut into blocks (principled ``block_size``)
    with one FD sketch each, exponent a = −1/(2N)::

        v   ← β_g·v + (1 − β_g)·G²;  D_g = G/√(v + ε_g)     RMSProp graft (β_g = 1: v + G²)
        for each axis n, block j of it, if due:             Z from the block's rows of G_(n)
            sketch_{n,j} ← FD(sketch_{n,j}, G_(n)[rows])     :func:`fd_step`
        P(G) = G ×_1 (L̄_1 + ρ_1 I + ε_1 I)^a ⋯ ×_N (…)^a      block by block, :func:`fd_apply`
        u   = P(G)·‖D_g‖_F/‖P(G)‖_F                           (D_g before start_preconditioning_step)
        m   ← u + μ·m;  u ← u + μ·m (Nesterov) or m           (momentum_ema: u ← (1 − μ)u first)
        W   ← W − η·(u + λ·W)

    Graft-only leaves (u = D_g): vectors unless ``precondition_1d``, and leaves with a (blocked) axis
    over ``max_precondition_dim``; ``graft="sgd"``: D_g = G; ``graft="none"``: u = P(G) for every leaf.
    A block is due on the steps ``count % T == 0``, or, spread (principled, T > 1), on the first and
    when ``count % T`` equals its phase (:func:`_blocks_and_phases`). Faithful mode: no blocks, T = 1,
    escaped mass decayed by √β, no cutoff, noise counts as mass.
    """

    def __init__(self, params: dict, *, learning_rate: Any = 1e-3, rank: int = 128, b2: float = 0.999,
                 eps: float = 1e-7, relative_eps: bool = True, precondition_every: Any = None,
                 start_preconditioning_step: int = 0, graft: str = "rmsprop", graft_b2: float = 0.999,
                 graft_eps: float = 1e-23, momentum: float = 0.9, nesterov: bool = True, momentum_ema: bool = False,
                 weight_decay: float = 0.0, merge_dims: int = 1024, max_precondition_dim: int = 4096,
                 precondition_1d: bool = False, block_size: Optional[int] = None, tail_decay: Optional[str] = None,
                 mode: str = "principled", spread_refresh: Optional[bool] = None):
        check_mode(mode)  # a misspelt mode would run the principled rule
        faithful = mode == "faithful"
        if faithful:
            T, spread = (1 if precondition_every is None else precondition_every), False
        else:
            block_size = 1024 if block_size is None else block_size
            T = 3 if precondition_every is None else precondition_every
            spread = spread_refresh is not False
        spread = spread and isinstance(T, int) and T > 1
        tail_decay = tail_decay or ("sqrt_b2" if faithful else "b2")
        self.h = dict(lr=learning_rate, beta=b2, gamma=math.sqrt(b2) if tail_decay == "sqrt_b2" else b2, eps=eps,
                      relative=relative_eps, T=T, spread=spread, start=start_preconditioning_step, graft=graft,
                      gb2=graft_b2, geps=graft_eps, mu=momentum, nesterov=nesterov, ema=momentum_ema,
                      wd=weight_decay, faithful=faithful)
        self.count = 0
        self.state = {}
        for path, w in leaves(params):
            st = {"v": np.zeros(w.shape), "m": np.zeros(w.shape), "axes": None}
            blocked = [d if block_size is None else min(d, block_size) for d in w.shape]
            graft_only = graft != "none" and ((not precondition_1d and w.ndim <= 1)
                                              or any(d > max_precondition_dim for d in blocked))
            if not graft_only:
                st["merged"] = merge_small_dims(w.shape, merge_dims)
                phases = T if spread else 1
                st["axes"] = [[dict(rows=(a, b), phase=p, sketch=new_sketch(b - a, k)) for a, b, k, p in blocks]
                              for blocks in _blocks_and_phases(st["merged"], rank, block_size, phases,
                                                               _first_phase(w.shape, phases))]
            self.state[path] = st

    def _due(self, phase: int) -> bool:
        T, count = self.h["T"], self.count
        if callable(T):
            return bool(T(count))
        return count == 0 or count % T == phase if self.h["spread"] else count % T == 0

    def step(self, grads: dict, params: dict) -> dict:
        h, eta, updates = self.h, value_at(self.h["lr"], self.count), {}
        w_all = dict(leaves(params))
        for path, g in leaves(grads):
            st = self.state[path]
            if h["graft"] == "rmsprop":
                st["v"] = st["v"] + g * g if h["gb2"] == 1 else h["gb2"] * st["v"] + (1 - h["gb2"]) * g * g
                d_g = np.where(st["v"] > 0, g / np.sqrt(np.where(st["v"] > 0, st["v"], 1.0) + h["geps"]), 0.0)
            else:
                d_g = g
            u = d_g
            if st["axes"] is not None:
                x = g.reshape(st["merged"])
                N = x.ndim
                for n, blocks in enumerate(st["axes"]):  # statistics, all from the same gradient
                    G_n = np.moveaxis(x, n, 0).reshape(x.shape[n], -1)
                    for blk in blocks:
                        if self._due(blk["phase"]):
                            a, b = blk["rows"]
                            blk["sketch"] = fd_step(blk["sketch"], G_n[a:b], exponent=-1 / (2 * N), beta=h["beta"],
                                                    gamma=h["gamma"], eps=h["eps"], relative_eps=h["relative"],
                                                    cutoff=not h["faithful"], noise_is_mass=h["faithful"])
                for n, blocks in enumerate(st["axes"]):  # P(G), one axis after another
                    x_n = np.moveaxis(x, n, 0)
                    flat = x_n.reshape(x.shape[n], -1)
                    out = np.zeros_like(flat)
                    for blk in blocks:
                        a, b = blk["rows"]
                        out[a:b] = fd_apply(blk["sketch"], flat[a:b])
                    x = np.moveaxis(out.reshape(x_n.shape), 0, n)
                p = x.reshape(g.shape)
                if h["graft"] == "none":
                    u = p
                elif self.count >= h["start"]:
                    norm_p = np.linalg.norm(p)
                    u = p * (np.linalg.norm(d_g) / norm_p) if norm_p > 0 else np.zeros_like(p)
            if h["mu"] != 0:
                if h["ema"]:
                    u = u * (1 - h["mu"])
                st["m"] = u + h["mu"] * st["m"]
                u = u + h["mu"] * st["m"] if h["nesterov"] else st["m"]
            updates[path] = -eta * (u + h["wd"] * w_all[path])
        self.count += 1
        return build(updates)


class LoopSAdaGrad:
    r"""S-AdaGrad (paper Algorithm 1; spec §2.5-2.6): full-matrix AdaGrad on the flattened leaf with an
    FD sketch of rank k (principled: of each ``block_size`` chunk)::

        if due:  sketch ← FD(sketch, g) (exponent −1/2, absolute shift δ);  d = (Ḡ + (ρ+δ)I + εI)^{−1/2} g
        else:    d = the last sketch applied to g with g's own mass (:func:`fd_apply_with_own_mass`)
        m ← μ·m + d  (μ = 0: m = d);   x ← x − η·m − η·λ·x

    Principled: relative ε (1e-7), the K3 cutoff, decay β (escaped mass decayed by β too). Faithful
    (the authors' OCO code): ε = 0, β = 1, no cutoff. Due: every step by default (T = 1); with an
    integer T > 1 the block pieces take phases as :class:`LoopSketchy`'s.
    """

    def __init__(self, params: dict, *, learning_rate: Any = 0.316, rank: int = 128, delta: float = 0.0,
                 eps: Optional[float] = None, b2: float = 1.0, momentum: float = 0.0, weight_decay: float = 0.0,
                 block_size: Optional[int] = None, mode: str = "principled", precondition_every: Any = None,
                 spread_refresh: Optional[bool] = None):
        check_mode(mode)  # a misspelt mode would run the principled rule
        faithful = mode == "faithful"
        T = 1 if precondition_every is None else precondition_every
        spread = spread_refresh is not False and isinstance(T, int) and T > 1
        self.h = dict(lr=learning_rate, delta=delta, eps=0.0 if faithful else (1e-7 if eps is None else eps), beta=b2,
                      mu=momentum, wd=weight_decay, T=T, spread=spread, faithful=faithful)
        self.count = 0
        self.state = {}
        for path, w in leaves(params):
            d = max(1, w.size)
            phases = T if spread else 1
            (blocks,) = _blocks_and_phases((d,), rank, block_size, phases, _first_phase(w.shape, phases))
            self.state[path] = {"m": np.zeros(w.shape),
                                "blocks": [dict(rows=(a, b), phase=p, sketch=new_sketch(b - a, k)) for a, b, k, p in blocks]}

    _due = LoopSketchy._due

    def step(self, grads: dict, params: dict) -> dict:
        h, eta, updates = self.h, value_at(self.h["lr"], self.count), {}
        w_all = dict(leaves(params))
        for path, g in leaves(grads):
            st = self.state[path]
            column = g.reshape(-1, 1)
            direction = np.zeros_like(column)
            for blk in st["blocks"]:
                a, b = blk["rows"]
                if self._due(blk["phase"]):
                    blk["sketch"] = fd_step(blk["sketch"], column[a:b], exponent=-0.5, beta=h["beta"], gamma=h["beta"],
                                            eps=h["eps"], relative_eps=True, delta=h["delta"], cutoff=not h["faithful"])
                    direction[a:b] = fd_apply(blk["sketch"], column[a:b])
                else:
                    direction[a:b] = fd_apply_with_own_mass(blk["sketch"], column[a:b])
            d = direction.reshape(g.shape)
            if h["mu"] != 0:
                st["m"] = h["mu"] * st["m"] + d
                d = st["m"]
            updates[path] = -eta * d - eta * h["wd"] * w_all[path]
        self.count += 1
        return build(updates)
