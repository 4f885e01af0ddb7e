"""``torch.optim.Optimizer`` front-ends for the core methods.

Each class is a thin subclass of :class:`CoreOptimizer`: torch-style hyperparameter names per
param group, mapped onto the core factory's arguments by ``core_kwargs``. Tensors go into the core
as they are (the array API namespace of a tensor is torch's), on whatever device they live; the
core's new state is written back into ``self.state`` and its updates are added to the parameters
in place. ``state_dict`` / ``load_state_dict`` therefore work as for any torch optimizer.

**The table.** The nine classes are made by :func:`_torch_class` from one table (the assignments
at the end of this module), as ``adapters/jax.py`` makes its optax factories: one row per class
(its name, core factory, docstring, base class, ``compile_by_default``) and, in it, one
:class:`_Arg` line per ``__init__`` argument, in signature order: the torch name, its default,
its annotation, and the core argument it becomes (the same name when not given; a tuple of names
to unpack a pair such as ``betas`` into ``b1, b2``; ``()`` when only the row's ``derive`` reads it),
with an optional ``convert`` applied to the value first. ``"*"`` starts the keyword-only
arguments; ``maximize`` (torch.optim's: :class:`CoreOptimizer` hands the core the negated
gradients), ``compile``, ``capture`` and ``capturable`` end every signature. ``params`` and
``model`` go to the base class's constructor; every other argument is a param-group entry
(``defaults``, in signature order: the ``state_dict`` layout).

*Adding a torch argument is one line:* ``_Arg("new_name", default, "annotation", "core_name")``
in the class's row, where it should stand in the signature (at the end of the positional ones, so
that existing positional calls keep their meaning). A changed core default needs no edit here
unless the torch default should follow it (torch defaults are the torch API, written out), except
``lr``: every class's ``lr`` default is read from its core factory's ``learning_rate`` (``_lr``); where
that is ``None`` (a default that depends on ``mode``), the constructor sets the mode's number, so
that learning-rate schedulers find one in each param group.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, NamedTuple, Optional, Union

import torch

import precond_ref as pr
from precond_ref._backend import compute_dtype, namespace_of
from precond_ref.linalg import auto_root_method
from precond_ref.methods.asgo import ASGO_LEARNING_RATE
from precond_ref.methods.mbf import MBF_LEARNING_RATE
from precond_ref.methods.root_free import IF_SHAMPOO_LEARNING_RATE
from precond_ref.sketch import secular_by_default

from ._keywords import check_keywords
from ._torch_core import CoreOptimizer
from ._torch_methods import _FallbackOptimizer, _MBFOptimizer, _RootFreeOptimizer

__all__ = ["CoreOptimizer", "AGD", "ASGO", "DASGO", "MBF", "RFRMSProp", "RFAdamW", "IFShampoo", "Sketchy", "SAdaGrad"]


# --------------------------------------------------------------------------------------------
# The table's machinery

_REQUIRED = inspect.Parameter.empty
#: Arguments that go to the base class's constructor, not into the param group.
_CONSTRUCTOR = ("params", "model", "compile", "capture", "capturable")
#: Where the keyword-only arguments start in a row's argument list.
_KEYWORD_ONLY = "*"


class _Arg(NamedTuple):
    """One ``__init__`` argument of a torch class: a line of the table."""

    name: str  # the torch name: a keyword of __init__ and (unless a constructor argument) a group key
    default: Any = _REQUIRED
    annotation: str = "Any"
    core: Union[str, tuple, None] = None  # core argument: None the same name; tuple: unpacked into; (): none
    convert: Optional[Callable[[Any], Any]] = None  # applied to the group's value first
    since: Optional[str] = None  # the release that added it (None: 0.1.0); older checkpoints lack it


#: torch.optim's ``maximize``: a param-group entry of every class, after the row's own arguments.
_MAXIMIZE = _Arg("maximize", False, "bool", (), since="0.3.0")
#: Every class ends with these (keyword-only), handled by :class:`CoreOptimizer`.
_OPTIONS = (
    _Arg("compile", None, "CompileSetting"), _Arg("capture", None, "Optional[bool]"), _Arg("capturable", False, "bool")
)


def _signature(arguments: tuple) -> inspect.Signature:
    """``__init__``'s signature: ``self``, the row's arguments, then ``*, compile, capture, capturable``."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    parameters = [inspect.Parameter("self", kind)]
    for arg in (*arguments, _KEYWORD_ONLY, *_OPTIONS):
        if arg == _KEYWORD_ONLY:
            kind = inspect.Parameter.KEYWORD_ONLY
            continue
        parameters.append(inspect.Parameter(arg.name, kind, default=arg.default, annotation=arg.annotation))
    return inspect.Signature(parameters)


