"""``torch.optim.Optimizer`` front-ends for the core methods.

Each class is a thin subclass of :class:`CoreOptimizer`: torch-style hyperparameter names per
param group, mapped onto the core factory's arguments by ``core_kwargs``. Tensors go into the core
as they are (the array API namespace of a tensor is torch's), on whatever device they live; the
core's new state is written back into ``self.state`` and its updates are added to the parameters
in place. ``state_dict`` / ``load_state_dict`` therefore work as for any torch optimizer.
"""

from __future__ import annotations

import itertools
import operator
import warnings
import weakref
from typing import Any, Callable, Iterable, NamedTuple, Optional

import torch

import precond_ref as pr
from precond_ref._backend import float32_matmul_precision
from precond_ref.transform import PrecondState, Transform, missing_members
from precond_ref.tree import TreeDef, path_str, tree_flatten, tree_unflatten

from . import _torch_compile, _torch_state
from ._torch_compile import CompileSetting

__all__ = ["CoreOptimizer", "AGD", "ASGO", "DASGO", "MBF", "RFRMSProp", "RFAdamW", "IFShampoo", "Sketchy", "SAdaGrad"]

_STEP, _NONFINITE = "step", "nonfinite_count"
# Host-side bookkeeping stored beside the core state: calls taken part in, and "holds a core group".
_CALLS, _HEAD = "calls", "core_group"
_BOOKKEEPING = (_STEP, _NONFINITE, _CALLS, _HEAD)


class _Members(NamedTuple):
    """What the steps of one set of parameters share: their tree, made once (see ``_members``)."""

    names: dict  # the optimizer's ``_param_names`` the paths were made from
    tensors: tuple  # the parameters in the tree's order
    treedef: TreeDef
    keys: tuple[str, ...]  # their core group keys (path strings), in the tree's order
    position: dict[str, int]  # key -> index in ``tensors``
    lead: int  # index in ``tensors`` of the first parameter in the group's order
    numel: int


# Param-group entries the core transform is not built from (``lr`` reaches it as a tensor).
_NOT_HYPERPARAMETERS = ("params", "param_names", "lr")


def _hyperparameters(group: dict) -> tuple:
    """A param group's hyperparameters that the core transform is built from (not ``lr``, which
    it reads as a tensor), as ``(keys, values, len(group))``; ``values`` is ``None`` when one of
    them is a container or tensor whose contents could change in place."""
    keys = tuple(k for k in group if k not in _NOT_HYPERPARAMETERS)
    values = tuple(group[k] for k in keys)
    if any(isinstance(v, (list, dict, set, torch.Tensor)) for v in values):
        values = None
    return keys, values, len(group)


