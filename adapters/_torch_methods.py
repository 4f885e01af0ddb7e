"""The torch classes' behaviour beyond their table rows (``adapters/torch.py``): the root-free
methods' batch size (from the constructor, ``model=``'s forward passes or ``step(batch_size=)``),
and MBF's pairing of inputs-first weights and its warm start."""

from __future__ import annotations

import contextlib
import contextvars
import copy
import itertools
import warnings
import weakref
from typing import Any, Callable, Iterator, Optional

import torch

from precond_ref.engine.layout import layer_member
from precond_ref.tree import path_str

from ._torch_core import CoreOptimizer, _layout, autocast_off, autocast_restored, step_outside_the_graph
from ._torch_state import CALLS as _CALLS
from ._torch_state import HEAD as _HEAD
from ._torch_state import NONFINITE as _NONFINITE
from ._torch_state import STEP as _STEP
from ._torch_state import check_tensor_lr, torch_names_in_errors


# --------------------------------------------------------------------------------------------
# The root-free methods' batch size


def _starts_accumulation(model: torch.nn.Module) -> bool:
    """Whether ``model`` has parameters that require grad and none of them holds a gradient: the
    gradients were set to None (``zero_grad()``, whose default is ``set_to_none=True``) or never
    computed. One pass over the parameters, ending at the first gradient found. Traced in a
    ``torch.compile``d model, it makes dynamo guard on the gradients being None: a loop whose
    forwards find them both ways (accumulation) compiles the model for each."""
    trainable = False
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is not None:
                return False
            trainable = True
    return trainable


def _unhook(model_ref: "weakref.ref[torch.nn.Module]", hook: "_CounterHook") -> None:
    """Removes ``hook`` from the forward pre-hooks of the model ``model_ref`` refers to, if it is
    still alive: what ``RemovableHandle.remove`` does, for a hook whose handle is not known (the one
    a model's copy or an unpickled model carries)."""
    model = model_ref()
    if model is None:
        return
    for key in [key for key, value in model._forward_pre_hooks.items() if value is hook]:
        del model._forward_pre_hooks[key]
        model._forward_pre_hooks_with_kwargs.pop(key, None)


class _CounterHook:
    """The forward pre-hook that ``model=`` registers: it passes each forward to its
    :class:`_BatchCounter` through a weak reference, so that the model does not keep the counter
    alive after its optimizer is gone. A hook whose counter is gone does nothing and removes itself
    from the model it is called on."""

    __slots__ = ("counter",)

    def __init__(self, counter: Optional["_BatchCounter"]) -> None:
        self.counter = weakref.ref(counter) if counter is not None else None

    def _target(self) -> Optional["_BatchCounter"]:
        return self.counter() if self.counter is not None else None

    def __call__(self, module: torch.nn.Module, inputs: tuple, kwargs: Optional[dict] = None) -> None:
        counter = self._target()
        if counter is None:
            _unhook(weakref.ref(module), self)  # its optimizer is gone (an unpickled model's hook)
        else:
            counter._hook(module, inputs, kwargs)

    def __deepcopy__(self, memo: dict) -> "_CounterHook":
        # copy.deepcopy of a weakref returns the same weakref, which would leave the model's copy
        # counting into the original counter: map the counter to its copy through the memo (the
        # optimizer's copy when the optimizer is copied in the same call).
        counter = self._target()
        if counter is None:
            return _CounterHook(None)
        new = _CounterHook(copy.deepcopy(counter, memo))
        model = counter._model() if counter._model is not None else None
        if model is not None and id(model) in memo:
            # Copied with its model: the model's copy holds the new hook, to be removed from it
            # when the counter's copy is collected.
            new._target()._remove_when_gone(memo[id(model)], new)
        return new

    def __reduce__(self) -> tuple:
        # Pickled with its optimizer, the unpickled hook calls the unpickled optimizer's counter
        # (one object in the pickle); pickled without it, the counter is gone after unpickling.
        return (_CounterHook, (self._target(),))


