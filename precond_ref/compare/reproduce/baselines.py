"""Reference baselines the library does not ship, written for ``reproduce`` only.

These are *not* methods of :mod:`precond_ref` (``precond_ref/methods/`` holds the five papers'
methods): they are the minimal, clearly-labelled comparison points the papers' claims are made
against. Where PyTorch has the baseline (Adam, AdamW, SGD, RMSProp) ``torch.optim`` runs it; what
torch lacks is here:

- :class:`ShampooReference`: Shampoo (Gupta, Koren, Singer, ICML 2018) with exponential moving
  averages of the Kronecker factors, one-sided (``sides=1``: the smaller axis' factor to the power
  -1/2, the structure ASGO's paper calls one-sided Shampoo) or two-sided (``sides=2``: each factor
  to the power -1/4), heavy-ball momentum, and the update rescaled layer by layer to the Frobenius
  norm of the Adam update ("grafting", as in the ASGO authors' Shampoo baseline). Roots every
  ``precondition_every`` steps, by a float64 symmetric eigendecomposition (``root="eigh"``) or by
  the coupled Newton iteration in the factors' own dtype (``root="newton"``: what a root-based
  Shampoo does in half precision, where there is no eigendecomposition); parameters with fewer than
  two dimensions take the Adam update.
- :class:`RootRMSPropReference`: RMSProp as RF-RMSProp's rule with the root put back (Lin et al.,
  Figure 1, left against right): the same batch-scaled statistic ``s`` (started at 1), damping,
  weight decay and heavy-ball momentum, and the direction ``g / (sqrt(s) + lambda) + kappa theta``;
  ``root=False`` is RF-RMSProp itself (the test checks it against the library's).
- :class:`MuonReference`: Muon (Jordan et al. 2024): Nesterov momentum 0.95 whose matrix is
  orthogonalised by five steps of the quintic Newton-Schulz iteration (coefficients 3.4445,
  -4.7750, 2.0315), the update scaled to root-mean-square ``rms * sqrt(max(m, n))`` as in Liu et
  al.'s "Muon is scalable" (so that one learning rate serves it and AdamW), with decoupled weight
  decay; parameters that are not matrices, and those ``adam_filter(name)`` selects (embeddings and
  the read-out, by Muon's convention), take AdamW's step at the same rate.
- :func:`oco_adagrad`: online diagonal or full-matrix AdaGrad (Duchi, Hazan, Singer, JMLR 2011)
  with ``delta = 0`` (the pseudo-inverse root, as the Sketchy paper's Appendix A protocol), for the
  online logistic regression of the Sketchy experiment (NumPy).
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["ShampooReference", "RootRMSPropReference", "MuonReference", "orthogonalize", "oco_adagrad"]


def _root_rmsprop_class() -> Any:
    import torch

    class RootRMSPropReference(torch.optim.Optimizer):
        """RF-RMSProp's rule with the root put back; see the module docstring."""

        def __init__(self, params: Any, lr: float = 1e-2, b2: float = 0.999, damping: float = 1e-4, momentum: float = 0.0,
                     weight_decay: float = 0.0, batch_size: Any = None, initial_scale: float = 1.0,
                     scale_by_batch_size: bool = True, root: bool = True) -> None:
            params = list(params)
            if params and isinstance(params[0], tuple):  # named parameters
                params = [p for _, p in params]
            super().__init__(params, dict(lr=lr, b2=b2, damping=damping, momentum=momentum, weight_decay=weight_decay,
                                          batch_size=batch_size, initial_scale=initial_scale,
                                          scale_by_batch_size=scale_by_batch_size, root=root))

        @torch.no_grad()
        def step(self, closure: Callable | None = None, batch_size: Any = None) -> Any:
            loss = None if closure is None else closure()
            for group in self.param_groups:
                scale = (batch_size or group["batch_size"]) if group["scale_by_batch_size"] else 1
                if scale is None:
                    raise ValueError("RootRMSPropReference: batch_size is needed (the examples the loss averages over)")
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    g, state = p.grad, self.state[p]
                    if not state:
                        state["s"] = torch.full_like(p, group["initial_scale"])  # s_0
                        state["v"] = torch.zeros_like(p)
                    s = state["s"].mul_(group["b2"]).add_(g * g * scale, alpha=1 - group["b2"])  # s <- b2 s + (1-b2) B g^2
                    denominator = (s.sqrt() if group["root"] else s) + group["damping"]
                    delta = g / denominator + group["weight_decay"] * p  # g / (sqrt(s) + lambda) + kappa theta
                    v = state["v"].mul_(group["momentum"]).add_(delta)  # v <- alpha1 v + delta
                    p.add_(v, alpha=-group["lr"])
            return loss

    return RootRMSPropReference