def _unchanged(group: dict, hyperparameters: tuple) -> bool:
    """Whether ``group`` holds the very objects :func:`_hyperparameters` found in it, and as many
    entries (a key added or removed rebuilds the transform)."""
    keys, values, size = hyperparameters
    return values is not None and len(group) == size and all(map(operator.is_, values, map(group.get, keys)))


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
    and are stepped in a separate call, matching torch's per-parameter semantics. A member of a
    block (a weight paired with its bias, see ``Transform.group_leaves``) whose partner has a
    gradient while it has none takes part with a zero gradient and is left unchanged, its
    ``"step"`` not advanced (:func:`precond_ref.transform.missing_members`).

    ``self.state[p]`` holds ``"step"`` and ``"nonfinite_count"`` (the core's 0-D int32 counters)
    for every parameter and, on the first parameter of each core group, that group's state
    arrays. ``load_state_dict`` restores every tensor with its saved dtype (torch's default would
    cast float32 state of bf16 parameters to bf16).

    ``step(closure=None, **extra)`` forwards ``extra`` (e.g. ``batch_size=``) to the core update.

    **Speed.** A step reads no device value: the core's periodic work is scheduled from a host-side
    count of the calls each parameter took part in (``update(..., step=)``), the learning rate is
    a 0-D tensor on the parameters' device, and a non-finite step is skipped by element-wise
    selection. ``compile`` (default: the class's ``compile_by_default``; the environment variable
    ``PRECOND_REF_COMPILE=0`` or ``1`` overrides the default; a class that compiles by default
    compiles a param group of at least ``_torch_compile.AUTO_MIN_ELEMENTS`` elements from its first
    step and a smaller one from its ``_torch_compile.AUTO_AFTER_CALLS``-th, once a run has shown
    itself long enough to repay the seconds of compilation) runs each param group's core update
    and the in-place parameter update under ``torch.compile(fullgraph=True)``, which fuses the
    element-wise work into a few kernels; a dict is passed to ``torch.compile`` as options. If
    compilation fails the optimizer warns once and runs the same core eagerly. Compiled and eager
    steps agree to float32 rounding and share checkpoints. ``capturable=True`` (as in
    ``torch.optim``) allows capturing ``step`` in a CUDA graph: CUDA parameters only, and a method
    step without periodic work; give ``lr`` as a tensor to schedule it under replay. The first step
    makes the state (capture after warm-up steps); every later one writes each state tensor in place.
    """

    core_factory: Callable[..., Transform]
    #: Whether ``compile=None`` compiles (set per class from the benchmark: where it is faster).
    compile_by_default: bool = False
    # Attributes rebuilt on first use instead of being copied or pickled (see ``_torch_state``).
    _transient_attributes: tuple[str, ...] = ("_transforms", "_compiled", "_learning_rates", "_member_plans")

    def __init__(
        self,
        params: Any,
        defaults: dict,
        *,
        model: Optional[torch.nn.Module] = None,
        compile: CompileSetting = None,
        capturable: bool = False,
    ):
        _torch_state.check_tensor_lr(defaults.get("lr"))
        groups = _torch_state.param_groups_from(params)
        if not isinstance(capturable, bool):
            raise ValueError(f"capturable must be True or False, got {capturable!r}")
        self._compile_options = _torch_compile.compile_options(compile, self.compile_by_default)
        self._capturable = capturable
        self._model_names = {p: n for n, p in model.named_parameters()} if model is not None else {}
        self._param_names: dict[torch.Tensor, str] = dict(self._model_names)
        self._transforms: dict[int, tuple[tuple, Transform, tuple]] = {}
        self._compiled: dict[int, _torch_compile.CompiledStep] = {}
        self._learning_rates: dict[int, tuple[Any, torch.Tensor]] = {}
        self._member_plans: dict[tuple, _Members] = {}
        # Members of a block whose counters a step left behind their partners' (no gradient of
        # their own; see _fill_missing_members): never the source of a core group's counters.
        self._behind: set = set()
        super().__init__(groups, defaults)
        # Sharded (DTensor) parameters need the classes of precond_ref.adapters.torch_distributed.
        if not getattr(self, "_accepts_dtensor", False):
            for p in (p for group in self.param_groups for p in group["params"]):
                if hasattr(p, "device_mesh") and hasattr(p, "placements"):
                    raise TypeError(
                        f"{type(self).__name__}: parameter {self._param_names.get(p, '?')!r} is a DTensor (FSDP2 or "
                        f"tensor parallel); use precond_ref.adapters.torch_distributed.{type(self).__name__}"
                    )

    def core_kwargs(self, group: dict) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def add_param_group(self, param_group: dict) -> None:
        if isinstance(param_group, dict):
            _torch_state.check_tensor_lr(param_group.get("lr"))
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._param_names = _torch_state.names_from_groups([group], self._param_names)
        members = {id(p) for p in group["params"]}
        self._param_names.update((p, n) for p, n in self._model_names.items() if id(p) in members)
        self._transform(group)

    def __getstate__(self) -> dict:
        return _torch_state.getstate(self)

    def __setstate__(self, state: dict) -> None:
        _torch_state.setstate(self, state)

    def state_dict(self) -> dict:
        """torch's ``state_dict`` (with ``param_names`` when the parameters were named), without
        callable hyperparameters: they are configuration, kept by the optimizer that loads it."""
        return _torch_state.strip_callables(super().state_dict())

    def load_state_dict(self, state_dict: dict) -> None:
        """Validate, then load (atomically: a rejected checkpoint changes nothing); see
        :func:`precond_ref.adapters._torch_state.load_state_dict`."""
        _torch_state.load_state_dict(self, state_dict)

    def _transform(self, group: dict) -> Transform:
        """The group's core transform, rebuilt when a hyperparameter other than ``lr`` changes.

        The learning rate enters as the group's 0-D tensor (:meth:`_learning_rate`), so a scheduler
        changes a value the compiled kernels read, not the transform.
        """
        cached = self._transforms.get(id(group))
        if cached is not None and _unchanged(group, cached[2]):
            return cached[1]  # the step's common case, without the key's reprs
        kwargs = self.core_kwargs(group)
        key = tuple(sorted((k, "<lr tensor>" if k == "learning_rate" else repr(v)) for k, v in kwargs.items()))
        if cached is None or cached[0] != key:
            _torch_state.build_transform(self, group)  # validates the group's own values, torch names in errors
            cached = (key, _torch_state.build_transform(self, group, learning_rate=self._learning_rate(group)))
        self._transforms[id(group)] = (*cached[:2], _hyperparameters(group))
        return cached[1]

    def _learning_rate(self, group: dict) -> torch.Tensor:
        """The group's learning rate as a 0-D tensor on its parameters' device, set from ``lr``.

        A Python number is written only when it changed (a fill, no host-to-device copy); a tensor
        ``lr`` is copied on the device (so a captured step reads the scheduler's tensor).
        """
        lr = group["lr"]
        cached = self._learning_rates.get(id(group))
        if cached is None:
            device = group["params"][0].device if group["params"] else torch.device("cpu")
            dtype = torch.float32 if device.type == "mps" else torch.float64
            cached = (None, torch.zeros((), dtype=dtype, device=device))
        value, tensor = cached
        if isinstance(lr, torch.Tensor):
            tensor.copy_(lr.detach().reshape(()))
            value = None
        elif lr != value:
            _torch_state.check_learning_rate(self, lr)
            tensor.fill_(lr)
            value = lr
        self._learning_rates[id(group)] = (value, tensor)
        return tensor

    def _path(self, p: torch.Tensor, index: int) -> tuple:
        name = self._param_names.get(p)
        if not name:
            return (f"param{index}",)
        path = tuple(name.split("."))
        if p in getattr(self, "_inputs_first", ()) and path[-1] == "weight":
            # an inputs x outputs weight (transformers' Conv1D): the core's out-last "kernel"
            return path[:-1] + ("kernel",)
        return path

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
        if torch.compiler.is_compiling():
            return _step_outside_the_graph(self, closure, extra)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        filled = self._fill_missing_members()
        try:
            self._step_groups(extra)
        finally:
            for p, value, counters in filled:
                p.grad = None
                p.copy_(value)
                self.state[p].update(counters)
                self._behind.add(p)
        return loss

    def _group_paths(self) -> list[list[tuple]]:
        """Each group's leaf paths, numbered as :meth:`step` numbers unnamed ones."""
        out, index = [], 0
        for group in self.param_groups:
            out.append([self._path(p, index + k) for k, p in enumerate(group["params"])])
            index += len(group["params"])
        return out

    def _fill_missing_members(self) -> list:
        """Zero gradients for the members of a block (a paired weight/bias) that have none while
        another member has one (the rule of :func:`precond_ref.transform.missing_members`); returns
        what restores them after the step: the parameter's value and its counters."""
        filled, group_paths = [], None
        for n, group in enumerate(self.param_groups):
            tensors = group["params"]
            present = [p.grad is not None for p in tensors]
            if all(present) or not any(present):
                continue
            group_paths = group_paths or self._group_paths()
            blocks = CoreOptimizer._transform(self, group).group_leaves(group_paths[n], tensors)
            for i in missing_members(blocks, present):
                p = tensors[i]
                entries = self.state[p]
                counters = {
                    key: entries[key].clone() if key in entries else torch.zeros((), dtype=torch.int32, device=p.device)
                    for key in (_STEP, _NONFINITE)
                }
                filled.append((p, p.detach().clone(), counters))
                p.grad = torch.zeros_like(p)
        return filled

    def _step_groups(self, extra: dict) -> None:
        index = 0
        for group in self.param_groups:
            transform = self._transform(group)
            self._learning_rate(group)
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
                self._step_members(transform, members, calls=calls, extra=extra)

    def _step_members(self, transform: Transform, members: list, *, calls: int, extra: dict) -> None:
        """One core update of parameters that took part in ``calls`` earlier steps together."""
        plan = self._members(members)
        tensors = plan.tensors
        params_tree = tree_unflatten(plan.treedef, [p.detach() for p in tensors])
        grads_tree = tree_unflatten(plan.treedef, [p.grad for p in tensors])
        if self._capturable:
            named = [(path_str(self._path(p, i)), p) for i, p in members]
            _torch_compile.check_capturable(type(self).__name__, transform, named)
        states = [self.state[p] for p in tensors]
        if calls == 0 and not any(entries.get(_HEAD) for entries in states):
            core_state = transform.init(params_tree)
        else:
            # Stepped before, or warm-started (MBF.warm_start: state made, no call taken yet).
            # In the tree's order, as init made them (a compiled step guards on the order). A copy
            # less the bookkeeping keys: a third of the time of a filtering comprehension, which
            # cost about 1.3 us per head on a 2-core CPU.
            groups = {}
            for key, entries in zip(plan.keys, states):
                if entries.get(_HEAD):
                    core = groups[key] = entries.copy()
                    for name in _BOOKKEEPING:
                        core.pop(name, None)
            lead = states[plan.lead]  # the counters of the first parameter in the group's order ...
            if self._behind and tensors[plan.lead] in self._behind:
                lead = _counters_of_the_set(states, [p in self._behind for p in tensors])  # ... unless held back
            core_state = PrecondState(lead[_STEP], lead[_NONFINITE], groups)
        new_state = self._run_update(transform, grads_tree, core_state, params_tree, calls, extra, plan.numel)
        if self._capturable and calls > 0:
            new_state = _written_in_place(core_state, new_state)
        if self._behind:
            self._behind.difference_update(tensors)  # stepped: their counters are the set's again
        for entries in states:
            calls = entries.get(_CALLS, 0) + 1
            entries.clear()
            entries.update({_STEP: new_state.count, _NONFINITE: new_state.nonfinite_count, _CALLS: calls})
        for key, entries in new_state.groups.items():
            head = states[plan.position[key]]
            head[_HEAD] = True
            head.update(entries)

    def _members(self, members: list) -> "_Members":
        """The parameter tree of ``members`` (``(index, parameter)`` pairs), made once per set."""
        # A plan holds its parameters, so their ids stay theirs while it lives; an unnamed
        # parameter's path is its position, and load_state_dict may rename.
        ids = tuple((i, id(p)) for i, p in members)
        plan = self._member_plans.get(ids)
        if plan is None or plan.names is not self._param_names:
            paths = [self._path(p, i) for i, p in members]
            leaves, treedef = tree_flatten(self._tree(paths, [p for _, p in members]))  # refuses clashing names
            keys = tuple(map(path_str, treedef.paths))
            if len(self._member_plans) > 64:  # sets come and go with partial gradients: keep a few
                self._member_plans.clear()
            plan = self._member_plans[ids] = _Members(
                names=self._param_names,
                tensors=tuple(leaves),
                treedef=treedef,
                keys=keys,
                position={key: i for i, key in enumerate(keys)},
                lead=next(i for i, p in enumerate(leaves) if p is members[0][1]),
                numel=sum(p.numel() for p in leaves),
            )
        return plan

    def _run_update(
        self, transform: Transform, grads: dict, state: PrecondState, params: dict, calls: int, extra: dict, numel: int
    ) -> PrecondState:
        """The core update, its updates added to ``params`` in place; compiled where enabled."""
        options = self._compile_options
        if getattr(self, "_under_outer_compile", False) and not isinstance(options, dict):
            options = {}  # torch.compile(opt.step): the core update runs compiled, from the first step
        if isinstance(options, _torch_compile.Auto):
            options = options.options_for(numel, calls)
        if options is not None and isinstance(transform, Transform):
            compiled = self._compiled.get(id(transform))
            if compiled is None or compiled.transform is not transform:
                compiled = _torch_compile.CompiledStep(transform, options)
                live = {id(entry[1]) for entry in self._transforms.values()}
                self._compiled = {k: v for k, v in self._compiled.items() if k in live}
                self._compiled[id(transform)] = compiled
            try:
                with float32_matmul_precision(torch, transform.matmul_precision):
                    return compiled(grads, state, params, transform.due(calls), extra)
            except Exception as error:  # noqa: BLE001 - any compiler failure falls back to eager
                # A genuine input error fails again below and propagates from the eager path.
                new_state = self._eager_update(transform, grads, state, params, calls, extra)
                _torch_compile.notice_eager(type(self).__name__, error)
                self._compile_options = None
                self._under_outer_compile = False
                return new_state
        return self._eager_update(transform, grads, state, params, calls, extra)

    @staticmethod
    def _eager_update(transform: Any, grads: dict, state: PrecondState, params: dict, calls: int, extra: dict) -> PrecondState:
        updates, new_state = transform.update(grads, state, params, step=calls, **extra)
        torch._foreach_add_(tree_flatten(params)[0], tree_flatten(updates)[0])
        return new_state


@torch.compiler.disable
def _step_outside_the_graph(opt: "CoreOptimizer", closure: Optional[Callable[[], Any]], extra: dict) -> Any:
    """``step`` called inside ``torch.compile`` (torch's recipe ``torch.compile(opt.step)``).

    The step's host bookkeeping (the call counts that schedule periodic work, the sets of
    parameters with gradients) would be traced as constants, and dynamo would recompile the caller
    on every step until its limit, then run it eagerly. So dynamo steps around the whole step
    (one graph break), which runs as with ``compile=True``: the core update through the
    optimizer's own compiled function (its own code object, compiled once per interval decision),
    the bookkeeping eagerly. Its numbers are those of ``compile=True``.
    """
    previous = getattr(opt, "_under_outer_compile", False)
    opt._under_outer_compile = True
    try:
        return opt.step(closure, **extra)
    finally:
        opt._under_outer_compile = previous


def _counters_of_the_set(states: list, behind: list) -> dict:
    """The counters of parameters stepped together: a member's whose counters no step held back,
    else (every member was held back at some step) the largest of each, which is the count of the
    steps the set's blocks took (a held-back member only ever lags)."""
    for entries, lagging in zip(states, behind):
        if not lagging:
            return entries
    out = {}
    for key in (_STEP, _NONFINITE):
        value = states[0][key]
        for entries in states[1:]:
            value = torch.maximum(value, entries[key])
        out[key] = value
    return out


def _written_in_place(old: PrecondState, new: PrecondState) -> PrecondState:
    """``new``'s arrays copied into ``old``'s, which the step keeps (``capturable=True``).

    A replayed CUDA graph reads and writes the addresses its capture saw. A step that left a state
    array in a new tensor (the counters, which the compiled step returns; every entry of an eager
    step) would have every replay start from the capture-time input, which is freed once the state
    drops it and whose memory is then reused. The compiled step writes its larger entries in place
    already (nothing to copy); an eager step pays one copy of its state.
    """

    def keep(before: Any, after: Any) -> Any:
        if after is before or before is None or before.shape != after.shape or before.dtype != after.dtype:
            return after
        return before.copy_(after)

    groups = {
        key: {name: keep(old.groups.get(key, {}).get(name), value) for name, value in entries.items()}
        for key, entries in new.groups.items()
    }
    return PrecondState(keep(old.count, new.count), keep(old.nonfinite_count, new.nonfinite_count), groups)


class AGD(CoreOptimizer):
    """AGD (Yue et al., NeurIPS 2023) as a ``torch.optim.Optimizer``; see :func:`precond_ref.agd`.

    The arguments are the authors' (atorch ``AGD``), so this is a drop-in replacement for their
    class: ``weight_decouple=True`` is decoupled decay, ``fixed_decay=True`` with it is fixed decay,
    and ``weight_decouple=False`` is L2 decay added to the gradient (``fixed_decay`` then ignored).
    """

    core_factory = staticmethod(pr.agd)
    compile_by_default = True

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
        *,
        compile: CompileSetting = None,
        capturable: bool = False,
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
        super().__init__(params, defaults, compile=compile, capturable=capturable)

    def core_kwargs(self, group: dict) -> dict:
        if not group["weight_decouple"]:
            decay_mode = "l2"
        else:
            decay_mode = "fixed" if group["fixed_decay"] else "decoupled"
        b1, b2 = group["betas"]
        return dict(
            learning_rate=group["lr"],
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
        compile: CompileSetting = None,
        capturable: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, weight_decay=weight_decay, damping=damping, eps=eps,
            root_method=root_method, root_steps=root_steps, precondition_every=precondition_every,
            rms_target=rms_target, accumulator=accumulator, side=side, block_size=block_size,
            fallback_betas=fallback_betas, fallback_eps=fallback_eps,
            fallback_weight_decay=fallback_weight_decay, fallback_filter=fallback_filter,
            mode=mode, on_nonfinite=on_nonfinite,
        )
        super().__init__(params, defaults, model=model, compile=compile, capturable=capturable)

    def core_kwargs(self, group: dict) -> dict:
        b1, b2 = group["betas"]
        fb1, fb2 = group["fallback_betas"]
        return dict(
            learning_rate=group["lr"], b1=b1, b2=b2, weight_decay=group["weight_decay"],
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
    compile_by_default = True  # element-wise per column: compiled 1.3x Adam(foreach) on CPU, eager 17x

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
        compile: CompileSetting = None,
        capturable: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rms_target=rms_target, side=side,
            fallback_betas=fallback_betas, fallback_eps=fallback_eps,
            fallback_weight_decay=fallback_weight_decay, fallback_filter=fallback_filter,
            mode=mode, on_nonfinite=on_nonfinite,
        )
        super().__init__(params, defaults, model=model, compile=compile, capturable=capturable)

    def core_kwargs(self, group: dict) -> dict:
        b1, b2 = group["betas"]
        fb1, fb2 = group["fallback_betas"]
        return dict(
            learning_rate=group["lr"], b1=b1, b2=b2, eps=group["eps"],
            weight_decay=group["weight_decay"], rms_target=group["rms_target"], side=group["side"],
            fallback_mask=_FallbackByName(group["fallback_filter"]), fallback_b1=fb1, fallback_b2=fb2,
            fallback_eps=group["fallback_eps"], fallback_weight_decay=group["fallback_weight_decay"],
            mode=group["mode"], on_nonfinite=group["on_nonfinite"],
        )


class _BatchCounter:
    """SIRFShampoo's batch-size detection: a forward pre-hook on the model adds the leading size of
    the first tensor argument, positional or keyword (``model(x)``, ``model(input_ids=ids)`` as the
    transformers ``Trainer`` calls models), for every forward pass in training mode since the last
    optimizer step (so gradient accumulation over several forwards counts every example of the
    accumulated mean).

    ``copy.deepcopy`` of the optimizer alone hooks the copy onto the same model. Copied or pickled
    together with the model (``deepcopy({"model": m, "opt": o})``), the model's copy carries the
    hook of the optimizer's copy. An optimizer pickled without its model counts nothing: give
    ``batch_size`` to ``step``.
    """

    def __init__(self, model: Optional[torch.nn.Module]) -> None:
        self.count = 0
        self._model = weakref.ref(model) if model is not None else None
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True) if model is not None else None

    def __deepcopy__(self, memo: dict) -> "_BatchCounter":
        model = self._model() if self._model is not None else None
        if model is not None and id(model) in memo:
            # The model is being copied too; its copied hook dict will call this copy's _hook.
            new = _BatchCounter(None)
            new._model = weakref.ref(memo[id(model)])
        else:
            new = _BatchCounter(model)
        new.count = self.count
        return new

    def __reduce__(self) -> tuple:
        return (_BatchCounter, (None,))

    def _hook(self, module: torch.nn.Module, inputs: tuple, kwargs: Optional[dict] = None) -> None:
        if not module.training:
            return
        first = next(
            (x for x in itertools.chain(inputs, (kwargs or {}).values()) if isinstance(x, torch.Tensor)), None
        )
        if first is not None and first.ndim > 0:
            self.count += int(first.shape[0])


class _RootFreeOptimizer(CoreOptimizer):
    """Shared batch-size handling of the root-free methods.

    B (the number of examples the loss *averages*; a summed loss makes B·g² wrong by B²) comes from,
    in this order: ``step(batch_size=...)``; the constructor's ``batch_size``; or, when ``model=``
    is given without ``batch_size``, the examples its training-mode forward passes saw since the
    last ``step`` (the authors' hook). Without any of them ``step`` raises ``ValueError``.
    """

    def __init__(self, params: Any, defaults: dict, *, model: Optional[torch.nn.Module] = None, **options: Any) -> None:
        _torch_state.check_tensor_lr(defaults.get("lr"))
        if params is None:
            if model is None:
                raise ValueError("give params, or model= to optimize all of its parameters")
            params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        super().__init__(params, defaults, model=model, **options)
        self._batch_counter = _BatchCounter(model) if model is not None and defaults["batch_size"] is None else None

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None, **extra: Any) -> Any:
        if torch.compiler.is_compiling():
            return _step_outside_the_graph(self, closure, extra)
        counter = self._batch_counter
        if closure is not None and counter is not None:
            # the closure's forward passes belong to this step
            with torch.enable_grad():
                loss = closure()
            return self._counted_step(lambda: loss, extra)
        return self._counted_step(closure, extra)

    def _counted_step(self, closure: Optional[Callable[[], Any]], extra: dict) -> Any:
        counter = self._batch_counter
        if counter is not None and extra.get("batch_size") is None and counter.count > 0:
            extra = {**extra, "batch_size": counter.count}
        try:
            return super().step(closure, **extra)
        finally:
            if counter is not None:
                counter.count = 0


