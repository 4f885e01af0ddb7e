"""A loop-by-loop NumPy transcription of MBF (spec ``mbf.md`` sections 2.2-2.3), the test oracle.

Written independently of ``precond_ref.methods.mbf``: explicit Python loops over mini-blocks and
chunks, ``np.linalg.inv`` per block, float64. It covers the test model of ``test_mbf.py``:
FC layers (``weight`` (O, I) + optional ``bias``), conv weights (O, C, s...), and diagonal-rule
leaves (everything else).
"""

from __future__ import annotations

import numpy as np


def fc_stat_and_apply(kind: str, h_g: np.ndarray, h_m: np.ndarray, f: np.ndarray | None):
    """Statistic of H_g and the map H_m -> D for one FC group (F_inv given as f)."""
    o, n = h_g.shape
    if kind == "official_chunks":
        chunks_g = [h_g.reshape(-1)[r * o : (r + 1) * o] for r in range(n)]
        stat = sum(np.outer(c, c) for c in chunks_g) / n
        if f is None:
            return stat, None
        chunks_m = [h_m.reshape(-1)[r * o : (r + 1) * o] for r in range(n)]
        d = np.concatenate([f @ c for c in chunks_m]).reshape(o, n)
        return stat, d
    cols_g = [h_g[:, r] for r in range(n)]
    stat = sum(np.outer(c, c) for c in cols_g) / n
    if f is None:
        return stat, None
    d = np.stack([f @ h_m[:, r] for r in range(n)], axis=1)
    return stat, d


