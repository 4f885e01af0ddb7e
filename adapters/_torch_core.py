"""The torch adapter's base class: a ``torch.optim.Optimizer`` that runs a core transform.

:class:`CoreOptimizer` holds the step (grouping parameters into trees, the learning rate as a
tensor, compiled or eager core updates, block members without gradients) and defers the contracts
outside the step to :mod:`._torch_state` (names, copies, checkpoints) and compilation to
:mod:`._torch_compile`. The method classes (``precond_ref.adapters.torch``) are generated from a
table on top of it. Import order: ``_torch_state``, ``_torch_compile`` -> ``_torch_core`` ->
``torch``; nothing here imports upwards.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import operator
import warnings
from functools import partial
from typing import Any, Callable, NamedTuple, Optional

import torch

from precond_ref._backend import consecutive_runs, consecutive_view, float32_matmul_precision, namespace_of, owned_state
from precond_ref.engine.layout import unpaired_biases, weight_bias_groups
from precond_ref.engine.skip import first_bad_gradient, gradient_ok
from precond_ref.transform import PrecondState, Transform, missing_members
from precond_ref.tree import TreeDef, path_str, tree_flatten, tree_unflatten

from . import _torch_capture, _torch_compile, _torch_memory, _torch_state
from ._keywords import check_keywords
from ._torch_compile import CompileSetting
from ._torch_state import BOOKKEEPING as _BOOKKEEPING
from ._torch_state import CALLS as _CALLS
from ._torch_state import HEAD as _HEAD
from ._torch_state import NONFINITE as _NONFINITE
from ._torch_state import STEP as _STEP

__all__ = ["CoreOptimizer"]


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


def _maximizes(group: dict) -> bool:
    """A param group's ``maximize`` (torch.optim's; ``False`` in a group pickled before the classes
    took it): the step hands the core the negated gradients, as new tensors (``.grad`` is left as
    it is), so the core minimises the negated objective; weight decay still pulls the parameters
    towards zero, as in ``torch.optim.AdamW(maximize=True)``."""
    maximize = group.get("maximize", False)
    if not isinstance(maximize, bool):
        raise ValueError(f"maximize must be True or False, got {maximize!r}")
    return maximize


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

    ``step(closure=None, **extra)`` forwards ``extra`` (``batch_size=`` of the root-free classes) to
    the core update; another keyword raises ``TypeError``.

    **Speed.** A step reads no device value: the core's periodic work is scheduled from a host-side
    count of the calls each parameter took part in (``update(..., step=)``), the learning rate is
    a 0-D tensor on the parameters' device, and a non-finite step is skipped by element-wise
    selection. ``compile`` (default: the class's ``compile_by_default``; the environment variable
    ``PRECOND_REF_COMPILE=0`` or ``1`` overrides the default; a class that compiles by default
    compiles a param group of at least ``_torch_compile.AUTO_MIN_ELEMENTS`` elements from its first
    step and steps a smaller one eagerly throughout, where the seconds of compilation would be
    repaid only by a long run) runs each param group's core update
    and the in-place parameter update under ``torch.compile(fullgraph=True)``, which fuses the
    element-wise work into a few kernels; a dict is passed to ``torch.compile`` as options. If
    compilation fails the optimizer warns once and runs the same core eagerly. Compiled and eager
    steps agree to float32 rounding and share checkpoints. ``capturable=True`` (as in
    ``torch.optim``) allows capturing ``step`` in a CUDA graph: CUDA parameters only, and a method
    step without periodic work; give ``lr`` as a tensor to schedule it under replay. The first step
    makes the state (capture after warm-up steps); every later one writes each state tensor in place.
    ``capture`` (default ``None``: on for CUDA parameters where the class's step can be captured;
    ``PRECOND_REF_CAPTURE=0`` or ``1`` overrides the default) makes the optimizer capture each
    pattern of its periodic work once as a CUDA graph and replay it (:mod:`._torch_capture`: what
    a graph holds, what captures again, what falls back).
    """

    core_factory: Callable[..., Transform]
    #: Weights stored inputs x outputs (set by MBF; see ``_torch_state.param_path``).
    _inputs_first: frozenset = frozenset()
    #: Whether ``compile=None`` compiles (set per class from the benchmark: where it is faster).
    compile_by_default: bool = False
    #: Why a step of this class (or, as a property, of this instance's settings) cannot be
    #: captured in a CUDA graph (an operation of the step reads the device on the host), or None;
    #: a step taken during capture raises it.
    not_capturable_because: Optional[str] = None
    #: The constructor's ``capture`` as :func:`._torch_capture.capture_setting` resolved it (the
    #: class's value serves an optimizer unpickled from a version without it).
    _capture: Optional[bool] = None
    #: Set by ``load_state_dict``: the next step keeps the state it hands back (each entry a view of
    #: its stack, :func:`precond_ref._backend.joined`) instead of writing it into the loaded tensors,
    #: which are separate allocations that every later join would copy.
    _restack: bool = False
    # Attributes rebuilt on first use instead of being copied or pickled (see ``_torch_state``).
    _transient_attributes: tuple[str, ...] = (
        "_transforms", "_compiled", "_kernels", "_learning_rates", "_member_plans", "_captures", "_changed_at",
        "_fitted", "_layouts",
    )
    #: ``step`` calls taken (the clock of :meth:`_scheduled`).
    _step_calls: int = 0
    #: Whether the notice of :meth:`_scheduled` was given.
    _told_scheduled: bool = False
    #: True while ``__init__`` adds the param groups: the check across groups then runs once, after them.
    _building: bool = False

    def __init__(
        self,
        params: Any,
        defaults: dict,
        *,
        model: Optional[torch.nn.Module] = None,
        compile: CompileSetting = None,
        capture: Optional[bool] = None,
        capturable: bool = False,
    ):
        _torch_state.check_tensor_lr(defaults.get("lr"))
        groups = _torch_state.param_groups_from(params)
        if not isinstance(capturable, bool):
            raise ValueError(f"capturable must be True or False, got {capturable!r}")
        self._compile_options = _torch_compile.compile_options(compile, self.compile_by_default)
        self._capturable = capturable
        self._capture = _torch_capture.capture_setting(capture, capturable, type(self).__name__)
        self._captures: Any = {}  # made on first use (_torch_capture.book)
        self._model_names = {p: n for n, p in model.named_parameters()} if model is not None else {}
        self._param_names: dict[torch.Tensor, str] = dict(self._model_names)
        self._transforms: dict[int, tuple[tuple, Transform, tuple]] = {}
        self._compiled: dict[int, _torch_compile.CompiledStep] = {}
        # The compiled per-leaf kernels of an element-wise rule (_torch_compile.KernelWrites): one
        # compilation per rule, dtype and option set, shared by the param groups and the compiled
        # steps rebuilt with new hyperparameters, and gone with the optimizer.
        self._kernels: dict = {}
        self._learning_rates: dict[int, tuple[Any, torch.Tensor]] = {}
        # A group's last two step calls at which a hyperparameter other than lr changed, and the
        # core names of those that changed last.
        self._changed_at: dict[int, tuple[Optional[int], int, tuple[str, ...]]] = {}
        self._member_plans: dict[tuple, _Members] = {}
        # Each group's core transform whose state layout its parameters' state was found to fit
        # (:meth:`_check_state_fits`), with the key of the hyperparameters it was built from.
        self._fitted: dict[int, tuple[Transform, tuple]] = {}
        # Each group's parameters' (dtype, shape) when their state was last made, loaded or found
        # to fit (:func:`_layout`): a parameter changed in place since (``module.double()``, a new
        # ``.data``) is refused before any group steps.
        self._layouts: dict[int, list] = {}
        # Members of a block whose counters a step left behind their partners' (no gradient of
        # their own; see _fill_missing_members): never the source of a core group's counters.
        self._behind: set = set()
        self._building = True
        super().__init__(groups, defaults)
        del self._building
        self._warn_layers_split_over_groups(last_only=False)
        # Sharded (DTensor) parameters need the classes of precond_ref.adapters.torch_distributed.
        if not getattr(self, "_accepts_dtensor", False):
            for p in (p for group in self.param_groups for p in group["params"]):
                if hasattr(p, "device_mesh") and hasattr(p, "placements"):
                    raise TypeError(
                        f"{type(self).__name__}: parameter {self._param_names.get(p, '?')!r} is a DTensor (FSDP2 or "
                        f"tensor parallel); use precond_ref.adapters.torch_distributed.{type(self).__name__}"
                    )
        _torch_memory.check_state_fits(self)  # a state that cannot fit is refused now, not at the first step

    def core_kwargs(self, group: dict) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def add_param_group(self, param_group: dict) -> None:
        if isinstance(param_group, dict):
            _torch_state.check_tensor_lr(param_group.get("lr"))
        super().add_param_group(param_group)  # torch's checks, then appends the group
        group, names = self.param_groups[-1], self._param_names
        try:
            self._param_names = _torch_state.names_from_groups([group], names)
            members = {id(p) for p in group["params"]}
            self._param_names.update((p, n) for p, n in self._model_names.items() if id(p) in members)
            self._transform(group)  # builds the core transform: refuses invalid hyperparameters
            self._check_names(group)
            self._warn_unpaired_biases(group)
            if not self._building:
                self._warn_layers_split_over_groups(last_only=True)
        except Exception as error:
            # A refused group leaves the optimizer as it was: a group left in param_groups would
            # make every later step raise, and its parameters could not be added again.
            self.param_groups.pop()
            self._param_names = names
            self._transforms.pop(id(group), None)
            if type(error) in (ValueError, TypeError) and not str(error).startswith(f"{type(self).__name__}: "):
                raise type(error)(f"{type(self).__name__}: {error}") from error
            raise
        self._drop_graphs()

    def _check_names(self, group: dict) -> None:
        """``ValueError`` where two parameters of ``group`` (the last param group) share a name, or
        one's name is a prefix of another's: a group's parameters form one tree keyed by their
        names, which the step could not make. Refused here rather than at the step, where the
        groups before it would have stepped; torch itself takes any names (the ``named_parameters()``
        of two models given together)."""
        first = sum(len(g["params"]) for g in self.param_groups[:-1])
        try:
            self._tree([self._path(p, first + k) for k, p in enumerate(group["params"])], group["params"])
        except ValueError as error:
            raise ValueError(
                f"{error} in param group {len(self.param_groups) - 1}: the parameters of a param group need names of "
                "their own (the named_parameters() of two models? prefix their names, [(f'enc.{name}', p) for name, "
                "p in enc.named_parameters()], or give each model a param group of its own)"
            ) from None

    def _warn_unpaired_biases(self, group: dict) -> None:
        """A warning for each layer of ``group`` (the last param group) whose bias a method that pairs a
        weight with its bias (MBF, IF-Shampoo's ``grouping="weight_bias"``) leaves as a block of its
        own because the layer's weight is kept as several tensors by a parametrization (``weight_norm``'s
        ``original0``/``original1``, the hook-based ``weight_g``/``weight_v``;
        :func:`precond_ref.engine.layout.unpaired_biases`): the same model without the parametrization
        would have its layer block ``[W | b]``."""
        if CoreOptimizer._transform(self, group).group_leaves is not weight_bias_groups:
            return
        first = sum(len(g["params"]) for g in self.param_groups[:-1])
        paths = [self._path(p, first + k) for k, p in enumerate(group["params"])]
        for layer, members in unpaired_biases(paths, group["params"]):
            name = ".".join(map(str, layer))
            warnings.warn(
                f"{type(self).__name__}: the weight of layer {name!r} is kept as "
                f"{', '.join(repr('.'.join(map(str, m))) for m in members)} by a parametrization (as weight_norm "
                f"does), none of them the weight itself, so its bias {name + '.bias'!r} is not paired with it: the "
                "bias and each of those tensors are blocks of their own, not the layer block [W | b] of the same "
                "model without the parametrization (a single-tensor parametrization, as spectral_norm or "
                "orthogonal, is paired)",
                stacklevel=_torch_capture._caller_level(),
            )

    def _warn_layers_split_over_groups(self, last_only: bool) -> None:
        """A warning for each layer whose weight and bias lie in different param groups (one of them
        the last, with ``last_only``), where the weight's group pairs a weight with its bias (MBF,
        IF-Shampoo's ``grouping="weight_bias"``): a param group is stepped as one tree, so the two
        are then blocks of their own, not the layer block ``[W | b]`` that the same parameters in one
        group make (the weight-decay recipe that gives every bias a group of its own does this)."""
        pairs = [CoreOptimizer._transform(self, g).group_leaves is weight_bias_groups for g in self.param_groups]
        if len(pairs) < 2 or not any(pairs):
            return
        group_paths = self._group_paths()
        owner = [n for n, paths in enumerate(group_paths) for _ in paths]
        leaves = [p for g in self.param_groups for p in g["params"]]
        last = len(self.param_groups) - 1
        for block in weight_bias_groups([path for paths in group_paths for path in paths], leaves):
            if len(block.indices) != 2:
                continue
            weight, bias = block.indices
            if owner[weight] == owner[bias] or not pairs[owner[weight]] or (last_only and last not in (owner[weight], owner[bias])):
                continue
            warnings.warn(
                f"{type(self).__name__}: the weight {self._param_names[leaves[weight]]!r} (param group {owner[weight]}) "
                f"and the bias {self._param_names[leaves[bias]]!r} (param group {owner[bias]}) of one layer are in "
                "different param groups, so they are stepped as blocks of their own, not as the layer block [W | b] "
                "that they make in one param group; put them in one param group (a hyperparameter such as "
                "weight_decay applies to the whole group)",
                stacklevel=_torch_capture._caller_level(),
            )

    def __getstate__(self) -> dict:
        return _torch_state.getstate(self)

    def __setstate__(self, state: dict) -> None:
        _torch_state.setstate(self, state)
        # A copy's, or a loaded checkpoint's, state fits the parameters as they are now
        # (load_state_dict validated it against them).
        self._layouts = {id(group): _layout(group["params"]) for group in self.param_groups}

    def state_dict(self) -> dict:
        """torch's ``state_dict`` (with ``param_names`` when the parameters were named), without
        callable hyperparameters: they are configuration, kept by the optimizer that loads it. The
        state of a block whose first member does not require grad is held by a member that does
        (:func:`._torch_state.heads_on_trainable_members`)."""
        state_dict = _torch_state.strip_callables(super().state_dict())
        return _torch_state.heads_on_trainable_members(state_dict, self._blocks_with_frozen_members())

    def _blocks_with_frozen_members(self) -> list:
        """The blocks (a weight paired with its bias) with a member that requires grad and one that
        does not, each as ``(state_dict index, requires_grad)`` of its members, the block's first
        member (which holds its state) first; none, without a look at the blocks, where every
        parameter requires grad."""
        if all(p.requires_grad for group in self.param_groups for p in group["params"]):
            return []
        blocks, index = [], 0
        for group, paths in zip(self.param_groups, self._group_paths()):
            tensors = group["params"]
            for block in CoreOptimizer._transform(self, group).group_leaves(paths, tensors):
                trains = [tensors[i].requires_grad for i in block.indices]
                if any(trains) and not all(trains):
                    blocks.append([(index + i, t) for i, t in zip(block.indices, trains)])
            index += len(tensors)
        return blocks

    def load_state_dict(self, state_dict: dict) -> None:
        """Validate, then load (atomically: a rejected checkpoint changes nothing); see
        :func:`precond_ref.adapters._torch_state.load_state_dict`."""
        with _torch_state.torch_names_in_errors(self._torch_names_by_path):
            _torch_state.load_state_dict(self, state_dict, self._build)
        self._drop_graphs()
        self._restack = True

    def _drop_graphs(self) -> None:
        """Forget the captured steps (their state tensors or param groups are gone)."""
        captures = getattr(self, "_captures", None)
        if isinstance(captures, _torch_capture.Captures):
            captures.clear()

    def _build(self, group: dict, **overrides: Any) -> Transform:
        """The core transform of ``group``'s hyperparameters; errors name the torch arguments."""
        _maximizes(group)
        return _torch_state.build_transform(type(self).core_factory, self.core_kwargs, group, **overrides)

    def _transform(self, group: dict) -> Transform:
        """The group's core transform, rebuilt when a hyperparameter other than ``lr`` changes.

        The learning rate enters as the group's tensor (:meth:`_learning_rate`), so a scheduler
        changes a value the compiled kernels read, not the transform.
        """
        cached = self._transforms.get(id(group))
        if cached is not None and _unchanged(group, cached[2]):
            return cached[1]  # the step's common case, without the key's reprs
        with self._refusals_named(group):  # a value written into the group after construction
            kwargs = self.core_kwargs(group)
            key = tuple(sorted((k, "<lr tensor>" if k == "learning_rate" else repr(v)) for k, v in kwargs.items()))
            if cached is None or cached[0] != key:
                self._build(group)  # validates the group's own values, torch names in errors
        if cached is None or cached[0] != key:
            if cached is not None:
                names = tuple(k for (k, v), (_, w) in zip(cached[0], key) if v != w) if len(cached[0]) == len(key) else ()
                last = self._changed_at.get(id(group), (None, None, ()))[1]
                self._changed_at[id(group)] = (last, self._step_calls, names)
            cached = (key, self._build(group, learning_rate=partial(_read, self._learning_rate(group))))
        self._transforms[id(group)] = (*cached[:2], _hyperparameters(group))
        return cached[1]

    @contextlib.contextmanager
    def _refusals_named(self, group: dict) -> Any:
        """A ``ValueError`` or ``TypeError`` refusing ``group``'s hyperparameters names the class and
        the param group: a step refuses a value written into a group after construction (by a
        scheduler, such as ``OneCycleLR``'s momentum, or by hand), in a loop that may hold several
        optimizers."""
        try:
            yield
        except (ValueError, TypeError) as error:
            if type(error) not in (ValueError, TypeError):
                raise
            index = next((i for i, g in enumerate(self.param_groups) if g is group), None)
            cls = type(self).__name__
            message = str(error).removeprefix(f"{cls}: ")
            raise type(error)(f"{cls}: {message} (param group {index})") from error

    def _learning_rate(self, group: dict) -> torch.Tensor:
        """The group's learning rate as a 1-element tensor on its parameters' device, set from ``lr``;
        the transform reads it as a 0-D view (:func:`_read`).

        A Python number is written only when it changed (a fill, no host-to-device copy); a tensor
        ``lr`` is copied on the device (so a captured step reads the scheduler's tensor).
        """
        lr = group["lr"]
        cached = self._learning_rates.get(id(group))
        if cached is None:
            device = group["params"][0].device if group["params"] else torch.device("cpu")
            dtype = torch.float32 if device.type == "mps" else torch.float64
            cached = (None, torch.zeros(1, dtype=dtype, device=device))
        value, tensor = cached
        if isinstance(lr, torch.Tensor):
            tensor.copy_(lr.detach().reshape(1))
            value = None
        elif lr != value:
            _torch_state.check_learning_rate(type(self).__name__, lr)
            tensor.fill_(lr)
            value = lr
        self._learning_rates[id(group)] = (value, tensor)
        return tensor

    def _torch_names_by_path(self) -> dict[str, str]:
        """core path string -> torch name (``"0/weight"`` -> ``"0.weight"``) of each named parameter
        whose two differ: what turns the core's names in its errors into torch's."""
        out, index = {}, 0
        for group in self.param_groups:
            for p in group["params"]:
                name = self._param_names.get(p)
                if name:
                    key = path_str(self._path(p, index))
                    if key != name:
                        out[key] = name
                index += 1
        return out

    def _path(self, p: torch.Tensor, index: int) -> tuple:
        """``p``'s core path under the optimizer's names (:func:`._torch_state.param_path`)."""
        return _torch_state.param_path(self._param_names, self._inputs_first, p, index)

    #: The nested tree of leaves at their paths (:func:`._torch_state.nest`).
    _tree = staticmethod(_torch_state.nest)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None, **extra: Any) -> Any:
        if extra:
            self._check_step_keywords(extra)
        if torch.compiler.is_compiling():
            return step_outside_the_graph(self, closure, extra)
        # The class attribute first (None for most classes: no capture query on their steps), then
        # whether a capture is on, then the reason (ASGO's depends on its settings: a property).
        if type(self).not_capturable_because is not None and _capturing_cuda_graph():
            reason = self.not_capturable_because
            if reason is not None:
                raise RuntimeError(f"{type(self).__name__}: a step cannot be captured in a CUDA graph: {reason}")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        filled = self._fill_missing_members()
        try:
            with self._autocast_off():
                self._step_groups(extra)
        finally:
            for p, value, counters in filled:
                p.grad = None
                p.copy_(value)
                self.state[p].update(counters)
                self._behind.add(p)
        return loss

    def _autocast_off(self) -> contextlib.AbstractContextManager:
        """A context in which ``torch.autocast`` is off on the parameters' devices, where a loop
        steps inside its autocast region: autocast would run the matrix methods' products and
        decompositions in bfloat16 or float16 (other numbers than the step's outside it; Sketchy's
        and S-AdaGrad's sketches refused as of another dtype). The closure, the user's forward and
        backward, runs before it, under the loop's autocast."""
        return autocast_off(self._autocast_regions())

    def _autocast_regions(self) -> tuple:
        """The caller's autocast on the parameters' device types (:func:`autocast_regions`)."""
        return autocast_regions(p.device.type for group in self.param_groups for p in group["params"])

    def _check_step_keywords(self, extra: dict) -> None:
        """``TypeError`` for a keyword ``step`` does not take, as ``torch.optim.Adam.step(foo=1)``
        raises, with the closest valid name: ``batch_size`` where the class has that
        hyperparameter (the root-free classes, whose core takes it per step), nothing else."""
        keywords = ("closure", "batch_size") if "batch_size" in self.defaults else ("closure",)
        if all(k in keywords for k in extra):  # the root-free classes' batch_size= at every step
            return
        signature = inspect.Signature([inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY) for k in keywords])
        check_keywords(f"{type(self).__name__}.step", signature, extra)

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

    def _torch_names_of(self, group: dict, names: tuple) -> str:
        """The torch arguments of ``group`` behind the core arguments ``names`` (``b1`` -> ``betas``)."""
        torch_names = _torch_state.torch_names(self.core_kwargs, group)
        return ", ".join(dict.fromkeys(torch_names.get(n, n).split("[")[0] for n in names)) or "a hyperparameter"

    def _scheduled(self, group: dict) -> bool:
        """Whether a hyperparameter of ``group`` other than ``lr`` changed at this step and at the
        one before: a scheduler's (``OneCycleLR`` cycles ``betas``). Each new value builds a new
        transform, whose compiled step would compile and whose captured step would capture again,
        at every step; the group then steps eagerly (told once) until its hyperparameters hold
        for a step. ``lr`` is read from a tensor and never rebuilds."""
        last, now, names = self._changed_at.get(id(group), (None, None, ()))
        if (last, now) != (self._step_calls - 1, self._step_calls):
            return False
        options = self._compile_options
        if isinstance(options, _torch_compile.Auto):
            options = options.options_for(sum(p.numel() for p in group["params"]))
        captures = self._capture is not False and any(p.is_cuda for p in group["params"])
        if not self._told_scheduled and (options is not None or captures):
            self._told_scheduled = True
            changed = self._torch_names_of(group, names)
            warnings.warn(
                f"{type(self).__name__}: {changed} changed at two steps in a row (a scheduler's momentum "
                f"cycling?): each value would compile or capture the step anew, so a param group steps eagerly "
                f"while its hyperparameters other than lr change; schedule lr alone (OneCycleLR(..., "
                f"cycle_momentum=False)) to keep the compiled or captured step",
                RuntimeWarning, stacklevel=5,
            )
        return True

    def _refuse_gradient(self, p: torch.Tensor, index: int, group_index: int) -> None:
        """Refuses a parameter no method steps, naming it (``index``: its place among all the
        optimizer's parameters, for an unnamed one) and its param group: a sparse gradient, a
        complex parameter or gradient."""
        name, leaf = type(self).__name__, self._param_names.get(p) or f"param{index}"
        if p.grad.is_sparse:
            raise RuntimeError(
                f"{name}: parameter {leaf!r} in param group {group_index} has a sparse gradient "
                f"({p.grad.layout}); {name} does not support sparse gradients (make the layer with "
                "sparse=False, e.g. torch.nn.Embedding(..., sparse=False))"
            )
        if p.is_complex() or p.grad.is_complex():
            raise TypeError(
                f"{name}: parameter {leaf!r} has dtype "
                f"{p.dtype}{'' if p.dtype == p.grad.dtype else f' (gradient {p.grad.dtype})'} in param group "
                f"{group_index}; {name} is defined for real floating-point parameters (hold "
                "a complex tensor as a real parameter of shape (..., 2) and make it with torch.view_as_complex)"
            )

    def _step_groups(self, extra: dict) -> None:
        index, updates = 0, []
        self._step_calls += 1
        # Every refusal of the step is raised before any group updates (a later group's refusal
        # would otherwise leave the earlier groups stepped): the hyperparameters and learning rate
        # of each group, its sparse gradients and complex parameters, a state layout that its new
        # hyperparameters or its parameters changed in place no longer fit, then capturable=True's
        # needs of every update, then the non-finite decision.
        for group_index, group in enumerate(self.param_groups):
            transform = self._transform(group)
            with self._refusals_named(group):
                self._learning_rate(group)
                maximize = _maximizes(group)
            self._check_state_fits(group, index)
            # Parameters stepped together so far share a counter; the key is a host-side count of
            # the calls each took part in, so grouping them needs no device synchronisation.
            by_calls: dict[int, list[tuple[int, torch.Tensor]]] = {}
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                self._refuse_gradient(p, index - 1, group_index)
                calls = self.state[p].get(_CALLS, 0)
                by_calls.setdefault(calls, []).append((index - 1, p))
            group_extra = self._group_extra(group, extra)
            eager = self._scheduled(group)
            updates.extend((group, transform, members, calls, group_extra, eager, maximize)
                           for calls, members in by_calls.items())
        if self._capturable:
            for _, transform, members, *_ in updates:
                named = [(self._param_names.get(p, str(i)), p) for i, p in members]
                _torch_compile.check_capturable(type(self).__name__, transform, named)
        raises = any(group.get("on_nonfinite", "skip") == "raise" for group, *_ in updates)
        # torch_distributed's classes agree on the decision across ranks themselves (one all-reduce).
        decides = (raises or len(updates) > 1) and not getattr(self, "_accepts_dtensor", False)
        skipped = self._one_decision(updates, raises) if decides else None
        # The core names a parameter by its path ('0/weight'); its errors name it as torch does. A
        # state the group's new hyperparameters no longer fit was refused above (_check_state_fits).
        with _torch_state.torch_names_in_errors(self._torch_names_by_path):
            for group, transform, members, calls, group_extra, eager, maximize in updates:
                self._step_members(transform, members, calls=calls, extra=group_extra, skipped=skipped, eager=eager,
                                   maximize=maximize)
        self._restack = False

    def _check_state_fits(self, group: dict, index: int) -> None:
        """``ValueError`` where the state of ``group``'s parameters no longer has the layout a step
        needs: a hyperparameter changed after the state was made and its new value needs another
        layout (a ``factor_dtype``, a ``rank``, a ``block_size``), or a parameter was changed in
        place (``module.double()``, a ``.data`` of another shape). Checked before any group steps,
        so that a refusal leaves every parameter and state tensor as it was. ``index``: the
        position of the group's first parameter in the optimizer (the numbering of unnamed ones).

        At most steps this is a comparison of host-side attributes: the group's transform with the
        one last found to fit, each parameter's dtype and shape with those recorded then. Where
        either differs, the layout wanted is that of the transform's ``init`` on meta tensors of
        the parameters' shapes and dtypes (no memory, no computation), compared with the state;
        the core's own check at the update would refuse the same state, after the groups before
        this one had stepped. A parameter changed in a way its state still fits (a float32
        ``state_dtype`` of a parameter cast to float64) steps on."""
        transform = CoreOptimizer._transform(self, group)  # the core's (torch_distributed wraps it)
        key = self._transforms[id(group)][0]
        params = group["params"]
        layout = _layout(params)
        recorded = self._layouts.get(id(group))
        fitted = self._fitted.get(id(group))
        if fitted is not None and fitted[0] is transform and layout == recorded:
            return
        held = [(i, p) for i, p in enumerate(params) if (self.state.get(p) or {}).get(_HEAD)]
        if held:
            # The parameters whose dtype or shape differs from those their state was made for.
            changed = ([(i, was, now) for i, (was, now) in enumerate(zip(recorded, layout)) if was != now]
                       if recorded is not None and len(recorded) == len(layout) else [])
            paths = [self._path(p, index + i) for i, p in enumerate(params)]
            meta = [torch.empty(self._core_shape(p), dtype=p.dtype, device="meta") for p in params]
            try:
                wanted = transform.init(self._tree(paths, meta)).groups
            except (ValueError, TypeError) as error:
                if type(error) not in (ValueError, TypeError):
                    raise
                if changed:  # e.g. a weight cast to float64 whose bias was not
                    raise self._changed_parameters(params, index, changed) from error
                message = _torch_state.paths_named_like_torch(str(error), self._torch_names_by_path())
                raise type(error)(f"{type(self).__name__}: {message}") from error
            for i, p in held:
                entries = self.state[p]
                found = {k: (tuple(v.shape), v.dtype) for k, v in entries.items() if k not in _BOOKKEEPING}
                new = {k: (tuple(v.shape), v.dtype) for k, v in wanted.get(path_str(paths[i]), {}).items()}
                if found == new:
                    continue
                if changed:
                    raise self._changed_parameters(params, index, changed)
                if fitted is not None:
                    names = tuple(k for k, v in fitted[1] if (k, v) not in key)
                else:  # no step since this optimizer was made, copied or loaded: the last change recorded
                    names = self._changed_at.get(id(group), (None, None, ()))[2]
                def entry(k: str) -> str:
                    if k in found and k in new:
                        return f"{k!r}: state {found[k][0]}/{found[k][1]}, needs {new[k][0]}/{new[k][1]}"
                    return f"{k!r} {'only in the state' if k in found else 'missing from the state'}"

                detail = "; ".join(entry(k) for k in sorted(set(found) | set(new)) if found.get(k) != new.get(k))
                raise ValueError(
                    f"{type(self).__name__}: {self._torch_names_of(group, names)} changed after the optimizer state "
                    f"was made, and the new value needs a state of another layout; set it before the first step, or "
                    f"build a new optimizer (the state of {_torch_state.param_label(self._param_names, p, index + i)}: "
                    f"{detail})"
                )
        self._fitted[id(group)] = (transform, key)
        self._layouts[id(group)] = layout

    def _changed_parameters(self, params: list, index: int, changed: list) -> ValueError:
        """The refusal of a step after parameters of a group were changed in place (``changed``:
        ``(position in the group, (dtype, shape) recorded, (dtype, shape) now)``) in a way their
        optimizer state does not fit."""
        described = []
        for i, (dtype, shape), (new_dtype, new_shape) in changed:
            what = [f"dtype {dtype} -> {new_dtype}"] if dtype != new_dtype else []
            what += [f"shape {tuple(shape)} -> {tuple(new_shape)}"] if shape != new_shape else []
            described.append(f"{_torch_state.param_label(self._param_names, params[i], index + i)}: {', '.join(what)}")
        return ValueError(
            f"{type(self).__name__}: a parameter changed in place after the optimizer state was made, and its "
            f"state does not fit it ({'; '.join(described)}); build a new optimizer for the parameters as they "
            f"are now, load a state_dict that fits them (load_state_dict casts the state to their dtype), or "
            f"change them back"
        )

    def _core_shape(self, p: torch.Tensor) -> tuple:
        """The shape of ``p`` as the core transform sees it."""
        return tuple(p.shape)

    def _group_extra(self, group: dict, extra: dict) -> dict:
        """The keyword arguments of ``group``'s core update: ``step``'s own (the root-free classes
        add a counted batch size where the group has none)."""
        return extra

    def _one_decision(self, updates: list, raises: bool) -> Optional[torch.Tensor]:
        """The non-finite rule for the step as a whole, as for one core update, where the step
        takes several (param groups, or parameters that missed steps): a non-finite gradient
        anywhere skips every update, or (``raises``: ``on_nonfinite="raise"`` in some group) raises
        ``FloatingPointError`` naming the parameter, before any parameter moves. Returns, for the
        skip, the 0-D decision that each update's own test is made to take (:meth:`_step_members`
        makes one of its gradients NaN on a skipped step), computed on the device without a host
        read; ``None`` where nothing is to be made."""
        grads = [p.grad for _, _, members, *_ in updates for _, p in members]
        xp = namespace_of(*grads)  # the array API's torch, whose astype widens a bf16 gradient
        ok = gradient_ok(xp, grads)
        if raises:
            if not bool(ok):  # the raise rule reads the decision on the host, as the core's does
                names = [(self._param_names.get(p, str(i)),) for _, _, members, *_ in updates for i, p in members]
                raise FloatingPointError(f"{type(self).__name__}: {first_bad_gradient(xp, grads, names, 'parameter')}")
            return None
        return ok

    def _step_members(self, transform: Transform, members: list, *, calls: int, extra: dict,
                      skipped: Optional[torch.Tensor] = None, eager: bool = False, maximize: bool = False) -> None:
        """One core update of parameters that took part in ``calls`` earlier steps together;
        ``skipped``: the step's decision (:meth:`_one_decision`), made this update's by a NaN in
        its smallest non-empty gradient where it is false (an empty one holds no entry to carry
        it); an update of empty parameters alone, which moves nothing, is given the decision as
        the core's ``gradients_ok``, eagerly; ``eager``: neither captured nor compiled
        (:meth:`_scheduled`); ``maximize``: the group's (:func:`_maximizes`)."""
        plan = self._members(members)
        tensors = plan.tensors
        grads = [p.grad for p in tensors]
        if maximize:
            grads = list(torch._foreach_neg(grads))
        if skipped is not None:
            grads, extra, given = decision_carried(grads, skipped, extra)
            eager = eager or given
        params_tree = tree_unflatten(plan.treedef, [p.detach() for p in tensors])
        grads_tree = tree_unflatten(plan.treedef, grads)
        states = [self.state[p] for p in tensors]
        if calls == 0 and not any(entries.get(_HEAD) for entries in states):
            core_state = transform.init(params_tree)
        else:
            # Stepped before, or warm-started (MBF.warm_start: state made, no call taken yet).
            # In the tree's order, as init made them (a compiled step guards on the order). A copy
            # less the bookkeeping keys (cheaper than a filtering comprehension:
            # records/backends-measurements.md).
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
        new_state = None
        if self._capture is not False and not eager:
            new_state = self._captured_update(plan, transform, core_state, params_tree, calls, extra, grads)
        if new_state is None:
            new_state = (self._eager_update(transform, grads_tree, core_state, params_tree, calls, extra) if eager else
                         self._run_update(transform, grads_tree, core_state, params_tree, calls, extra, plan.numel))
            if self._capturable and calls > 0 and not self._restack:
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

    def _captured_update(
        self, plan: "_Members", transform: Transform, state: PrecondState, params: dict, calls: int, extra: dict,
        grads: list,
    ) -> Optional[PrecondState]:
        """The step through its CUDA graph (:mod:`._torch_capture`), or ``None`` where it is not
        captured. The update it captures is :meth:`_run_update` (eager, or compiled where asked or
        by the class default), from the gradient leaves it is given, with the new state written into
        ``state``'s tensors: compiled, the graph replays Inductor's fused kernels, which move a
        fraction of the eager step's bytes."""
        captures = _torch_capture.book(self)
        if captures is None:
            return None

        def update(grads: list, capturing: bool, in_place: bool = True) -> PrecondState:
            options = self._compile_options
            grads_tree = tree_unflatten(plan.treedef, grads)
            new_state = self._run_update(transform, grads_tree, state, params, calls, extra, plan.numel)
            if capturing and self._compile_options is not options:
                raise _torch_capture.Spoiled("the compiled step fell back to eager during the capture")
            return _written_in_place(state, new_state) if in_place else new_state

        return captures.step(self, plan, transform, state, calls, extra, update, grads)

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
            options = options.options_for(numel)
        if options is not None and isinstance(transform, Transform):
            compiled = self._compiled.get(id(transform))
            if compiled is None or compiled.transform is not transform:
                compiled = _torch_compile.CompiledStep(transform, options, self._kernels)
                live = {id(entry[1]) for entry in self._transforms.values()}
                self._compiled = {k: v for k, v in self._compiled.items() if k in live}
                self._compiled[id(transform)] = compiled
            due = transform.due(calls)
            if due in compiled.eager_patterns:  # the schedule's start: a graph for it would serve a few steps
                return self._eager_update(transform, grads, state, params, calls, extra)
            try:
                with float32_matmul_precision(torch, transform.matmul_precision):
                    return compiled(grads, state, params, due, extra)
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
        # The optimizer's own state: a step may write over it (no second copy). Under torch.compile
        # nothing is written in place, so dynamo is not handed the context manager.
        with contextlib.nullcontext() if torch.compiler.is_compiling() else owned_state():
            updates, new_state = transform.update(grads, state, params, step=calls, **extra)
        torch._foreach_add_(tree_flatten(params)[0], tree_flatten(updates)[0])
        return new_state