class RFRMSProp(_RootFreeOptimizer):
    """RF-RMSProp (Lin et al., ICML 2024) as a ``torch.optim.Optimizer``; see :func:`precond_ref.rf_rmsprop`.

    ``alpha`` is the EMA decay (core ``b2``), as in ``torch.optim.RMSprop`` and the authors'
    ``MyRmsProp``. The learning rate is on SGD's scale (the statistic starts at 1).
    ``batch_size``: the number of examples the loss **averages** over (not summed); or pass
    ``model=`` to count it from the model's training forward passes, or ``step(batch_size=...)``.
    """

    core_factory = staticmethod(pr.rf_rmsprop)
    compile_by_default = True

    def __init__(
        self,
        params: Any,
        lr: float = 1e-2,
        alpha: float = 0.999,
        damping: float = 1e-4,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        batch_size: Optional[int] = None,
        model: Optional[torch.nn.Module] = None,
        initial_scale: float = 1.0,
        scale_by_batch_size: bool = True,
        state_dtype: Optional[torch.dtype] = None,
        mode: str = "principled",
        on_nonfinite: str = "skip",
        *,
        compile: CompileSetting = None,
        capturable: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, alpha=alpha, damping=damping, momentum=momentum, weight_decay=weight_decay,
            batch_size=batch_size, initial_scale=initial_scale, scale_by_batch_size=scale_by_batch_size,
            state_dtype=state_dtype, mode=mode, on_nonfinite=on_nonfinite,
        )
        super().__init__(params, defaults, model=model, compile=compile, capturable=capturable)

    def core_kwargs(self, group: dict) -> dict:
        return dict(
            learning_rate=group["lr"], b2=group["alpha"], damping=group["damping"],
            momentum=group["momentum"], weight_decay=group["weight_decay"], batch_size=group["batch_size"],
            initial_scale=group["initial_scale"], scale_by_batch_size=group["scale_by_batch_size"],
            state_dtype=group["state_dtype"], mode=group["mode"], on_nonfinite=group["on_nonfinite"],
        )