def _core_kwargs_from(arguments: tuple, derive: Optional[Callable[[dict], dict]], owner: str) -> Callable:
    """``core_kwargs(self, group)`` of a row: each hyperparameter under its core name(s)."""
    rows = tuple(a for a in arguments if a != _KEYWORD_ONLY and a.name not in _CONSTRUCTOR)

    def core_kwargs(self: CoreOptimizer, group: dict) -> dict:
        kwargs = {}
        for arg in rows:
            value = group[arg.name]
            if arg.convert is not None:
                value = arg.convert(value)
            if isinstance(arg.core, tuple):
                if arg.core:
                    kwargs.update(zip(arg.core, _unpack(owner, arg, value)))
            else:
                kwargs[arg.core or arg.name] = value
        if derive is not None:
            kwargs.update(derive(group))
        return kwargs

    core_kwargs.__qualname__ = f"{owner}.core_kwargs"
    return core_kwargs


def _unpack(owner: str, arg: _Arg, value: Any) -> tuple:
    """``value`` (e.g. ``betas``) as as many parts as ``arg.core`` names, or an error naming it."""
    try:
        parts = tuple(value)
    except TypeError:
        parts = None
    if parts is None or len(parts) != len(arg.core):
        raise ValueError(f"{owner}: {arg.name} must hold {len(arg.core)} values ({', '.join(arg.core)}), got {value!r}")
    return parts


def _torch_class(
    name: str, core_factory: Callable, doc: str, arguments: tuple, *, base: type = CoreOptimizer,
    compile_by_default: bool = False, derive: Optional[Callable[[dict], dict]] = None,
    lr_by_mode: Optional[dict] = None,
) -> type:
    """A row of the table as a class: ``__init__`` with the row's signature (bound, then
    ``params``/``model``/``compile``/``capture``/``capturable`` to ``base``'s constructor and every other
    argument into ``defaults``, in signature order) and ``core_kwargs`` from the row's mapping.
    ``lr_by_mode``: the core's default learning rate per ``mode``, for an ``lr`` default of ``None``."""
    arguments = (*arguments, _KEYWORD_ONLY, _MAXIMIZE)
    signature = _signature(arguments)

    def __init__(self: CoreOptimizer, *args: Any, **kwargs: Any) -> None:
        check_keywords(type(self).__name__, signature, kwargs)
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        values = dict(bound.arguments)
        del values["self"]
        options = {key: values.pop(key) for key in ("model", "compile", "capture", "capturable") if key in values}
        params = values.pop("params")
        if lr_by_mode is not None and values["lr"] is None:  # the mode's default, a number for lr schedulers
            values["lr"] = lr_by_mode.get(values["mode"])
        self._build(values)  # invalid hyperparameters are refused before params is looked at, as in torch.optim
        base.__init__(self, params, values, **options)

    __init__.__signature__ = signature  # type: ignore[attr-defined]
    __init__.__qualname__ = f"{name}.__init__"

    def add_param_group(self: CoreOptimizer, param_group: dict) -> None:
        """``torch.optim.Optimizer.add_param_group``; a group's ``lr=None`` is its mode's default."""
        base.add_param_group(self, param_group)
        group = self.param_groups[-1]
        if lr_by_mode is not None and group["lr"] is None:
            group["lr"] = lr_by_mode.get(group["mode"])

    namespace = {
        "__doc__": doc,
        "__module__": __name__,
        "__qualname__": name,
        "__init__": __init__,
        "add_param_group": add_param_group,
        "core_factory": staticmethod(core_factory),
        "compile_by_default": compile_by_default,
        "core_kwargs": _core_kwargs_from(arguments, derive, name),
        "added_since_first_release": frozenset(a.name for a in arguments if isinstance(a, _Arg) and a.since),
    }
    return type(name, (base,), namespace)


# --------------------------------------------------------------------------------------------
# What some rows need beyond renaming: conversions, derived core arguments, base classes


def _agd_decay_mode(group: dict) -> dict:
    """atorch's two switches as the core's ``weight_decay_mode``: ``weight_decouple=False`` is L2
    decay (``fixed_decay`` ignored), else ``fixed_decay`` picks fixed over decoupled decay."""
    if not group["weight_decouple"]:
        return {"weight_decay_mode": "l2"}
    return {"weight_decay_mode": "fixed" if group["fixed_decay"] else "decoupled"}


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




