"""``torch.optim.Optimizer`` front-ends for the core methods.

Each class is a thin subclass of :class:`CoreOptimizer`: torch-style hyperparameter names per
param group, mapped onto the core factory's arguments by ``core_kwargs``. Tensors go into the core
as they are (the array API namespace of a tensor is torch's), on whatever device they live; the
core's new state is written back into ``self.state`` and its updates are added to the parameters
in place. ``state_dict`` / ``load_state_dict`` therefore work as for any torch optimizer.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch

import precond_ref as pr
from precond_ref.transform import PrecondState, Transform
from precond_ref.tree import path_str, tree_flatten

__all__ = ["CoreOptimizer", "AGD", "ASGO", "DASGO", "Sketchy", "SAdaGrad"]

_STEP, _NONFINITE = "step", "nonfinite_count"
# Host-side bookkeeping stored beside the core state: calls taken part in, and "holds a core group".
_CALLS, _HEAD = "calls", "core_group"
_BOOKKEEPING = (_STEP, _NONFINITE, _CALLS, _HEAD)


def _split_named(params: Any) -> tuple[list[dict], dict[torch.Tensor, str]]:
    """Normalise ``params`` into param groups and a tensor -> name map.

    Accepts tensors, ``(name, tensor)`` pairs (``model.named_parameters()``), or dicts whose
    ``"params"`` are either; names also come from torch's own ``param_names`` group entry.
    """
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors, (name, tensor) pairs or dicts")
    groups = list(params)
    if not groups:
        raise ValueError("optimizer got an empty parameter list")
    if not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    names: dict[torch.Tensor, str] = {}
    out = []
    for group in groups:
        group = dict(group)
        members = group["params"]
        members = [members] if isinstance(members, torch.Tensor) else list(members)
        tensors = []
        for item in members:
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
                names[item[1]] = item[0]
                tensors.append(item[1])
            else:
                tensors.append(item)
        for name, tensor in zip(group.pop("param_names", []), tensors):
            names[tensor] = name
        group["params"] = tensors
        out.append(group)
    return out, names


class CoreOptimizer(torch.optim.Optimizer):
    """Base class: a ``torch.optim.Optimizer`` that runs a :class:`precond_ref.Transform`.

    Subclasses set ``core_factory`` (a core factory such as :func:`precond_ref.agd`) and implement
    :meth:`core_kwargs`, mapping one param group's torch-style entries to the factory's keyword
    arguments. The factory is called once per group when the group is added (so invalid
    hyperparameters raise ``ValueError`` at construction) and again whenever a group's
    hyperparameters change, e.g. when an ``lr_scheduler`` writes ``group["lr"]``.

    Per step, the parameters of a group that have gradients form one tree, keyed by parameter
    names when they are known (``model.named_parameters()`` or ``model=``: ``"fc1.weight"``
    becomes the path ``("fc1", "weight")``, which is what weight/bias pairing uses) and by
    position otherwise. Parameters that missed steps (no gradient) keep their own step counter
    and are stepped in a separate call, matching torch's per-parameter semantics.

    ``self.state[p]`` holds ``"step"`` and ``"nonfinite_count"`` (the core's 0-D int32 counters)
    for every parameter and, on the first parameter of each core group, that group's state
    arrays. ``load_state_dict`` restores every tensor with its saved dtype (torch's default would
    cast float32 state of bf16 parameters to bf16).

    ``step(closure=None, **extra)`` forwards ``extra`` (e.g. ``batch_size=``) to the core update.
    """

    core_factory: Callable[..., Transform]

    def __init__(self, params: Any, defaults: dict, *, model: Optional[torch.nn.Module] = None):
        groups, names = _split_named(params)
        if model is not None:
            names.update({p: n for n, p in model.named_parameters()})
        self._param_names = names
        self._transforms: dict[int, tuple[tuple, Transform]] = {}
        super().__init__(groups, defaults)

    def core_kwargs(self, group: dict) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._transform(self.param_groups[-1])

    def _transform(self, group: dict) -> Transform:
        kwargs = self.core_kwargs(group)
        key = tuple(sorted((k, repr(v)) for k, v in kwargs.items()))
        cached = self._transforms.get(id(group))
        if cached is None or cached[0] != key:
            cached = (key, type(self).core_factory(**kwargs))
            self._transforms[id(group)] = cached
        return cached[1]

    def _path(self, p: torch.Tensor, index: int) -> tuple:
        name = self._param_names.get(p)
        return tuple(name.split(".")) if name else (f"param{index}",)

    @staticmethod
    def _tree(paths: list[tuple], leaves: list[torch.Tensor]) -> dict:
        tree: dict = {}
        for path, leaf in zip(paths, leaves):
            node = tree
            for key in path[:-1]:
                node = node.setdefault(key, {})
                if not isinstance(node, dict):
                    raise ValueError(f"parameter names clash at {'.'.join(path)!r}")
            if path[-1] in node:
                raise ValueError(f"two parameters share the name {'.'.join(path)!r}")
            node[path[-1]] = leaf
        return tree

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None, **extra: Any) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = 0
        for group in self.param_groups:
            transform = self._transform(group)
            # Parameters stepped together so far share a counter; the key is a host-side count of
            # the calls each took part in, so grouping them needs no device synchronisation.
            by_calls: dict[int, list[tuple[int, torch.Tensor]]] = {}
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                calls = self.state[p].get(_CALLS, 0)
                by_calls.setdefault(calls, []).append((index - 1, p))
            for calls, members in by_calls.items():
                self._step_members(transform, members, fresh=calls == 0, extra=extra)
        return loss

    def _step_members(self, transform: Transform, members: list, *, fresh: bool, extra: dict) -> None:
        paths = [self._path(p, i) for i, p in members]
        tensors = [p for _, p in members]
        params_tree = self._tree(paths, [p.detach() for p in tensors])
        grads_tree = self._tree(paths, [p.grad for p in tensors])
        by_key = {path_str(path): p for path, p in zip(paths, tensors)}
        if fresh:
            core_state = transform.init(params_tree)
        else:
            groups = {}
            for key, p in by_key.items():
                entries = self.state[p]
                if entries.get(_HEAD):
                    groups[key] = {k: v for k, v in entries.items() if k not in _BOOKKEEPING}
            first = self.state[tensors[0]]
            core_state = PrecondState(first[_STEP], first[_NONFINITE], groups)
        updates, new_state = transform.update(grads_tree, core_state, params_tree, **extra)
        update_leaves, update_def = tree_flatten(updates)
        for path, update in zip(update_def.paths, update_leaves):
            by_key[path_str(path)].add_(update)
        for p in tensors:
            entries = self.state[p]
            calls = entries.get(_CALLS, 0) + 1
            entries.clear()
            entries.update({_STEP: new_state.count, _NONFINITE: new_state.nonfinite_count, _CALLS: calls})
        for key, entries in new_state.groups.items():
            head = self.state[by_key[key]]
            head[_HEAD] = True
            head.update(entries)

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        self._transforms.clear()
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups):
            for param_id, p in zip(saved_group["params"], group["params"]):
                if param_id in saved:
                    self.state[p] = {
                        k: v.to(device=p.device) if isinstance(v, torch.Tensor) else v
                        for k, v in saved[param_id].items()
                    }
        for group in self.param_groups:
            self._transform(group)


class AGD(CoreOptimizer):
    """AGD (Yue et al., NeurIPS 2023) as a ``torch.optim.Optimizer``; see :func:`precond_ref.agd`.

    The arguments are the authors' (atorch ``AGD``), so this is a drop-in replacement for their
    class: ``weight_decouple=True`` is decoupled decay, ``fixed_decay=True`` with it is fixed decay,
    and ``weight_decouple=False`` is L2 decay added to the gradient (``fixed_decay`` then ignored).
    """

    core_factory = staticmethod(pr.agd)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        delta: float = 1e-5,
        weight_decay: float = 0.0,
        weight_decouple: bool = True,
        fixed_decay: bool = False,
        amsgrad: bool = False,
        win: bool = False,
        clip: Optional[float] = None,
        mode: str = "principled",
        on_nonfinite: str = "skip",
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            delta=delta,
            weight_decay=weight_decay,
            weight_decouple=weight_decouple,
            fixed_decay=fixed_decay,
            amsgrad=amsgrad,
            win=win,
            clip=clip,
            mode=mode,
            on_nonfinite=on_nonfinite,
        )
        super().__init__(params, defaults)

    def core_kwargs(self, group: dict) -> dict:
        if not group["weight_decouple"]:
            decay_mode = "l2"
        else:
            decay_mode = "fixed" if group["fixed_decay"] else "decoupled"
        b1, b2 = group["betas"]
        return dict(
            learning_rate=_float(group["lr"]),
            b1=b1,
            b2=b2,
            delta=group["delta"],
            weight_decay=group["weight_decay"],
            weight_decay_mode=decay_mode,
            amsgrad=group["amsgrad"],
            clip=group["clip"],
            win=group["win"],
            mode=group["mode"],
            on_nonfinite=group["on_nonfinite"],
        )


class _FallbackByName:
    """Core ``fallback_mask``: ``ndim < 2``, or the user's ``fallback_filter(name, tensor)`` on the
    dotted parameter name. A class (not a closure) so that its repr, which keys the cached core
    transform, is stable across steps."""

    def __init__(self, fallback_filter: Optional[Callable[[str, torch.Tensor], bool]]) -> None:
        self.fallback_filter = fallback_filter

    def __call__(self, path: tuple, leaf: Any) -> bool:
        if leaf.ndim < 2:
            return True
        return self.fallback_filter is not None and bool(
            self.fallback_filter(".".join(str(k) for k in path), leaf)
        )

    def __repr__(self) -> str:
        return f"_FallbackByName({self.fallback_filter!r})"


class ASGO(CoreOptimizer):
    """ASGO (An et al., arXiv 2503.20762) as a ``torch.optim.Optimizer``; see :func:`precond_ref.asgo`.

    ``betas=(b1, b2)``: momentum and statistic EMA. ``damping``, ``eps`` and ``root_method`` set
    to ``None`` mean the mode's default. Parameters with fewer than 2 dimensions go to the built-in
    Adam (``fallback_betas``, ``fallback_eps``, ``fallback_weight_decay``, same ``lr``); pass
    named parameters (``model.named_parameters()``) and ``fallback_filter=lambda name, p: "emb" in
    name`` to route more by name, as the authors' trainer does for embeddings.
    """

    core_factory = staticmethod(pr.asgo)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-2,
        betas: tuple[float, float] = (0.9, 0.8),
        weight_decay: float = 0.1,
        damping: Optional[float] = None,
        eps: Optional[float] = None,
        root_method: Optional[str] = None,
        root_steps: int = 10,
        precondition_every: int = 1,
        rms_target: Optional[float] = 0.2,
        accumulator: str = "ema",
        side: str = "auto",
        block_size: Optional[int] = None,
        fallback_betas: tuple[float, float] = (0.9, 0.95),
        fallback_eps: float = 1e-8,
        fallback_weight_decay: float = 0.0,
        fallback_filter: Optional[Callable[[str, torch.Tensor], bool]] = None,
        mode: str = "principled",
        on_nonfinite: str = "skip",
        *,
        model: Optional[torch.nn.Module] = None,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, weight_decay=weight_decay, damping=damping, eps=eps,
            root_method=root_method, root_steps=root_steps, precondition_every=precondition_every,
            rms_target=rms_target, accumulator=accumulator, side=side, block_size=block_size,
            fallback_betas=fallback_betas, fallback_eps=fallback_eps,
            fallback_weight_decay=fallback_weight_decay, fallback_filter=fallback_filter,
            mode=mode, on_nonfinite=on_nonfinite,
        )
        super().__init__(params, defaults, model=model)

    def core_kwargs(self, group: dict) -> dict:
        b1, b2 = group["betas"]
        fb1, fb2 = group["fallback_betas"]
        return dict(
            learning_rate=_float(group["lr"]), b1=b1, b2=b2, weight_decay=group["weight_decay"],
            damping=group["damping"], eps=group["eps"], root_method=group["root_method"],
            root_steps=group["root_steps"], precondition_every=group["precondition_every"],
            rms_target=group["rms_target"], accumulator=group["accumulator"], side=group["side"],
            block_size=group["block_size"], fallback_mask=_FallbackByName(group["fallback_filter"]),
            fallback_b1=fb1, fallback_b2=fb2, fallback_eps=group["fallback_eps"],
            fallback_weight_decay=group["fallback_weight_decay"], mode=group["mode"],
            on_nonfinite=group["on_nonfinite"],
        )


class DASGO(CoreOptimizer):
    """DASGO (diagonal ASGO) as a ``torch.optim.Optimizer``; see :func:`precond_ref.dasgo`.

    Arguments as :class:`ASGO`; ``eps`` sits inside the square root of the column statistic.
    """

    core_factory = staticmethod(pr.dasgo)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        rms_target: Optional[float] = 0.2,
        side: str = "right",
        fallback_betas: tuple[float, float] = (0.9, 0.95),
        fallback_eps: float = 1e-8,
        fallback_weight_decay: float = 0.0,
        fallback_filter: Optional[Callable[[str, torch.Tensor], bool]] = None,
        mode: str = "principled",
        on_nonfinite: str = "skip",
        *,
        model: Optional[torch.nn.Module] = None,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rms_target=rms_target, side=side,
            fallback_betas=fallback_betas, fallback_eps=fallback_eps,
            fallback_weight_decay=fallback_weight_decay, fallback_filter=fallback_filter,
            mode=mode, on_nonfinite=on_nonfinite,
        )
        super().__init__(params, defaults, model=model)

    def core_kwargs(self, group: dict) -> dict:
        b1, b2 = group["betas"]
        fb1, fb2 = group["fallback_betas"]
        return dict(
            learning_rate=_float(group["lr"]), b1=b1, b2=b2, eps=group["eps"],
            weight_decay=group["weight_decay"], rms_target=group["rms_target"], side=group["side"],
            fallback_mask=_FallbackByName(group["fallback_filter"]), fallback_b1=fb1, fallback_b2=fb2,
            fallback_eps=group["fallback_eps"], fallback_weight_decay=group["fallback_weight_decay"],
            mode=group["mode"], on_nonfinite=group["on_nonfinite"],
        )


def _float(value: Any) -> Any:
    """A learning rate stored as a tensor by some schedulers becomes a Python float."""
    return float(value) if isinstance(value, torch.Tensor) else value


class Sketchy(CoreOptimizer):
    """Sketchy / FD-Shampoo (Feinberg et al., NeurIPS 2023) as a ``torch.optim.Optimizer``; see
    :func:`precond_ref.sketchy`.

    ``beta2`` is the decay of the sketched statistics (the core's ``b2``), ``graft_beta2`` that of
    the RMSProp graft; the other arguments keep the core names.
    """

    core_factory = staticmethod(pr.sketchy)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        rank: int = 128,
        beta2: float = 0.999,
        eps: float = 1e-7,
        relative_eps: bool = True,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        graft: str = "rmsprop",
        graft_beta2: float = 0.999,
        graft_eps: float = 1e-23,
        precondition_every: int = 1,
        start_preconditioning_step: int = 0,
        merge_dims: int = 1024,
        max_precondition_dim: int = 4096,
        precondition_1d: bool = False,
        block_size: Optional[int] = None,
        decomposition: str = "svd",
        mode: str = "principled",
        momentum_ema: bool = False,
        tail_decay: Optional[str] = None,
        on_nonfinite: str = "skip",
    ) -> None:
        defaults = dict(
            lr=lr, rank=rank, beta2=beta2, eps=eps, relative_eps=relative_eps, momentum=momentum,
            nesterov=nesterov, weight_decay=weight_decay, graft=graft, graft_beta2=graft_beta2,
            graft_eps=graft_eps, precondition_every=precondition_every,
            start_preconditioning_step=start_preconditioning_step, merge_dims=merge_dims,
            max_precondition_dim=max_precondition_dim, precondition_1d=precondition_1d,
            block_size=block_size, decomposition=decomposition, mode=mode,
            momentum_ema=momentum_ema, tail_decay=tail_decay, on_nonfinite=on_nonfinite,
        )
        super().__init__(params, defaults)

    def core_kwargs(self, group: dict) -> dict:
        return dict(
            learning_rate=_float(group["lr"]), rank=group["rank"], b2=group["beta2"],
            eps=group["eps"], relative_eps=group["relative_eps"], momentum=group["momentum"],
            nesterov=group["nesterov"], weight_decay=group["weight_decay"], graft=group["graft"],
            graft_b2=group["graft_beta2"], graft_eps=group["graft_eps"],
            precondition_every=group["precondition_every"],
            start_preconditioning_step=group["start_preconditioning_step"],
            merge_dims=group["merge_dims"], max_precondition_dim=group["max_precondition_dim"],
            precondition_1d=group["precondition_1d"], block_size=group["block_size"],
            decomposition=group["decomposition"], mode=group["mode"],
            momentum_ema=group["momentum_ema"], tail_decay=group["tail_decay"],
            on_nonfinite=group["on_nonfinite"],
        )


class SAdaGrad(CoreOptimizer):
    """S-AdaGrad (Feinberg et al., NeurIPS 2023): full-matrix AdaGrad with a Frequent Directions
    sketch, as a ``torch.optim.Optimizer``; see :func:`precond_ref.s_adagrad`. ``beta2`` is the
    core's ``b2`` (1 = AdaGrad's sum)."""

    core_factory = staticmethod(pr.s_adagrad)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-2,
        rank: int = 128,
        delta: float = 0.0,
        eps: Optional[float] = None,
        beta2: float = 1.0,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        block_size: Optional[int] = None,
        mode: str = "principled",
        on_nonfinite: str = "skip",
    ) -> None:
        defaults = dict(
            lr=lr, rank=rank, delta=delta, eps=eps, beta2=beta2, momentum=momentum,
            weight_decay=weight_decay, block_size=block_size, mode=mode, on_nonfinite=on_nonfinite,
        )
        super().__init__(params, defaults)

    def core_kwargs(self, group: dict) -> dict:
        return dict(
            learning_rate=_float(group["lr"]), rank=group["rank"], delta=group["delta"],
            eps=group["eps"], b2=group["beta2"], momentum=group["momentum"],
            weight_decay=group["weight_decay"], block_size=group["block_size"], mode=group["mode"],
            on_nonfinite=group["on_nonfinite"],
        )