class RFAdamW(_RootFreeOptimizer):
    """RF-AdamW — an extra, **not in the paper** (added to the authors' repository afterwards);
    see :func:`precond_ref.rf_adamw`. Batch size as in :class:`RFRMSProp`."""

    core_factory = staticmethod(pr.rf_adamw)
    compile_by_default = True

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        damping: float = 1e-4,
        weight_decay: float = 0.0,
        batch_size: Optional[int] = None,
        model: Optional[torch.nn.Module] = None,
        bias_correction: bool = False,
        initial_scale: float = 1.0,
        scale_by_batch_size: bool = True,
        state_dtype: Optional[torch.dtype] = None,
        mode: str = "principled",
        on_nonfinite: str = "skip",
        *,
        compile: CompileSetting = None,
        capturable: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, damping=damping, weight_decay=weight_decay, batch_size=batch_size,
            bias_correction=bias_correction, initial_scale=initial_scale,
            scale_by_batch_size=scale_by_batch_size, state_dtype=state_dtype, mode=mode,
            on_nonfinite=on_nonfinite,
        )
        super().__init__(params, defaults, model=model, compile=compile, capturable=capturable)

    def core_kwargs(self, group: dict) -> dict:
        b1, b2 = group["betas"]
        return dict(
            learning_rate=group["lr"], b1=b1, b2=b2, damping=group["damping"],
            weight_decay=group["weight_decay"], batch_size=group["batch_size"],
            bias_correction=group["bias_correction"], initial_scale=group["initial_scale"],
            scale_by_batch_size=group["scale_by_batch_size"], state_dtype=group["state_dtype"],
            mode=group["mode"], on_nonfinite=group["on_nonfinite"],
        )