def _float(value: Any) -> Any:
    """A learning rate stored as a tensor by some schedulers becomes a Python float."""
    return float(value) if isinstance(value, torch.Tensor) else value


# --------------------------------------------------------------------------------------------
# The table: one row per class, one line per argument, in signature order

_PARAMS = _Arg("params", _REQUIRED, "Iterable[Any]")
_MODEL = _Arg("model", None, "Optional[torch.nn.Module]")
_MODE = (_Arg("mode", "principled", "str"), _Arg("on_nonfinite", "skip", "str"))
_BETAS = ("b1", "b2")
#: ASGO's and DASGO's built-in Adam for the parameters the filter (or ``ndim < 2``) routes to it.
_FALLBACK = (
    _Arg("fallback_betas", (0.9, 0.95), "tuple[float, float]", ("fallback_b1", "fallback_b2")),
    _Arg("fallback_eps", 1e-8, "float"),
    _Arg("fallback_weight_decay", 0.0, "float"),
    _Arg("fallback_filter", None, "Optional[Callable[[str, torch.Tensor], bool]]", "fallback_mask", _FallbackByName),
)


#: The root-free methods' batch size B and the model whose forward passes can count it.
_BATCH = (_Arg("batch_size", None, "Optional[int]"), _MODEL)
_ROOT_FREE_TAIL = (
    _Arg("initial_scale", 1.0, "float"),
    _Arg("scale_by_batch_size", True, "bool"),
    _Arg("state_dtype", None, "Optional[Union[torch.dtype, str]]"),  # a dtype or its name ("float32")
    *_MODE,
)


def _lr(core_factory: Callable, annotation: str = "float") -> _Arg:
    """``lr``, defaulting to the core factory's ``learning_rate`` default (one source for both)."""
    return _Arg("lr", inspect.signature(core_factory).parameters["learning_rate"].default, annotation, "learning_rate")


AGD = _torch_class(
    "AGD", pr.agd, """AGD (Yue et al., NeurIPS 2023) as a ``torch.optim.Optimizer``; see :func:`precond_ref.agd`.

    The arguments are the authors' (atorch ``AGD``), so this is a drop-in replacement for their
    class: ``weight_decouple=True`` is decoupled decay, ``fixed_decay=True`` with it is fixed decay,
    and ``weight_decouple=False`` is L2 decay added to the gradient (``fixed_decay`` then ignored).
    """,
    (
        _PARAMS,
        _lr(pr.agd),
        _Arg("betas", (0.9, 0.999), "tuple[float, float]", _BETAS),
        _Arg("delta", 1e-5, "float"),
        _Arg("weight_decay", 0.0, "float"),
        _Arg("weight_decouple", True, "bool", ()),  # with fixed_decay: weight_decay_mode (_agd_decay_mode)
        _Arg("fixed_decay", False, "bool", ()),
        _Arg("amsgrad", False, "bool"),
        _Arg("win", False, "bool"),
        _Arg("clip", None, "Optional[float]"),
        *_MODE,
    ),
    compile_by_default=True,
    derive=_agd_decay_mode,
)

ASGO = _torch_class(
    "ASGO", pr.asgo, """ASGO (An et al., arXiv 2503.20762) as a ``torch.optim.Optimizer``; see :func:`precond_ref.asgo`.

    ``betas=(b1, b2)``: momentum and statistic EMA. ``damping``, ``eps`` and ``root_method`` set
    to ``None`` mean the mode's default. Parameters with fewer than 2 dimensions go to the built-in
    Adam (``fallback_betas``, ``fallback_eps``, ``fallback_weight_decay``, same ``lr``); pass
    named parameters (``model.named_parameters()``) and ``fallback_filter=lambda name, p: "emb" in
    name`` to route more by name, as the authors' trainer does for embeddings. ``lr=None`` is the
    core's default of the constructor's ``mode`` (0.0316 principled, the authors' 1e-2 faithful),
    set in the param groups as a number.
    """,
    (
        _PARAMS,
        _lr(pr.asgo, "Optional[float]"),  # None: ASGO_LEARNING_RATE of the mode
        _Arg("betas", (0.9, 0.8), "tuple[float, float]", _BETAS),
        _Arg("weight_decay", 0.1, "float"),
        _Arg("damping", None, "Optional[float]"),
        _Arg("eps", None, "Optional[float]"),
        _Arg("root_method", None, "Optional[str]"),
        _Arg("root_steps", 10, "int"),
        _Arg("precondition_every", None, "Optional[int]"),  # None: the core's principled default (2, spread)
        _Arg("rms_target", 0.2, "Optional[float]"),
        _Arg("accumulator", "ema", "str"),
        _Arg("side", "auto", "str"),
        _Arg("block_size", None, "Optional[int]"),
        *_FALLBACK,
        *_MODE,
        _Arg("spread_refresh", None, "Optional[bool]", since="0.2.0"),
        _KEYWORD_ONLY,
        _MODEL,
    ),
    base=_FallbackOptimizer,
    lr_by_mode=ASGO_LEARNING_RATE,
)