def _shampoo_class() -> Any:
    import torch

    class ShampooReference(torch.optim.Optimizer):
        """Reference Shampoo (EMA factors, grafted to Adam's update norm); see the module docstring."""

        def __init__(
            self, params: Any, lr: float = 3e-3, momentum: float = 0.9, b2: float = 0.999, eps: float = 1e-6,
            sides: int = 2, precondition_every: int = 1, adam_betas: tuple = (0.9, 0.999), adam_eps: float = 1e-8,
            root: str = "eigh", newton_steps: int = 20, graft: bool = True, accumulate: str = "ema",
        ) -> None:
            if sides not in (1, 2):
                raise ValueError(f"ShampooReference: sides must be 1 or 2, got {sides!r}")
            if root not in ("eigh", "newton"):
                raise ValueError(f"ShampooReference: root must be 'eigh' or 'newton', got {root!r}")
            if accumulate not in ("ema", "sum"):
                raise ValueError(f"ShampooReference: accumulate must be 'ema' or 'sum', got {accumulate!r}")
            params = list(params)
            if params and isinstance(params[0], tuple):  # named parameters
                params = [p for _, p in params]
            super().__init__(params, dict(lr=lr, momentum=momentum, b2=b2, eps=eps, sides=sides,
                                          precondition_every=precondition_every, adam_betas=adam_betas, adam_eps=adam_eps,
                                          root=root, newton_steps=newton_steps, graft=graft, accumulate=accumulate))

        @staticmethod
        def _root(factor: Any, power: float, eps: float) -> Any:
            import torch

            f64 = factor.double()
            dim = f64.shape[0]
            damping = eps * max(float(torch.trace(f64)) / dim, 1e-30)
            values, vectors = torch.linalg.eigh(f64 + damping * torch.eye(dim, dtype=f64.dtype, device=f64.device))
            values = values.clamp_min(damping)
            return ((vectors * values.pow(-power)) @ vectors.T).to(factor.dtype)

        @staticmethod
        def _newton_root(factor: Any, power: float, eps: float, steps: int) -> Any:
            """``(F + damping I)^(-power)`` by the coupled Newton iteration (Guo and Higham 2006; the
            form of Anil et al.'s scalable Shampoo), every product in ``factor.dtype``."""
            import torch

            p = round(1 / power)
            dim = factor.shape[0]
            eye = torch.eye(dim, dtype=factor.dtype, device=factor.device)
            damping = eps * max(float(torch.trace(factor.float())) / dim, 1e-30)
            matrix = factor + damping * eye
            z = (1 + p) / (2 * float(torch.linalg.matrix_norm(matrix.float())))
            root, m = eye * z ** (1 / p), matrix * z
            for _ in range(steps):
                step_matrix = (1 + 1 / p) * eye - m / p
                root = root @ step_matrix
                m = torch.linalg.matrix_power(step_matrix, p) @ m
            return root

        @torch.no_grad()
        def step(self, closure: Callable | None = None) -> Any:
            loss = None if closure is None else closure()
            for group in self.param_groups:
                b1, b2a = group["adam_betas"]
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    g = p.grad
                    state = self.state[p]
                    if not state:
                        state["step"] = 0
                        state["m"] = torch.zeros_like(p)
                        state["v"] = torch.zeros_like(p)
                    state["step"] += 1
                    t = state["step"]
                    state["m"].mul_(b1).add_(g, alpha=1 - b1)
                    state["v"].mul_(b2a).addcmul_(g, g, value=1 - b2a)
                    adam = (state["m"] / (1 - b1**t)) / ((state["v"] / (1 - b2a**t)).sqrt() + group["adam_eps"])
                    if p.ndim < 2:
                        p.add_(adam, alpha=-group["lr"])
                        continue
                    g2 = g.reshape(g.shape[0], -1)
                    m = state["m"].reshape(g2.shape)
                    rows, cols = g2.shape
                    left = group["sides"] == 2 or rows <= cols
                    right = group["sides"] == 2 or rows > cols
                    power = 0.25 if group["sides"] == 2 else 0.5
                    # EMA: F <- b2 F + (1 - b2) G G^T; sum (Gupta et al.): F <- F + G G^T
                    decay, weight = (group["b2"], 1 - group["b2"]) if group["accumulate"] == "ema" else (1.0, 1.0)
                    if left:
                        state.setdefault("L", torch.zeros(rows, rows, dtype=p.dtype, device=p.device))
                        state["L"].mul_(decay).add_(g2 @ g2.T, alpha=weight)
                    if right:
                        state.setdefault("R", torch.zeros(cols, cols, dtype=p.dtype, device=p.device))
                        state["R"].mul_(decay).add_(g2.T @ g2, alpha=weight)
                    if (t - 1) % group["precondition_every"] == 0:
                        for side, on in (("L", left), ("R", right)):
                            if on:
                                state[side + "_root"] = (
                                    self._root(state[side], power, group["eps"]) if group["root"] == "eigh"
                                    else self._newton_root(state[side], power, group["eps"], group["newton_steps"]))
                    # Without momentum (momentum 0) the preconditioned matrix is the gradient itself.
                    direction = m if group["momentum"] > 0 else g2
                    if left:
                        direction = state["L_root"] @ direction
                    if right:
                        direction = direction @ state["R_root"]
                    scale = adam.norm() / direction.norm().clamp_min(1e-30) if group["graft"] else 1.0
                    p.add_(direction.reshape(p.shape) * scale, alpha=-group["lr"])
            return loss

    return ShampooReference