class IFShampoo(_RootFreeOptimizer):
    """IF-Shampoo (Lin et al., ICML 2024; SIRFShampoo) as a ``torch.optim.Optimizer``; see
    :func:`precond_ref.if_shampoo`. Matrix products only, so ``factor_dtype=torch.bfloat16`` works.

    ``batch_size``: the number of examples the loss **averages** over (not summed); or pass
    ``model=`` (SIRFShampoo's default) to count it from the model's training forward passes, or
    ``step(batch_size=...)``. ``grouping="weight_bias"`` needs parameter names: pass
    ``model.named_parameters()`` or ``model=``; a weight or bias without a gradient then takes part
    in its pair's step with a zero gradient and is left unchanged (as in :class:`MBF`).
    """

    core_factory = staticmethod(pr.if_shampoo)

    def __init__(
        self,
        params: Any = None,
        lr: float = 1e-3,
        momentum: float = 0.9,
        preconditioner_lr: float = 0.01,
        preconditioner_momentum: float = 0.5,
        damping: float = 1e-3,
        weight_decay: float = 0.0,
        batch_size: Optional[int] = None,
        model: Optional[torch.nn.Module] = None,
        precondition_every: Any = None,
        structures: Any = "dense",
        max_dense_dim: Optional[int] = None,
        factor_dtype: Any = None,
        grouping: str = "per_parameter",
        preconditioner_lr_scale: Optional[Callable] = None,
        kl_clip: Optional[float] = None,
        mode: str = "principled",
        on_nonfinite: str = "skip",
        *,
        compile: CompileSetting = None,
        capturable: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, preconditioner_lr=preconditioner_lr,
            preconditioner_momentum=preconditioner_momentum, damping=damping, weight_decay=weight_decay,
            batch_size=batch_size, precondition_every=precondition_every, structures=structures,
            max_dense_dim=max_dense_dim, factor_dtype=factor_dtype, grouping=grouping,
            preconditioner_lr_scale=preconditioner_lr_scale, kl_clip=kl_clip, mode=mode,
            on_nonfinite=on_nonfinite,
        )
        super().__init__(params, defaults, model=model, compile=compile, capturable=capturable)

    def core_kwargs(self, group: dict) -> dict:
        return dict(
            learning_rate=group["lr"], momentum=group["momentum"],
            preconditioner_lr=_float(group["preconditioner_lr"]),
            preconditioner_momentum=group["preconditioner_momentum"], damping=group["damping"],
            weight_decay=group["weight_decay"], batch_size=group["batch_size"],
            precondition_every=group["precondition_every"], structures=group["structures"],
            max_dense_dim=group["max_dense_dim"], factor_dtype=group["factor_dtype"],
            grouping=group["grouping"], preconditioner_lr_scale=group["preconditioner_lr_scale"],
            kl_clip=group["kl_clip"], mode=group["mode"], on_nonfinite=group["on_nonfinite"],
        )