class ReferenceMBF:
    def __init__(
        self,
        params: dict,
        *,
        lr=1e-2,
        damping=1e-3,
        momentum=0.9,
        b2=0.9,
        weight_decay=0.0,
        t1=1,
        t2=1,
        fc_blocks="columns_avg",
        diagonal_b2=0.999,
        diagonal_eps=1e-8,
        second_moment="momentum",
        max_block_dim=None,
        symmetrize=True,
        block_size=None,
        phases=1,
    ):
        self.h = dict(
            lr=lr, damping=damping, momentum=momentum, b2=b2, wd=weight_decay, t1=t1, t2=t2,
            fc=fc_blocks, db2=diagonal_b2, eps=diagonal_eps, sm=second_moment,
            max_block_dim=max_block_dim, sym=symmetrize, phases=phases,
        )
        self.i = 0
        self.state = {}
        for name, leaves in params.items():
            w = leaves.get("weight")
            st = {"m": {k: np.zeros_like(v) for k, v in leaves.items()},
                  "a": {k: np.zeros_like(v) for k, v in leaves.items()},
                  "v": {k: np.zeros_like(v) for k, v in leaves.items()}}
            if w is not None and w.ndim == 2:
                o = w.shape[0]
                if max_block_dim is not None and o > max_block_dim:
                    st["kind"] = "elementwise"
                    st["F"] = {k: np.zeros_like(v) for k, v in leaves.items()}
                    st["Finv"] = {k: np.full_like(v, 1 / damping) for k, v in leaves.items()}
                else:
                    # Blocked (issue 35): rows [start, stop) of the output axis, each its own block.
                    st["kind"] = "fc"
                    size = o if block_size is None else block_size
                    st["rows"] = [(r, min(r + size, o)) for r in range(0, o, size)]
                    st["F"] = [np.zeros((b - a, b - a)) for a, b in st["rows"]]
                    st["Finv"] = [np.eye(b - a) / damping for a, b in st["rows"]]
            elif w is not None and w.ndim >= 3:
                st["kind"] = "conv"
                o, c = w.shape[:2]
                q = int(np.prod(w.shape[2:]))
                st["F"] = np.zeros((o, c, q, q))
                st["Finv"] = np.broadcast_to(np.eye(q) / damping, (o, c, q, q)).copy()
            else:
                st["kind"] = "diagonal"
            self.state[name] = st
        # Spread refreshes: every matrix block, in the order name, FC row block / conv (o, c), joins
        # the list of blocks of its size; the k-th of n blocks of a size is in phase p when
        # n p // P <= k < n (p + 1) // P. Element-wise blocks are in phase 0.
        by_size = {}
        for name, st in self.state.items():
            if st["kind"] == "fc":
                keys = [(name, j) for j in range(len(st["rows"]))]
                sizes = [b - a for a, b in st["rows"]]
            elif st["kind"] == "conv":
                o, c, q, _ = st["F"].shape
                keys = [(name, (oo, cc)) for oo in range(o) for cc in range(c)]
                sizes = [q] * len(keys)
            else:
                continue
            for key, size in zip(keys, sizes):
                by_size.setdefault(size, []).append(key)
        self.phase = {}
        for blocks in by_size.values():
            n = len(blocks)
            for k, key in enumerate(blocks):
                self.phase[key] = next(p for p in range(phases) if n * p // phases <= k < n * (p + 1) // phases)

    def _due(self, key) -> bool:
        h, i = self.h, self.i
        if i <= h["t2"] and i % h["t1"] == 0:
            return True
        return i % h["t2"] == self.phase.get(key, 0) * h["t2"] // h["phases"]
    def _inv(self, a):
        h = self.h
        if h["sym"]:
            a = (a + a.T) / 2
        inv = np.linalg.inv(a + h["damping"] * np.eye(a.shape[0]))
        return (inv + inv.T) / 2 if h["sym"] else inv

    def step(self, params: dict, grads: dict) -> dict:
        h, i = self.h, self.i
        stats_now = i % h["t1"] == 0
        new_params = {}
        for name, leaves in params.items():
            st, g = self.state[name], grads[name]
            for k in leaves:
                st["m"][k] = h["momentum"] * st["m"][k] + g[k]
                st["a"][k] = h["momentum"] * st["a"][k] + (1 - h["momentum"]) * g[k]
            d = {}
            if st["kind"] == "fc":
                has_b = "bias" in leaves
                h_g = np.concatenate([g["weight"], g["bias"][:, None]], 1) if has_b else g["weight"]
                h_m = (np.concatenate([st["m"]["weight"], st["m"]["bias"][:, None]], 1)
                       if has_b else st["m"]["weight"])
                dh = np.zeros_like(h_m)
                for j, (a, b) in enumerate(st["rows"]):
                    if stats_now:
                        stat, _ = fc_stat_and_apply(h["fc"], h_g[a:b], h_m[a:b], None)
                        st["F"][j] = h["b2"] * st["F"][j] + (1 - h["b2"]) * stat
                    if self._due((name, j)):
                        st["Finv"][j] = self._inv(st["F"][j])
                    _, dh[a:b] = fc_stat_and_apply(h["fc"], h_g[a:b], h_m[a:b], st["Finv"][j])
                d["weight"] = dh[:, : g["weight"].shape[1]]
                if has_b:
                    d["bias"] = dh[:, -1]
            elif st["kind"] == "elementwise":
                for k in leaves:
                    if stats_now:
                        st["F"][k] = h["b2"] * st["F"][k] + (1 - h["b2"]) * g[k] ** 2
                    if self._due(None):
                        st["Finv"][k] = 1 / (st["F"][k] + h["damping"])
                    d[k] = st["Finv"][k] * st["m"][k]
            elif st["kind"] == "conv":
                w = g["weight"]
                o, c = w.shape[:2]
                gk = w.reshape(o, c, -1)
                mk = st["m"]["weight"].reshape(o, c, -1)
                out = np.zeros_like(mk)
                for oo in range(o):
                    for cc in range(c):
                        if stats_now:
                            st["F"][oo, cc] = h["b2"] * st["F"][oo, cc] + (1 - h["b2"]) * np.outer(gk[oo, cc], gk[oo, cc])
                        if self._due((name, (oo, cc))):
                            st["Finv"][oo, cc] = self._inv(st["F"][oo, cc])
                        out[oo, cc] = st["Finv"][oo, cc] @ mk[oo, cc]
                d["weight"] = out.reshape(w.shape)
                for k in leaves:
                    if k != "weight":
                        d[k] = self._diag(st, g, k, i)
            else:
                for k in leaves:
                    d[k] = self._diag(st, g, k, i)
            new_params[name] = {
                k: (1 - h["lr"] * h["wd"]) * leaves[k] - h["lr"] * d[k] for k in leaves
            }
        self.i += 1
        return new_params

    def _diag(self, st, g, k, i):
        h = self.h
        x = st["a"][k] if h["sm"] == "momentum" else g[k]
        st["v"][k] = h["db2"] * st["v"][k] + (1 - h["db2"]) * x**2
        return st["a"][k] / (h["eps"] + np.sqrt(st["v"][k] / (1 - h["db2"] ** (i + 1))))