def _asgo_capture_refusal(self: CoreOptimizer) -> Optional[str]:
    """Principled ASGO with ``root_method="eigh"`` reads the host on CUDA: torch's eigh reads its
    status there (no ``_ex`` variant). The root a group takes is the core's choice
    (``root_method="auto"``: eigh for float64, the checked iterative root on a GPU). The iterative
    roots read nothing: a block that fails its convergence check keeps its previous root, selected
    on the device (``docs/methods/asgo.md``, D13); faithful mode's roots are unchecked; a group
    without a matrix (all on the built-in Adam by ``ndim``) roots nothing."""
    for group in self.param_groups:
        matrices = [p for p in group["params"] if p.ndim >= 2]
        if group["mode"] == "faithful" or not matrices:
            continue
        chosen = group["root_method"] or "auto"
        if (auto_root_method(matrices[0]) if chosen == "auto" else chosen) == "eigh":
            return (f"its root_method {chosen!r} calls torch's eigh, which on CUDA reads its status on the host "
                    "(root_method='polar_express' reads nothing)")
    return None


ASGO.not_capturable_because = property(_asgo_capture_refusal)  # type: ignore[assignment]


DASGO = _torch_class(
    "DASGO", pr.dasgo, """DASGO (diagonal ASGO) as a ``torch.optim.Optimizer``; see :func:`precond_ref.dasgo`.

    Arguments as :class:`ASGO`; ``eps`` sits inside the square root of the column statistic.
    """,
    (
        _PARAMS,
        _lr(pr.dasgo),
        _Arg("betas", (0.9, 0.95), "tuple[float, float]", _BETAS),
        _Arg("eps", 1e-8, "float"),
        _Arg("weight_decay", 0.1, "float"),
        _Arg("rms_target", 0.2, "Optional[float]"),
        _Arg("side", "right", "str"),
        *_FALLBACK,
        *_MODE,
        _KEYWORD_ONLY,
        _MODEL,
    ),
    base=_FallbackOptimizer,
    compile_by_default=True,  # element-wise per column: compiling fuses its passes (docs/performance.md)
)

RFRMSProp = _torch_class(
    "RFRMSProp", pr.rf_rmsprop, """RF-RMSProp (Lin et al., ICML 2024) as a ``torch.optim.Optimizer``; see :func:`precond_ref.rf_rmsprop`.

    ``alpha`` is the EMA decay (core ``b2``), as in ``torch.optim.RMSprop`` and the authors'
    ``MyRmsProp``. The learning rate is on SGD's scale (the statistic starts at 1).
    ``batch_size``: the number of examples the loss **averages** over (not summed); or pass
    ``model=`` to count it from the model's training forward passes, or ``step(batch_size=...)``.
    """,
    (
        _Arg("params", _REQUIRED, "Any"),
        _lr(pr.rf_rmsprop),
        _Arg("alpha", 0.999, "float", "b2"),
        _Arg("damping", 1e-4, "float"),
        _Arg("momentum", 0.0, "float"),
        _Arg("weight_decay", 0.0, "float"),
        *_BATCH,
        *_ROOT_FREE_TAIL,
    ),
    base=_RootFreeOptimizer,
    compile_by_default=True,
)

RFAdamW = _torch_class(
    "RFAdamW", pr.rf_adamw, """RF-AdamW — an extra, **not in the paper** (added to the authors' repository afterwards);
    see :func:`precond_ref.rf_adamw`. Batch size as in :class:`RFRMSProp`.""",
    (
        _Arg("params", _REQUIRED, "Any"),
        _lr(pr.rf_adamw),
        _Arg("betas", (0.9, 0.999), "tuple[float, float]", _BETAS),
        _Arg("damping", 1e-4, "float"),
        _Arg("weight_decay", 0.0, "float"),
        *_BATCH,
        _Arg("bias_correction", False, "bool"),
        *_ROOT_FREE_TAIL,
    ),
    base=_RootFreeOptimizer,
    compile_by_default=True,
)