def _float(value: Any) -> Any:
    """A learning rate stored as a tensor by some schedulers becomes a Python float."""
    return float(value) if isinstance(value, torch.Tensor) else value


# --------------------------------------------------------------------------------------------
# MBF


def _inputs_first_weights(names: dict, model: Optional[torch.nn.Module]) -> frozenset:
    """The 2-D weights with a sibling bias that store inputs x outputs (``x @ W + b``, as
    transformers' GPT-2 ``Conv1D``) rather than torch's outputs x inputs (``nn.Linear``).

    Decided per weight: by its module when ``model=`` shows it (an ``nn.Linear`` is outputs-first;
    a module named ``Conv1D`` inputs-first), else by which axis has the bias's length. A square
    weight whose module is not known to be either is ambiguous: taken as outputs-first, with a
    warning when the model is known to hold inputs-first weights (a module of another kind, or
    some other weight inputs-first by its shape), naming the weights.
    """
    modules = {}
    if model is not None:
        for module in model.modules():
            for p in module.parameters(recurse=False):
                modules.setdefault(p, module)
    by_name = {name: p for p, name in names.items()}
    found, square = set(), []
    for p, name in names.items():
        prefix, _, leaf = name.rpartition(".")
        bias = by_name.get(f"{prefix}.bias" if prefix else "bias")
        if leaf != "weight" or p.ndim != 2 or bias is None or bias.ndim != 1:
            continue
        rows, cols, size = p.shape[0], p.shape[1], bias.shape[0]
        module = modules.get(p)
        if isinstance(module, torch.nn.Linear):
            continue
        if module is not None and type(module).__name__ == "Conv1D" and cols == size:
            found.add(p)
        elif cols == size and rows != size:
            found.add(p)
        elif rows == size == cols:
            square.append((name, module))
    unknown_kind = [n for n, m in square if m is not None] or ([n for n, _ in square] if found else [])
    if unknown_kind:
        warnings.warn(
            f"MBF: cannot tell whether the square weight(s) {sorted(unknown_kind)} store outputs x inputs "
            "(torch.nn.Linear) or inputs x outputs (x @ W + b, as transformers' Conv1D); they are paired with "
            "their biases as outputs x inputs" + ("" if model is not None else "; pass model= to let MBF see the modules"),
            stacklevel=3,
        )
    return frozenset(found)