class _BatchCounter:
    """SIRFShampoo's batch-size detection: a forward pre-hook on the model adds the leading size of
    the first tensor argument, positional or keyword (``model(x)``, ``model(input_ids=ids)`` as the
    transformers ``Trainer`` calls models), for every forward pass in training mode since the last
    optimizer step (so gradient accumulation over several forwards counts every example of the
    accumulated mean).

    A training-mode forward that starts a new accumulation first drops what was counted: when the
    model has parameters that require grad and none holds a gradient (they were zeroed with
    ``set_to_none=True``, the default of ``optimizer.zero_grad()`` and ``model.zero_grad()``), the
    gradients of the forwards counted so far were discarded, and so are their examples. In a loop
    that zeroes before the forward, a step that ``torch.amp.GradScaler`` skips (it does not call
    ``step`` on an overflow), or a batch the loop drops, is thus not added to the next step's B.
    The later forwards of an accumulation add (they find the earlier forwards' gradients), and so
    does the forward of a loop that calls it before ``zero_grad`` (``out = model(x);
    opt.zero_grad(); ...``: it finds the last step's gradients, and the step reset the count).
    The check is one pass over the model's parameters, ending at the first gradient. What remains:

    - gradients zeroed with ``set_to_none=False`` (or only some of the model's), a model none of
      whose parameters requires grad, or a loop that calls the forward before ``zero_grad``: no
      forward is seen to start an accumulation, so a skipped step's forward is still added to the
      next step's B;
    - in a loop that zeroes first, several training forwards before the first backward (a model
      called on two views of a batch) each find no gradient: B is the last one's leading size.

    Give ``batch_size=`` where these apply.

    B is the number of examples the loss averages over. The leading size is that number where each
    row of the input is one example (features, images). A first input of integer sequences (token
    ids, ``(sequences, length, ...)``) does not tell: a per-token loss averages over every token, a
    per-sequence one over the sequences. Such a forward is recorded in ``sequences`` (its input's
    shape) and counts nothing, and the step refuses to guess (:meth:`_RootFreeOptimizer.step`).
    A forward whose arguments hold no tensor (a dict of tensors, say) or whose first tensor is 0-D
    has no leading size and adds nothing; it is recorded in ``uncounted`` (what its arguments
    were), so that a step with nothing counted says so and asks for ``batch_size=`` rather than
    saying that no training forward ran.

    The model holds the hook (:class:`_CounterHook`), the hook holds the counter weakly, and the
    hook is removed from the model when the counter is collected (with its optimizer).
    ``copy.deepcopy`` of the optimizer alone hooks the copy onto the same model. Copied or pickled
    together with the model (``deepcopy({"model": m, "opt": o})``), the model's copy carries the
    hook of the optimizer's copy. An optimizer pickled without its model counts nothing: give
    ``batch_size`` to ``step``. A model copied without its optimizer carries no hook; one pickled
    without it drops the hook, which counts nothing, at its first forward.
    """

    def __init__(self, model: Optional[torch.nn.Module]) -> None:
        self.count = 0
        self.sequences: Optional[tuple] = None
        self.uncounted: Optional[str] = None
        self._model = weakref.ref(model) if model is not None else None
        self.handle = None
        if model is not None:
            self.handle = model.register_forward_pre_hook(_CounterHook(self), with_kwargs=True)
            weakref.finalize(self, self.handle.remove).atexit = False

    def _remove_when_gone(self, model: torch.nn.Module, hook: _CounterHook) -> None:
        """Removes ``hook`` (which calls this counter) from ``model`` when this counter is collected."""
        weakref.finalize(self, _unhook, weakref.ref(model), hook).atexit = False

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
        if _starts_accumulation(module):
            # The gradients of the forwards counted so far were discarded (or never computed).
            self.count, self.sequences, self.uncounted = 0, None, None
        arguments = tuple(itertools.chain(inputs, (kwargs or {}).values()))
        first = next((x for x in arguments if isinstance(x, torch.Tensor)), None)
        if first is None or first.ndim == 0:
            # No leading size to count (a dict or other container of tensors, a 0-D tensor): kept
            # for the step's message, which would otherwise say that no training forward ran.
            if first is not None:
                what = "its first tensor argument is 0-D"
            elif arguments:
                what = f"its first argument is a {type(arguments[0]).__name__} and none is a tensor"
            else:
                what = "it was called without arguments"
            self.uncounted = self.uncounted or what
            return
        if first.ndim >= 2 and not (first.is_floating_point() or first.is_complex() or first.dtype == torch.bool):
            self.sequences = tuple(first.shape)
            return
        self.count += int(first.shape[0])