IFShampoo = _torch_class(
    "IFShampoo", pr.if_shampoo, """IF-Shampoo (Lin et al., ICML 2024; SIRFShampoo) as a ``torch.optim.Optimizer``; see
    :func:`precond_ref.if_shampoo`. Matrix products only, so ``factor_dtype=torch.bfloat16`` works.

    ``batch_size``: the number of examples the loss **averages** over (not summed); or pass
    ``model=`` (SIRFShampoo's default) to count it from the model's training forward passes, or
    ``step(batch_size=...)``. ``grouping="weight_bias"`` needs parameter names: pass
    ``model.named_parameters()`` or ``model=``; a weight or bias without a gradient then takes part
    in its pair's step with a zero gradient and is left unchanged (as in :class:`MBF`).
    ``lr=None`` is the core's default of the constructor's ``mode`` (0.1 principled, SIRFShampoo's
    1e-3 faithful), set in the param groups as a number.
    """,
    (
        _Arg("params", None, "Any"),  # None: model='s parameters (_RootFreeOptimizer)
        _lr(pr.if_shampoo, "Optional[float]"),  # None: IF_SHAMPOO_LEARNING_RATE of the mode
        _Arg("momentum", 0.9, "float"),
        _Arg("preconditioner_lr", 0.01, "float", convert=_float),
        _Arg("preconditioner_momentum", 0.5, "float"),
        _Arg("damping", 1e-3, "float"),
        _Arg("weight_decay", 0.0, "float"),
        *_BATCH,
        _Arg("precondition_every", None, "Any"),
        _Arg("structures", None, "Any"),
        _Arg("max_dense_dim", None, "Optional[int]"),
        _Arg("factor_dtype", None, "Optional[Union[torch.dtype, str]]"),  # a dtype or its name, as state_dtype
        _Arg("grouping", "per_parameter", "str"),
        _Arg("preconditioner_lr_scale", None, "Optional[Callable]"),
        _Arg("kl_clip", None, "Optional[float]"),
        *_MODE,
        _Arg("block_size", None, "Optional[int]", since="0.2.0"),
        _Arg("spread_refresh", None, "Optional[bool]", since="0.2.0"),
        _Arg("factor_rounding", None, "Optional[str]", since="0.3.0"),
    ),
    base=_RootFreeOptimizer,
    lr_by_mode=IF_SHAMPOO_LEARNING_RATE,
)

MBF = _torch_class(
    "MBF", pr.mbf, """MBF, mini-block Fisher (Bahamou, Goldfarb, Ren, AISTATS 2023); see :func:`precond_ref.mbf`.

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
    ``lr=None`` is the core's default of the constructor's ``mode``, set in the param groups as a
    number: 1e-3 principled (``lr/damping``, the effective heavy-ball rate, is 1 at the defaults;
    the KL clip bounds the step), the authors' 1e-5 faithful (their values range from 1e-5 to 3e-5
    with damping 3e-4 to 3e-3).
    """,
    (
        _PARAMS,
        _lr(pr.mbf, "Any"),  # None: MBF_LEARNING_RATE of the mode
        _Arg("damping", 1e-3, "float"),
        _Arg("momentum", 0.9, "float"),
        _Arg("beta2", 0.9, "float", "b2"),
        _Arg("weight_decay", 0.0, "float"),
        _Arg("statistics_every", 10, "int"),
        _Arg("precondition_every", 100, "int"),
        _Arg("fc_blocks", None, "Optional[str]"),
        _Arg("diagonal_beta2", 0.999, "float", "diagonal_b2"),
        _Arg("diagonal_eps", 1e-8, "float"),
        _Arg("diagonal_second_moment", "momentum", "str"),
        _Arg("max_block_dim", None, "Optional[int]"),
        _MODEL,
        _Arg("kl_clip", None, "Optional[float]"),
        *_MODE,
        _Arg("block_size", None, "Optional[int]", since="0.2.0"),
        _Arg("refresh_phases", None, "Optional[int]", since="0.2.0"),
    ),
    base=_MBFOptimizer,
    lr_by_mode=MBF_LEARNING_RATE,
)