class MBF(CoreOptimizer):
    """MBF, mini-block Fisher (Bahamou, Goldfarb, Ren, AISTATS 2023); see :func:`precond_ref.mbf`.

    Pass ``model.named_parameters()`` (or plain parameters with ``model=``) so that each Linear's
    ``weight`` is paired with its ``bias`` (the bias becomes the homogeneous column of the layer's
    block); conv weights are recognised by their shape (ndim >= 3), everything 1-D (conv biases,
    norm scales and shifts) uses the authors' diagonal rule. With unnamed parameters every 2-D
    weight is a layer without a bias column (a warning says so).

    When only one of a paired weight and bias has a gradient, the other takes part in the step
    with a zero gradient (the pair is one block) and is left unchanged; its ``"step"`` is not
    advanced on that step. The pair shares one block state and one step count, so at the next
    step where both have gradients the partner's ``"step"`` is set to the pair's count again
    (the rule of :func:`precond_ref.transform.missing_members`, shared with IF-Shampoo).

    :meth:`warm_start` initialises the block statistics before training (spec ``mbf.md`` 2.5).
    ``lr`` defaults to the core's 1e-5 (the authors' values range from 1e-5 to 3e-5 with damping
    3e-4 to 3e-3; ``lr/damping`` is the effective heavy-ball rate, 1e-2 at the defaults).
    """

    core_factory = staticmethod(pr.mbf)

    def __init__(
        self,
        params: Iterable[Any],
        lr: Any = 1e-5,
        damping: float = 1e-3,
        momentum: float = 0.9,
        beta2: float = 0.9,
        weight_decay: float = 0.0,
        statistics_every: int = 10,
        precondition_every: int = 100,
        fc_blocks: Optional[str] = None,
        diagonal_beta2: float = 0.999,
        diagonal_eps: float = 1e-8,
        diagonal_second_moment: str = "momentum",
        max_block_dim: Optional[int] = None,
        model: Optional[torch.nn.Module] = None,
        kl_clip: Optional[float] = None,
        mode: str = "principled",
        on_nonfinite: str = "skip",
        *,
        compile: CompileSetting = None,
        capturable: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            damping=damping,
            momentum=momentum,
            beta2=beta2,
            weight_decay=weight_decay,
            statistics_every=statistics_every,
            precondition_every=precondition_every,
            fc_blocks=fc_blocks,
            diagonal_beta2=diagonal_beta2,
            diagonal_eps=diagonal_eps,
            diagonal_second_moment=diagonal_second_moment,
            max_block_dim=max_block_dim,
            kl_clip=kl_clip,
            mode=mode,
            on_nonfinite=on_nonfinite,
        )
        super().__init__(params, defaults, model=model, compile=compile, capturable=capturable)
        self._inputs_first = _inputs_first_weights(self._param_names, model)
        unnamed = sum(1 for g in self.param_groups for p in g["params"] if self._param_names.get(p) is None)
        if unnamed:
            warnings.warn(
                f"MBF: {unnamed} parameter(s) have no names, so Linear weights cannot be paired with "
                "their biases (each 2-D weight is a layer without a bias column, each 1-D tensor uses "
                "the diagonal rule); pass model.named_parameters() or model=",
                stacklevel=2,
            )

    def core_kwargs(self, group: dict) -> dict:
        return dict(
            learning_rate=group["lr"],
            damping=group["damping"],
            momentum=group["momentum"],
            b2=group["beta2"],
            weight_decay=group["weight_decay"],
            statistics_every=group["statistics_every"],
            precondition_every=group["precondition_every"],
            fc_blocks=group["fc_blocks"],
            diagonal_b2=group["diagonal_beta2"],
            diagonal_eps=group["diagonal_eps"],
            diagonal_second_moment=group["diagonal_second_moment"],
            max_block_dim=group["max_block_dim"],
            kl_clip=group["kl_clip"],
            mode=group["mode"],
            on_nonfinite=group["on_nonfinite"],
        )

    def warm_start(self, source: Any, num_batches: Optional[int] = None) -> None:
        """Initialise every block statistic F with the mean of per-batch block statistics.

        Call once before the first :meth:`step`, at the initial parameters (spec ``mbf.md`` 2.5).

        Parameters
        ----------
        source:
            Either an iterable of gradient dicts (keys: parameter names or the parameter tensors;
            values: gradients computed with labels sampled from the model's predictive
            distribution; a missing entry counts as zero), or a callable that runs one
            forward/backward pass with sampled labels, e.g.
            ``lambda: F.cross_entropy(logits := model(x), torch.multinomial(logits.softmax(-1), 1)[:, 0]).backward()``
            with ``x`` the next mini-batch; it is called ``num_batches`` times, the gradients are
            zeroed before each call and left as ``None`` afterwards.
        num_batches:
            Number of calls of a callable ``source`` (required then, not allowed otherwise).
        """
        if any(self.state[p] for group in self.param_groups for p in group["params"]):
            raise RuntimeError("MBF.warm_start must be called before the first step")
        if callable(source):
            if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
                raise ValueError(f"num_batches must be an integer >= 1 with a callable source, got {num_batches!r}")
            stream = self._run_batches(source, num_batches)
        else:
            if num_batches is not None:
                raise ValueError("num_batches is only used with a callable source")
            stream = (self._by_tensor(batch) for batch in source)
        # One pass over the source; several param groups share it (itertools.tee buffers).
        streams = itertools.tee(stream, len(self.param_groups))
        for group, paths, batches in zip(self.param_groups, self._group_paths(), streams):
            tensors = group["params"]
            transform = self._transform(group)
            state = transform.init(self._tree(paths, [p.detach() for p in tensors]))
            trees = (
                self._tree(paths, [g.get(p, None) if g.get(p, None) is not None else torch.zeros_like(p) for p in tensors])
                for g in batches
            )
            state = transform.warm_start(state, trees)
            by_key = {path_str(path): p for path, p in zip(paths, tensors)}
            for p in tensors:
                # calls = 0: the first step is the core's call 0 (its interval decisions included);
                # it loads this state (the heads are marked) instead of initialising a fresh one.
                self.state[p] = {_STEP: state.count, _NONFINITE: state.nonfinite_count, _CALLS: 0}
            for key, entries in state.groups.items():
                head = self.state[by_key[key]]
                head[_HEAD] = True
                head.update(entries)

    def _run_batches(self, source: Callable[[], Any], num_batches: int):
        params = [p for group in self.param_groups for p in group["params"]]
        try:
            for _ in range(num_batches):
                for p in params:
                    p.grad = None
                with torch.enable_grad():
                    source()
                yield {p: p.grad.detach().clone() for p in params if p.grad is not None}
        finally:
            for p in params:
                p.grad = None

    def _by_tensor(self, batch: dict) -> dict:
        by_name = {name: p for p, name in self._param_names.items()}
        out = {}
        for key, grad in batch.items():
            if isinstance(key, str):
                if key not in by_name:
                    raise KeyError(f"MBF.warm_start: no parameter named {key!r}")
                key = by_name[key]
            out[key] = grad
        return out