#: Set within :func:`_batch_size_at_each_step`; a context variable, so that it holds for the
#: caller's thread (or task) only.
_BATCH_SIZE_AT_EACH_STEP: contextvars.ContextVar[bool] = contextvars.ContextVar("batch_size_at_each_step", default=False)


@contextlib.contextmanager
def _batch_size_at_each_step() -> Iterator[None]:
    """Within it, the root-free classes are built without ``batch_size=`` or ``model=``: for
    callers that give ``step(batch_size=...)`` at every step (``compare``'s and ``bench``'s
    training loops). A step without it still raises."""
    token = _BATCH_SIZE_AT_EACH_STEP.set(True)
    try:
        yield
    finally:
        _BATCH_SIZE_AT_EACH_STEP.reset(token)


def _no_batch_size(owner: str, unscaled: bool) -> str:
    """The missing-B error in this API's words: where a batch size can come from."""
    off = ", or scale_by_batch_size=False to not scale by it" if unscaled else ""
    return (
        f"{owner}: no batch size. Give batch_size= (the number of examples the loss averages over, "
        f"not sums) or model= (to count the examples of its training-mode forward passes){off}; "
        f"opt.step(batch_size=...) overrides either for one step"
    )


class _RootFreeOptimizer(CoreOptimizer):
    """Shared batch-size handling of the root-free methods.

    B (the number of examples the loss *averages*; a summed loss makes B·g² wrong by B²) comes from,
    in this order: ``step(batch_size=...)``; the constructor's ``batch_size``, or a param group's
    own; or, when ``model=`` is given without ``batch_size``, the examples its training-mode
    forward passes saw since the last ``step`` (the authors' hook: the leading size of each one's
    first input; a first input of integer sequences, which does not tell tokens from sequences,
    makes the step ask for ``batch_size=``), for the param groups without a ``batch_size`` of
    their own. A forward that finds every gradient of the model set to None starts the count
    again: the gradients of the forwards before it were discarded (a step ``GradScaler`` skipped);
    :class:`_BatchCounter` says which loops this does not cover. Under data parallelism the
    ranks' counts are summed (:meth:`_count_group`), so that B is the global batch's on every
    rank. A step without a batch size whose every gradient is exactly zero takes B = 1: B
    multiplies only gradient terms, so the step is the same for every B (torch DCP's state-dict
    helpers take such a step, with no forward, to make the state of an optimizer that has none).
    The constructor raises
    ``ValueError`` when neither ``batch_size=`` nor ``model=`` is given (and B scales the
    statistic), so that a missing B is found when the optimizer is built, not at its first step.
    """

    #: During a step: the batch size ``model=`` counted, for the groups without their own
    #: (:meth:`_group_extra`); None otherwise.
    _counted_batch_size: Optional[int] = None

    def __init__(self, params: Any, defaults: dict, *, model: Optional[torch.nn.Module] = None, **options: Any) -> None:
        check_tensor_lr(defaults.get("lr"))
        if params is None:
            if model is None:
                raise ValueError("give params, or model= to optimize all of its parameters")
            params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        super().__init__(params, defaults, model=model, **options)
        if model is None and not _BATCH_SIZE_AT_EACH_STEP.get() and self._groups_without_batch_size():
            raise ValueError(_no_batch_size(type(self).__name__, "scale_by_batch_size" in defaults))
        self._batch_counter = _BatchCounter(model) if model is not None and defaults["batch_size"] is None else None

    def _groups_without_batch_size(self) -> bool:
        """Whether some param group scales by B and has no ``batch_size`` of its own."""
        return any(g["batch_size"] is None and g.get("scale_by_batch_size", True) for g in self.param_groups)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None, **extra: Any) -> Any:
        if torch.compiler.is_compiling():
            return step_outside_the_graph(self, closure, extra)
        counter = self._batch_counter
        if closure is not None and counter is not None:
            # the closure's forward passes belong to this step
            with torch.enable_grad():
                loss = closure()
            return self._counted_step(lambda: loss, extra)
        return self._counted_step(closure, extra)

    def _counted_step(self, closure: Optional[Callable[[], Any]], extra: dict) -> Any:
        counter = self._batch_counter
        # The count serves the groups without a batch_size of their own, and only when step's
        # batch_size does not override it.
        needed = extra.get("batch_size") is None and self._groups_without_batch_size()
        wanted = counter is not None and needed
        # Under data parallelism the count is summed over the ranks, which also tell each other
        # what stops the step (integer sequences), so that every rank raises or none does.
        total, sequences_anywhere = self._counted_over_ranks(counter) if wanted else (0, False)
        if wanted and sequences_anywhere:
            shape, counter.sequences, counter.count, counter.uncounted = counter.sequences, None, 0, None
            if shape is None:
                raise ValueError(
                    f"{type(self).__name__}: model='s input on another rank of the process group is a batch of "
                    "integer sequences, which does not tell B, the number of examples the loss averages over. Give "
                    "batch_size= to the constructor or opt.step(batch_size=...)"
                )
            raise ValueError(
                f"{type(self).__name__}: model='s input is a batch of integer sequences {shape}, which does not "
                "tell B, the number of examples the loss averages over: a per-token loss averages over every "
                f"token ({shape[0]} x {shape[1]} here), a per-sequence one over the {shape[0]} sequences. Give "
                "batch_size= to the constructor or opt.step(batch_size=...)"
            )
        counted = total if wanted and total > 0 else None
        if needed and counted is None and self._only_zero_gradients():
            # B multiplies only gradient terms (s <- b2 s + (1 - b2) B g*g; IF-Shampoo's factor step
            # from sqrt(B) G), so a step whose every gradient is exactly zero is the same for every
            # B: it steps with B = 1. torch DCP's state-dict helpers take such a step (zero
            # gradients, lr = 0, no forward) to make the state of an optimizer that has none.
            counted = 1
        if needed and counted is None:
            if counter is not None:
                uncounted, counter.count, counter.sequences, counter.uncounted = counter.uncounted, 0, None, None
                if uncounted is not None:
                    raise ValueError(
                        f"{type(self).__name__}: model= counts B, the number of examples the loss averages over, "
                        f"as the leading size of the first tensor argument of each training-mode forward, but "
                        f"the model's forward got no tensor to count ({uncounted}). Give batch_size= to the "
                        "constructor or opt.step(batch_size=...)"
                    )
            raise ValueError(
                _no_batch_size(type(self).__name__, "scale_by_batch_size" in self.defaults)
                + ("; model= counted no training-mode forward pass since the last step" if counter is not None else "")
            )
        self._counted_batch_size = counted
        try:
            return super().step(closure, **extra)
        finally:
            self.__dict__.pop("_counted_batch_size", None)
            if counter is not None:
                counter.count, counter.sequences, counter.uncounted = 0, None, None

    def _count_group(self) -> Any:
        """The process group whose ranks' counts add up to B, or None where this process's count is
        B. The ranks of a data-parallel run average their gradients (DDP averages the ranks'
        mean-loss gradients), so the gradient stands for the global batch, and B must be its size,
        the same on every rank. torch_distributed's classes: their process group (``_pg``), whose
        ranks train one model. The plain classes: the process group of a ``DistributedDataParallel``
        given as ``model=``; any other model's count is this process's, with a warning (once) where
        torch.distributed runs several processes, which may be the ranks of one model."""
        group = getattr(self, "_pg", None)
        if group is not None:
            return group
        model = self._batch_counter._model() if self._batch_counter._model is not None else None
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            return model.process_group
        if (
            not self._warned_local_count and torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
        ):
            self._warned_local_count = True
            warnings.warn(
                f"{type(self).__name__}: model= counts the examples of this process's forward passes only, "
                f"while torch.distributed runs {torch.distributed.get_world_size()} processes; under data "
                "parallelism the averaged gradient is the global batch's, and B must be the global batch size. "
                "Pass the DistributedDataParallel module as model= (its ranks' counts are then summed), give "
                "batch_size= the global batch size, or use precond_ref.adapters.torch_distributed's class",
                RuntimeWarning, stacklevel=7,
            )
        return None

    #: Whether the warning of :meth:`_count_group` on a count that may be one rank's was given.
    _warned_local_count: bool = False

    def _counted_over_ranks(self, counter: _BatchCounter) -> tuple[int, bool]:
        """B counted for this step (the sum of the ranks' counts over :meth:`_count_group`) and
        whether some rank's forward took integer sequences. One all-reduce of two integers on the
        parameters' device, read on the host: the count decides the step's path (the error of a step
        nothing was counted for, B = 1 for one of zero gradients) alike on every rank, and a number
        B keeps a CUDA-graph capture and a compiled step's constant, as ``batch_size=`` does."""
        group = self._count_group()
        if group is None or torch.distributed.get_world_size(group) == 1:
            return counter.count, counter.sequences is not None
        device = next(p.device for g in self.param_groups for p in g["params"])
        summed = torch.tensor([counter.count, counter.sequences is not None], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(summed, group=group)
        total, sequences = summed.tolist()
        return total, sequences > 0

    def _only_zero_gradients(self) -> bool:
        """Whether the param groups that need the counted batch size have gradients and every one
        of them is exactly zero. Asked only where the step has no batch size, which otherwise
        raises: it reads each gradient on the host (up to the first nonzero one), which a step with
        a batch size never does."""
        grads = [
            p.grad for g in self.param_groups if g["batch_size"] is None and g.get("scale_by_batch_size", True)
            for p in g["params"] if p.grad is not None
        ]
        if not grads or any(grad.is_sparse for grad in grads):
            return False
        return not any(bool(grad.any()) for grad in grads)

    def _group_extra(self, group: dict, extra: dict) -> dict:
        """``step``'s keyword arguments, with the counted batch size for a group that has no
        ``batch_size`` of its own when ``step`` gave none (a group's own value comes first)."""
        counted = self._counted_batch_size
        if counted is not None and extra.get("batch_size") is None and group.get("batch_size") is None:
            return {**extra, "batch_size": counted}
        return extra


# --------------------------------------------------------------------------------------------
# MBF


def _unparametrized_class(module: torch.nn.Module) -> type:
    """The module's class, or for a parametrized module (which ``torch.nn.utils.parametrize`` gives a
    subclass of its own, ``Parametrized<class>``) the class it was built as."""
    cls = type(module)
    return cls.__bases__[0] if torch.nn.utils.parametrize.is_parametrized(module) else cls


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
            # A parametrized weight's tensor (``original``) belongs to the layer it computes the weight of.
            if torch.nn.utils.parametrize.is_parametrized(module):
                for p in module.parametrizations.parameters():
                    modules.setdefault(p, module)
            for p in module.parameters(recurse=False):
                modules.setdefault(p, module)
    # A layer's weight and bias as the pairing reads them (a parametrization's ``original`` is its weight).
    member = {layer_member(tuple(name.split("."))): p for p, name in names.items()}
    found, square = set(), []
    for p, name in names.items():
        layer, leaf = layer_member(tuple(name.split(".")))
        bias = member.get((layer, "bias"))
        if leaf != "weight" or p.ndim != 2 or bias is None or bias.ndim != 1:
            continue
        rows, cols, size = p.shape[0], p.shape[1], bias.shape[0]
        module = modules.get(p)
        if isinstance(module, torch.nn.Linear):
            continue
        if module is not None and _unparametrized_class(module).__name__ == "Conv1D" and cols == size:
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
            stacklevel=4,
        )
    return frozenset(found)