def autocast_regions(device_types: Any) -> tuple:
    """``(device_type, dtype, cache_enabled)`` of each of ``device_types`` where ``torch.autocast``
    is on, in first-seen order; ``()`` where it is off. Where torch has its one host-side query of
    any autocast (private, so possibly absent), a step outside autocast, as most run, asks nothing
    else; without it, each device type is asked through the public API."""
    any_enabled = getattr(torch._C, "_is_any_autocast_enabled", None)
    if any_enabled is not None and not any_enabled():
        return ()
    return tuple(
        (device_type, torch.get_autocast_dtype(device_type), torch.is_autocast_cache_enabled())
        for device_type in dict.fromkeys(device_types)
        if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
    )


def autocast_off(regions: tuple) -> contextlib.AbstractContextManager:
    """A context in which autocast is off on the device types of ``regions`` (:func:`autocast_regions`)."""
    if not regions:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    for device_type, _, _ in regions:
        stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack


def autocast_restored(regions: tuple) -> contextlib.AbstractContextManager:
    """A context in which the autocast of ``regions`` (:func:`autocast_regions`, read in the caller's
    region) is on again: the caller's forward run from inside :func:`autocast_off`."""
    if not regions:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    for device_type, dtype, cache_enabled in regions:
        stack.enter_context(torch.autocast(device_type, dtype=dtype, cache_enabled=cache_enabled))
    return stack