# --------------------------------------------------------------------------------------------
# Sketchy / S-AdaGrad


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
        decomposition: Optional[str] = None,
        mode: str = "principled",
        momentum_ema: bool = False,
        tail_decay: Optional[str] = None,
        on_nonfinite: str = "skip",
        *,
        compile: CompileSetting = None,
        capturable: bool = False,
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
        super().__init__(params, defaults, compile=compile, capturable=capturable)

    def core_kwargs(self, group: dict) -> dict:
        return dict(
            learning_rate=group["lr"], rank=group["rank"], b2=group["beta2"],
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
        *,
        compile: CompileSetting = None,
        capturable: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, rank=rank, delta=delta, eps=eps, beta2=beta2, momentum=momentum,
            weight_decay=weight_decay, block_size=block_size, mode=mode, on_nonfinite=on_nonfinite,
        )
        super().__init__(params, defaults, compile=compile, capturable=capturable)

    def core_kwargs(self, group: dict) -> dict:
        return dict(
            learning_rate=group["lr"], rank=group["rank"], delta=group["delta"],
            eps=group["eps"], b2=group["beta2"], momentum=group["momentum"],
            weight_decay=group["weight_decay"], block_size=group["block_size"], mode=group["mode"],
            on_nonfinite=group["on_nonfinite"],
        )