Sketchy = _torch_class(
    "Sketchy", pr.sketchy, """Sketchy / FD-Shampoo (Feinberg et al., NeurIPS 2023) as a ``torch.optim.Optimizer``; see
    :func:`precond_ref.sketchy`.

    ``beta2`` is the decay of the sketched statistics (the core's ``b2``), ``graft_beta2`` that of
    the RMSProp graft; the other arguments keep the core names.
    """,
    (
        _PARAMS,
        _lr(pr.sketchy),
        _Arg("rank", 128, "int"),
        _Arg("beta2", 0.999, "float", "b2"),
        _Arg("eps", 1e-7, "float"),
        _Arg("relative_eps", True, "bool"),
        _Arg("momentum", 0.9, "float"),
        _Arg("nesterov", True, "bool"),
        _Arg("weight_decay", 0.0, "float"),
        _Arg("graft", "rmsprop", "str"),
        _Arg("graft_beta2", 0.999, "float", "graft_b2"),
        _Arg("graft_eps", 1e-23, "float"),
        _Arg("precondition_every", None, "Optional[int]"),  # None: the core's principled default (3, spread)
        _Arg("start_preconditioning_step", 0, "int"),
        _Arg("merge_dims", 1024, "int"),
        _Arg("max_precondition_dim", 4096, "int"),
        _Arg("precondition_1d", False, "bool"),
        _Arg("block_size", None, "Optional[int]"),
        _Arg("decomposition", None, "Optional[str]"),
        _MODE[0],
        _Arg("momentum_ema", False, "bool"),
        _Arg("tail_decay", None, "Optional[str]"),
        _MODE[1],
        _Arg("spread_refresh", None, "Optional[bool]", since="0.2.0"),
    ),
)

SAdaGrad = _torch_class(
    "SAdaGrad", pr.s_adagrad, """S-AdaGrad (Feinberg et al., NeurIPS 2023): full-matrix AdaGrad with a Frequent Directions
    sketch, as a ``torch.optim.Optimizer``; see :func:`precond_ref.s_adagrad`. ``beta2`` is the
    core's ``b2`` (1 = AdaGrad's sum).""",
    (
        _PARAMS,
        _lr(pr.s_adagrad),
        _Arg("rank", 128, "int"),
        _Arg("delta", 0.0, "float"),
        _Arg("eps", None, "Optional[float]"),
        _Arg("beta2", 1.0, "float", "b2"),
        _Arg("momentum", 0.0, "float"),
        _Arg("weight_decay", 0.0, "float"),
        _Arg("block_size", None, "Optional[int]"),
        *_MODE,
        _Arg("precondition_every", None, "Optional[int]", since="0.2.0"),
        _Arg("spread_refresh", None, "Optional[bool]", since="0.2.0"),
        _Arg("decomposition", None, "Optional[str]", since="0.3.0"),
    ),
)

# torch's CUDA eigh and svd check their LAPACK status on the host (they have no ``_ex`` variant),
# and the Frequent Directions update calls one of them on every step that ``capturable=True``
# allows (intervals of 1): a capture would be invalidated, and the process's later cuSOLVER calls fail.
_FD_REFUSAL = "its Frequent Directions update calls torch's eigh or svd, which on CUDA read their status on the host"
Sketchy.not_capturable_because = _FD_REFUSAL


def _secular_sketch(p: torch.Tensor) -> bool:
    """Whether the core's ``"auto"`` takes the secular core for ``p``'s sketches (their dtype is
    ``p``'s compute dtype: float32 for bf16 and float16 parameters)."""
    xp = namespace_of(p)
    return secular_by_default(xp, xp.empty((0,), dtype=compute_dtype(xp, p.dtype), device=p.device))


def _s_adagrad_capture_refusal(self: CoreOptimizer) -> Optional[str]:
    """S-AdaGrad's FD step decomposes its core by the secular equation (no LAPACK call, no host
    read) with ``decomposition="incremental_secular"``, and with the default where the core's
    ``"auto"`` takes it (:func:`precond_ref.sketch.secular_by_default`: float32 on CUDA); any
    other group calls torch's eigh or svd."""
    def secular(group: dict) -> bool:
        if group["mode"] != "principled":
            return False
        chosen = group["decomposition"] or "auto"
        return chosen == "incremental_secular" or (
            chosen == "auto" and all(map(_secular_sketch, group["params"])))

    if all(map(secular, self.param_groups)):
        return None
    return _FD_REFUSAL + " (decomposition='incremental_secular' reads nothing)"


SAdaGrad.not_capturable_because = property(_s_adagrad_capture_refusal)  # type: ignore[assignment]