def orthogonalize(matrix: Any, steps: int = 5) -> Any:
    """Muon's approximate orthogonal factor ``U V^T`` of ``matrix = U S V^T``: the quintic
    Newton-Schulz iteration of Jordan et al. on ``matrix / ||matrix||_F``: an odd polynomial, so the
    singular vectors are kept exactly, and the singular values end near 1, within about [0.5, 1.5]
    rather than at 1 (the coefficients trade accuracy for speed)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = matrix / (matrix.norm() + 1e-7)
    tall = x.shape[0] > x.shape[1]
    if tall:  # iterate on the wide orientation: the Gram matrix is the smaller one
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def _muon_class() -> Any:
    import torch

    class MuonReference(torch.optim.Optimizer):
        """Reference Muon with an AdamW part; see the module docstring."""

        def __init__(
            self, named: Any, lr: float = 3e-3, momentum: float = 0.95, ns_steps: int = 5, rms: float = 0.2,
            weight_decay: float = 0.01, adam_betas: tuple = (0.9, 0.999), adam_eps: float = 1e-8,
            adam_filter: Callable[[str], bool] = lambda name: False,
        ) -> None:
            named = list(named)
            muon = [p for n, p in named if p.ndim == 2 and not adam_filter(n)]
            adam = [p for n, p in named if not (p.ndim == 2 and not adam_filter(n))]
            groups = [{"params": muon, "muon": True}, {"params": adam, "muon": False}]
            super().__init__([g for g in groups if g["params"]], dict(
                lr=lr, momentum=momentum, ns_steps=ns_steps, rms=rms, weight_decay=weight_decay, adam_betas=adam_betas,
                adam_eps=adam_eps))

        @torch.no_grad()
        def step(self, closure: Callable | None = None) -> Any:
            loss = None if closure is None else closure()
            for group in self.param_groups:
                lr, b1, b2 = group["lr"], *group["adam_betas"]
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    g, state = p.grad, self.state[p]
                    p.mul_(1 - lr * group["weight_decay"])
                    if group["muon"]:
                        buf = state.setdefault("momentum_buffer", torch.zeros_like(p))
                        buf.mul_(group["momentum"]).add_(g)
                        direction = orthogonalize(g.add(buf, alpha=group["momentum"]), group["ns_steps"])
                        p.add_(direction, alpha=-lr * group["rms"] * max(p.shape) ** 0.5)
                        continue
                    if not state:
                        state.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                    state["step"] += 1
                    t = state["step"]
                    state["m"].mul_(b1).add_(g, alpha=1 - b1)
                    state["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
                    denom = (state["v"] / (1 - b2**t)).sqrt().add_(group["adam_eps"])
                    p.addcdiv_(state["m"], denom, value=-lr / (1 - b1**t))
            return loss

    return MuonReference


_CLASSES = {"ShampooReference": _shampoo_class, "RootRMSPropReference": _root_rmsprop_class, "MuonReference": _muon_class}


def __getattr__(name: str) -> Any:
    if name in _CLASSES:  # defined on first use: this module imports without torch
        cls = _CLASSES[name]()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def oco_adagrad(features: Any, labels: Any, learning_rate: float, full: bool) -> Any:
    """Per-round logistic losses of online AdaGrad (diagonal or full-matrix, ``delta = 0``).

    ``features`` ``(T, d)``, ``labels`` in {-1, +1}; round ``t`` suffers ``log(1 + exp(-y x.w))`` at
    the current iterate, then steps ``w -= lr * H^{-1/2} g`` with ``H = sum g g^T`` (full) or its
    diagonal, the inverse root restricted to the range (pseudo-inverse), as with ``delta = 0``.
    """
    import numpy as np

    rounds, dim = features.shape
    w = np.zeros(dim)
    losses = np.empty(rounds)
    h = np.zeros((dim, dim)) if full else np.zeros(dim)
    for t in range(rounds):
        x, y = features[t], labels[t]
        margin = y * (x @ w)
        losses[t] = np.logaddexp(0.0, -margin)
        g = -y * x / (1.0 + np.exp(margin))
        if full:
            h += np.outer(g, g)
            values, vectors = np.linalg.eigh(h)
            keep = values > values.max() * dim * np.finfo(float).eps
            if keep.any():
                v = vectors[:, keep]
                w -= learning_rate * (v @ ((v.T @ g) / np.sqrt(values[keep])))
        else:
            h += g * g
            nz = h > 0
            w[nz] -= learning_rate * g[nz] / np.sqrt(h[nz])
    return losses