def decision_carried(grads: list, ok: torch.Tensor, extra: dict) -> tuple[list, dict, bool]:
    """A skip decision ``ok`` (0-D bool tensor, made for more than these gradients) made the one
    that a core update of ``grads`` takes: where it is false, the smallest non-empty gradient
    becomes NaN (the core's own test then skips; no host read), and where every gradient is empty
    (no entry to carry a NaN) it is passed as the core's ``gradients_ok`` in the returned keywords.
    Returns the gradients, the update's keywords, and whether ``gradients_ok`` was given (that
    update runs eagerly: a captured or compiled one is made without it)."""
    i = min(range(len(grads)), key=lambda k: grads[k].numel() or math.inf)
    if grads[i].numel():
        grads = list(grads)
        grads[i] = torch.where(ok, grads[i], math.nan)
        return grads, extra, False
    return grads, {**extra, "gradients_ok": ok}, True


def _layout(params: list) -> list:
    """Each parameter's ``(dtype, shape)``: host-side attributes, read without a device sync."""
    return [(p.dtype, p.shape) for p in params]


def _capturing_cuda_graph() -> bool:
    """Whether the current CUDA stream is capturing a graph (False, without initialising CUDA,
    where no CUDA context exists: a CPU-only torch has no capture to ask about)."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


# torch._disable_dynamo is torch.compiler.disable applied at the first call: torch.compiler.disable
# imports dynamo when the decorator runs, a large import that a process that never compiles does
# not need.
@torch._disable_dynamo
def step_outside_the_graph(opt: "CoreOptimizer", closure: Optional[Callable[[], Any]], extra: dict) -> Any:
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
    already (nothing to copy); an eager step pays one copy of its state: one ``copy_`` per run of
    an entry's leaves whose old and new arrays are each consecutive pieces of one stack (the
    persistent stacks: :func:`_copied_by_runs`), one per leaf elsewhere.
    """
    pairs: dict[str, list] = {}  # by entry name, in group order: (old array, new array)

    def keep(name: str, before: Any, after: Any) -> Any:
        if after is before or before is None or before.shape != after.shape or before.dtype != after.dtype:
            return after
        pairs.setdefault(name, []).append((before, after))
        return before

    groups = {
        key: {name: keep(name, old.groups.get(key, {}).get(name), value) for name, value in entries.items()}
        for key, entries in new.groups.items()
    }
    state = PrecondState(keep("", old.count, new.count), keep("", old.nonfinite_count, new.nonfinite_count), groups)
    for runs in pairs.values():
        _copied_by_runs(runs)
    return state