def _unnamed(optimizer: CoreOptimizer, params: list) -> int:
    """How many of ``params`` have no name (neither named parameters nor ``model=`` gave one)."""
    return sum(1 for p in params if optimizer._param_names.get(p) is None)


class _FallbackOptimizer(CoreOptimizer):
    """ASGO's and DASGO's behaviour beyond their table rows: a warning for a group whose
    ``fallback_filter`` would see made-up names (``param0``, ...) for unnamed parameters, which a
    filter by name (``"emb" in name``) would silently route nowhere."""

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        unnamed = _unnamed(self, group["params"])
        if group.get("fallback_filter") is not None and unnamed:
            warnings.warn(
                f"{type(self).__name__}: fallback_filter is called with each parameter's name, but {unnamed} "
                "parameter(s) have none (it sees 'param<index>'); pass model.named_parameters() or model=",
                stacklevel=3,
            )


class _MBFOptimizer(CoreOptimizer):
    """MBF's behaviour beyond its table row: inputs-first weights found at construction, a warning
    for unnamed parameters, and :meth:`warm_start`."""

    def __init__(self, params: Any, defaults: dict, *, model: Optional[torch.nn.Module] = None, **options: Any) -> None:
        super().__init__(params, defaults, model=model, **options)
        self._inputs_first = _inputs_first_weights(self._param_names, model)
        unnamed = _unnamed(self, [p for g in self.param_groups for p in g["params"]])
        if unnamed:
            warnings.warn(
                f"MBF: {unnamed} parameter(s) have no names, so Linear weights cannot be paired with "
                "their biases (each 2-D weight is a layer without a bias column, each 1-D tensor uses "
                "the diagonal rule); pass model.named_parameters() or model=",
                stacklevel=3,
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

        Inside a ``torch.autocast`` region a callable ``source`` runs under it, and the statistics
        are computed with autocast off on the parameters' devices, as :meth:`step` computes them.
        """
        if any(self.state[p] for group in self.param_groups for p in group["params"]):
            raise RuntimeError("MBF.warm_start must be called before the first step")
        # Called inside a torch.autocast region, the statistics are computed with autocast off on
        # the parameters' devices, as step computes them; a callable source, the user's forward
        # and backward, runs under the caller's autocast.
        regions = self._autocast_regions()
        if callable(source):
            if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
                raise ValueError(f"num_batches must be an integer >= 1 with a callable source, got {num_batches!r}")
            stream = self._run_batches(source, num_batches, regions)
        else:
            if num_batches is not None:
                raise ValueError("num_batches is only used with a callable source")
            stream = (self._by_tensor(batch) for batch in source)
        with autocast_off(regions):
            self._warm_start_from(stream)

    def _warm_start_from(self, stream: Iterator[dict]) -> None:
        """:meth:`warm_start` from ``stream``, gradient dicts keyed by the parameter tensors."""
        # Every group's state is made before any is written: a group refused (its hyperparameters,
        # a gradient that does not fit its state) leaves the optimizer as it was, so a corrected
        # call can follow. The transforms and initial states come first, before a callable source
        # runs its forward and backward passes.
        made = []
        for group, paths in zip(self.param_groups, self._group_paths()):
            transform = self._transform(group)
            with torch_names_in_errors(self._torch_names_by_path):
                state = transform.init(self._tree(paths, [p.detach() for p in group["params"]]))
            made.append((group, paths, transform, state))
        # One pass over the source; several param groups share it (itertools.tee buffers).
        streams = itertools.tee(stream, len(self.param_groups))
        warmed = []
        for (group, paths, transform, state), batches in zip(made, streams):
            tensors = group["params"]
            trees = (
                self._tree(paths, [g.get(p, None) if g.get(p, None) is not None else torch.zeros_like(p) for p in tensors])
                for g in batches
            )
            with torch_names_in_errors(self._torch_names_by_path):
                warmed.append((group, paths, transform.warm_start(state, trees)))
        for group, paths, state in warmed:
            tensors = group["params"]
            by_key = {path_str(path): p for path, p in zip(paths, tensors)}
            for p in tensors:
                # calls = 0: the first step is the core's call 0 (its interval decisions included);
                # it loads this state (the heads are marked) instead of initialising a fresh one.
                self.state[p] = {_STEP: state.count, _NONFINITE: state.nonfinite_count, _CALLS: 0}
            for key, entries in state.groups.items():
                head = self.state[by_key[key]]
                head[_HEAD] = True
                head.update(entries)
            self._layouts[id(group)] = _layout(tensors)  # the parameters this state was made for

    def _run_batches(self, source: Callable[[], Any], num_batches: int, regions: tuple):
        """The gradients of ``num_batches`` calls of ``source``, each run under the caller's
        autocast ``regions`` (:func:`._torch_core.autocast_regions`)."""
        params = [p for group in self.param_groups for p in group["params"]]
        try:
            for _ in range(num_batches):
                for p in params:
                    p.grad = None
                with torch.enable_grad(), autocast_restored(regions):
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