def _copied_by_runs(pairs: list) -> None:
    """``before.copy_(after)`` for each pair, as one ``copy_`` for each run of pairs whose old
    arrays are consecutive pieces of one allocation and whose new arrays are too
    (:func:`precond_ref._backend.consecutive_runs`); a run whose two sides share memory at
    different places is copied pair by pair (``copy_`` refuses overlapping operands)."""
    sides = ([b for b, _ in pairs], [a for _, a in pairs])
    for start, stop in consecutive_runs(torch, sides):
        if stop - start > 1:
            before, after = (consecutive_view([x.reshape(-1) for x in side[start:stop]], new_axis=False) for side in sides)
            if not _overlapping(before, after):
                before.copy_(after)
                continue
        for b, a in pairs[start:stop]:
            b.copy_(a)


def _overlapping(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two contiguous tensors share memory at different places."""
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    return a.storage_offset() != b.storage_offset()


def _read(rate: torch.Tensor, count: Any) -> torch.Tensor:
    """The learning rate of a step, a 0-D view of its 1-element tensor. A 0-D float64 CPU tensor
    among a compiled step's inputs would make dynamo trace the step twice (it gives such a tensor a
    symbolic float that the graph never uses, then specialises it and starts again); a view made
    inside the step is not an input."""
    return rate.reshape(())
