"""The nine torch classes, pinned as the release before the table made them.

``adapters/torch.py`` generates ``AGD`` ... ``SAdaGrad`` from one table. What a user sees of a
class must not change with that: its ``inspect.signature`` (names, kinds, defaults, annotations,
recorded below from the classes written out by hand), the param-group
keys and their order (the layout of ``state_dict()["param_groups"]``), the core arguments that
``core_kwargs`` makes of the default group, the torch names errors use for core arguments, the
base classes, and that an instance pickles by the class's qualified name.
"""

from __future__ import annotations

import inspect
import pickle
import warnings

import pytest
import torch

from precond_ref.adapters import _torch_state
from precond_ref.adapters import torch as pt

P, K = inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY
REQ = inspect.Parameter.empty
#: torch.optim's ``maximize``, added to every class since 0.1.0 (a param-group entry, keyword-only).
MAXIMIZE = ("maximize", K, False, "bool")
_TAIL = (MAXIMIZE, ("compile", K, None, "CompileSetting"), ("capture", K, None, "Optional[bool]"),
         ("capturable", K, False, "bool"))
_ROOT_FREE = ("batch_size", P, None, "Optional[int]"), ("model", P, None, "Optional[torch.nn.Module]")
_FALLBACK = (
    ("fallback_betas", P, (0.9, 0.95), "tuple[float, float]"),
    ("fallback_eps", P, 1e-08, "float"),
    ("fallback_weight_decay", P, 0.0, "float"),
    ("fallback_filter", P, None, "Optional[Callable[[str, torch.Tensor], bool]]"),
    ("mode", P, "principled", "str"),
    ("on_nonfinite", P, "skip", "str"),
    ("model", K, None, "Optional[torch.nn.Module]"),
)
_MODE = (("mode", P, "principled", "str"), ("on_nonfinite", P, "skip", "str"))

#: Arguments added since the release that pinned the signatures below (0.1.0), at the end of the
#: positional ones: with :data:`MAXIMIZE` (every class's), ``added_since_first_release`` of the
#: class, absent from a 0.1.0 checkpoint.
ADDED = {
    "Sketchy": (("spread_refresh", P, None, "Optional[bool]"),),
    "SAdaGrad": (("precondition_every", P, None, "Optional[int]"), ("spread_refresh", P, None, "Optional[bool]"),
                 ("decomposition", P, None, "Optional[str]")),
    "IFShampoo": (("block_size", P, None, "Optional[int]"), ("spread_refresh", P, None, "Optional[bool]"),
                  ("factor_rounding", P, None, "Optional[str]")),
    "ASGO": (("spread_refresh", P, None, "Optional[bool]"),),
    "MBF": (("block_size", P, None, "Optional[int]"), ("refresh_phases", P, None, "Optional[int]")),
}

#: (name, kind, default, annotation) of every parameter, as main's hand-written classes had them
#: (plus :data:`ADDED`), except ``lr``, the core's default learning rate (``docs/defaults.md``).
#: The dtype arguments (``state_dtype``, ``factor_dtype``) are annotated as what they accept, a
#: dtype or its name (``"float32"``), where main's said ``Optional[torch.dtype]`` and ``Any``.
SIGNATURES = {
    "AGD": (
        ("params", P, REQ, "Iterable[Any]"), ("lr", P, 0.001, "float"),
        ("betas", P, (0.9, 0.999), "tuple[float, float]"), ("delta", P, 1e-05, "float"),
        ("weight_decay", P, 0.0, "float"), ("weight_decouple", P, True, "bool"),
        ("fixed_decay", P, False, "bool"), ("amsgrad", P, False, "bool"), ("win", P, False, "bool"),
        ("clip", P, None, "Optional[float]"), *_MODE, *_TAIL,
    ),
    "ASGO": (
        ("params", P, REQ, "Iterable[Any]"), ("lr", P, None, "Optional[float]"),
        ("betas", P, (0.9, 0.8), "tuple[float, float]"), ("weight_decay", P, 0.1, "float"),
        ("damping", P, None, "Optional[float]"), ("eps", P, None, "Optional[float]"),
        ("root_method", P, None, "Optional[str]"), ("root_steps", P, 10, "int"),
        ("precondition_every", P, None, "Optional[int]"),  # 0.1.0: 1 (now the core's principled default)
        ("rms_target", P, 0.2, "Optional[float]"),
        ("accumulator", P, "ema", "str"), ("side", P, "auto", "str"), ("block_size", P, None, "Optional[int]"),
        *_FALLBACK[:-1], *ADDED["ASGO"], _FALLBACK[-1], *_TAIL,
    ),
    "DASGO": (
        ("params", P, REQ, "Iterable[Any]"), ("lr", P, 0.01, "float"),
        ("betas", P, (0.9, 0.95), "tuple[float, float]"), ("eps", P, 1e-08, "float"),
        ("weight_decay", P, 0.1, "float"), ("rms_target", P, 0.2, "Optional[float]"), ("side", P, "right", "str"),
        *_FALLBACK, *_TAIL,
    ),
    "RFRMSProp": (
        ("params", P, REQ, "Any"), ("lr", P, 0.316, "float"), ("alpha", P, 0.999, "float"),
        ("damping", P, 0.0001, "float"), ("momentum", P, 0.0, "float"), ("weight_decay", P, 0.0, "float"),
        *_ROOT_FREE, ("initial_scale", P, 1.0, "float"), ("scale_by_batch_size", P, True, "bool"),
        ("state_dtype", P, None, "Optional[Union[torch.dtype, str]]"), *_MODE, *_TAIL,
    ),
    "RFAdamW": (
        ("params", P, REQ, "Any"), ("lr", P, 1.0, "float"), ("betas", P, (0.9, 0.999), "tuple[float, float]"),
        ("damping", P, 0.0001, "float"), ("weight_decay", P, 0.0, "float"), *_ROOT_FREE,
        ("bias_correction", P, False, "bool"), ("initial_scale", P, 1.0, "float"),
        ("scale_by_batch_size", P, True, "bool"), ("state_dtype", P, None, "Optional[Union[torch.dtype, str]]"),
        *_MODE, *_TAIL,
    ),
    "IFShampoo": (
        ("params", P, None, "Any"), ("lr", P, None, "Optional[float]"), ("momentum", P, 0.9, "float"),
        ("preconditioner_lr", P, 0.01, "float"), ("preconditioner_momentum", P, 0.5, "float"),
        ("damping", P, 0.001, "float"), ("weight_decay", P, 0.0, "float"), *_ROOT_FREE,
        ("precondition_every", P, None, "Any"), ("structures", P, None, "Any"),
        ("max_dense_dim", P, None, "Optional[int]"), ("factor_dtype", P, None, "Optional[Union[torch.dtype, str]]"),
        ("grouping", P, "per_parameter", "str"), ("preconditioner_lr_scale", P, None, "Optional[Callable]"),
        ("kl_clip", P, None, "Optional[float]"), *_MODE, *ADDED["IFShampoo"], *_TAIL,
    ),
    "MBF": (
        ("params", P, REQ, "Iterable[Any]"), ("lr", P, None, "Any"), ("damping", P, 0.001, "float"),
        ("momentum", P, 0.9, "float"), ("beta2", P, 0.9, "float"), ("weight_decay", P, 0.0, "float"),
        ("statistics_every", P, 10, "int"), ("precondition_every", P, 100, "int"),
        ("fc_blocks", P, None, "Optional[str]"), ("diagonal_beta2", P, 0.999, "float"),
        ("diagonal_eps", P, 1e-08, "float"), ("diagonal_second_moment", P, "momentum", "str"),
        ("max_block_dim", P, None, "Optional[int]"), ("model", P, None, "Optional[torch.nn.Module]"),
        ("kl_clip", P, None, "Optional[float]"), *_MODE,
        *ADDED["MBF"], *_TAIL,
    ),
    "Sketchy": (
        ("params", P, REQ, "Iterable[Any]"), ("lr", P, 0.001, "float"), ("rank", P, 128, "int"),
        ("beta2", P, 0.999, "float"), ("eps", P, 1e-07, "float"), ("relative_eps", P, True, "bool"),
        ("momentum", P, 0.9, "float"), ("nesterov", P, True, "bool"), ("weight_decay", P, 0.0, "float"),
        ("graft", P, "rmsprop", "str"), ("graft_beta2", P, 0.999, "float"), ("graft_eps", P, 1e-23, "float"),
        ("precondition_every", P, None, "Optional[int]"),  # 0.1.0: 1 (now the core's principled default)
        ("start_preconditioning_step", P, 0, "int"),
        ("merge_dims", P, 1024, "int"), ("max_precondition_dim", P, 4096, "int"),
        ("precondition_1d", P, False, "bool"), ("block_size", P, None, "Optional[int]"),
        ("decomposition", P, None, "Optional[str]"), ("mode", P, "principled", "str"),
        ("momentum_ema", P, False, "bool"), ("tail_decay", P, None, "Optional[str]"),
        ("on_nonfinite", P, "skip", "str"), *ADDED["Sketchy"], *_TAIL,
    ),
    "SAdaGrad": (
        ("params", P, REQ, "Iterable[Any]"), ("lr", P, 0.316, "float"), ("rank", P, 128, "int"),
        ("delta", P, 0.0, "float"), ("eps", P, None, "Optional[float]"), ("beta2", P, 1.0, "float"),
        ("momentum", P, 0.0, "float"), ("weight_decay", P, 0.0, "float"),
        ("block_size", P, None, "Optional[int]"), *_MODE, *ADDED["SAdaGrad"], *_TAIL,
    ),
}

#: Base classes below the class itself, and whether it compiles by default.
BASES = {
    "AGD": ("CoreOptimizer", True), "ASGO": ("CoreOptimizer", False), "DASGO": ("CoreOptimizer", True),
    "RFRMSProp": ("_RootFreeOptimizer", True), "RFAdamW": ("_RootFreeOptimizer", True),
    "IFShampoo": ("_RootFreeOptimizer", False), "MBF": ("CoreOptimizer", False),
    "Sketchy": ("CoreOptimizer", False), "SAdaGrad": ("CoreOptimizer", False),
}

#: ``core_kwargs`` of the default group (root-free classes built with ``batch_size=4``), main's,
#: except ``learning_rate`` (the core's default, ``docs/defaults.md``; ASGO's, IF-Shampoo's and MBF's
#: principled one).
CORE_KWARGS = {
    "AGD": {"learning_rate": 0.001, "b1": 0.9, "b2": 0.999, "delta": 1e-05, "weight_decay": 0.0,
            "weight_decay_mode": "decoupled", "amsgrad": False, "clip": None, "win": False},
    "ASGO": {"learning_rate": 0.0316, "b1": 0.9, "b2": 0.8, "weight_decay": 0.1, "damping": None, "eps": None,
             "root_method": None, "root_steps": 10, "precondition_every": None, "rms_target": 0.2,
             "accumulator": "ema", "side": "auto", "block_size": None, "fallback_mask": "_FallbackByName(None)",
             "fallback_b1": 0.9, "fallback_b2": 0.95, "fallback_eps": 1e-08, "fallback_weight_decay": 0.0,
             "spread_refresh": None},
    "DASGO": {"learning_rate": 0.01, "b1": 0.9, "b2": 0.95, "eps": 1e-08, "weight_decay": 0.1,
              "rms_target": 0.2, "side": "right", "fallback_mask": "_FallbackByName(None)", "fallback_b1": 0.9,
              "fallback_b2": 0.95, "fallback_eps": 1e-08, "fallback_weight_decay": 0.0},
    "RFRMSProp": {"learning_rate": 0.316, "b2": 0.999, "damping": 0.0001, "momentum": 0.0, "weight_decay": 0.0,
                  "batch_size": 4, "initial_scale": 1.0, "scale_by_batch_size": True, "state_dtype": None},
    "RFAdamW": {"learning_rate": 1.0, "b1": 0.9, "b2": 0.999, "damping": 0.0001, "weight_decay": 0.0,
                "batch_size": 4, "bias_correction": False, "initial_scale": 1.0, "scale_by_batch_size": True,
                "state_dtype": None},
    "IFShampoo": {"learning_rate": 0.1, "momentum": 0.9, "preconditioner_lr": 0.01,
                  "preconditioner_momentum": 0.5, "damping": 0.001, "weight_decay": 0.0, "batch_size": 4,
                  "precondition_every": None, "structures": None, "max_dense_dim": None, "factor_dtype": None,
                  "grouping": "per_parameter", "preconditioner_lr_scale": None, "kl_clip": None,
                  "block_size": None, "spread_refresh": None, "factor_rounding": None},
    "MBF": {"learning_rate": 0.001, "damping": 0.001, "momentum": 0.9, "b2": 0.9, "weight_decay": 0.0,
            "statistics_every": 10, "precondition_every": 100, "fc_blocks": None, "diagonal_b2": 0.999,
            "diagonal_eps": 1e-08, "diagonal_second_moment": "momentum", "max_block_dim": None, "kl_clip": None,
            "block_size": None, "refresh_phases": None},
    "Sketchy": {"learning_rate": 0.001, "rank": 128, "b2": 0.999, "eps": 1e-07, "relative_eps": True,
                "momentum": 0.9, "nesterov": True, "weight_decay": 0.0, "graft": "rmsprop", "graft_b2": 0.999,
                "graft_eps": 1e-23, "precondition_every": None, "start_preconditioning_step": 0, "merge_dims": 1024,
                "max_precondition_dim": 4096, "precondition_1d": False, "block_size": None, "decomposition": None,
                "momentum_ema": False, "tail_decay": None, "spread_refresh": None},
    "SAdaGrad": {"learning_rate": 0.316, "rank": 128, "delta": 0.0, "eps": None, "b2": 1.0, "momentum": 0.0,
                 "weight_decay": 0.0, "block_size": None, "precondition_every": None, "spread_refresh": None,
                 "decomposition": None},
}
for _kwargs in CORE_KWARGS.values():
    _kwargs.update(mode="principled", on_nonfinite="skip")

#: core argument -> torch argument, as error messages translate them (main's).
TORCH_NAMES = {
    "AGD": {"learning_rate": "lr", "b1": "betas[0]", "b2": "betas[1]"},
    "ASGO": {"learning_rate": "lr", "b1": "betas[0]", "b2": "betas[1]", "fallback_b1": "fallback_betas[0]",
             "fallback_b2": "fallback_betas[1]"},
    "DASGO": {"learning_rate": "lr", "b1": "betas[0]", "b2": "betas[1]", "fallback_b1": "fallback_betas[0]",
              "fallback_b2": "fallback_betas[1]"},
    "RFRMSProp": {"learning_rate": "lr", "b2": "alpha"},
    "RFAdamW": {"learning_rate": "lr", "b1": "betas[0]", "b2": "betas[1]"},
    "IFShampoo": {"learning_rate": "lr"},
    "MBF": {"learning_rate": "lr", "b2": "beta2", "diagonal_b2": "diagonal_beta2"},
    "Sketchy": {"learning_rate": "lr", "b2": "beta2", "graft_b2": "graft_beta2"},
    "SAdaGrad": {"learning_rate": "lr", "b2": "beta2"},
}


def _build(name: str) -> pt.CoreOptimizer:
    p = torch.nn.Parameter(torch.zeros(2, 3, dtype=torch.float64))
    extra = {"batch_size": 4} if name in ("RFRMSProp", "RFAdamW", "IFShampoo") else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MBF's (the one weight has no bias)
        return getattr(pt, name)([("w", p)], **extra)


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_signature_is_mains(name):
    """Every parameter's name, kind, default and annotation, in order, as main's hand-written
    ``__init__`` had it (the table must present the very same signature)."""
    got = tuple(
        (p.name, p.kind, p.default, p.annotation) for p in inspect.signature(getattr(pt, name)).parameters.values()
    )
    assert got == SIGNATURES[name]
    assert [type(d) for *_, d, _ in got] == [type(d) for *_, d, _ in SIGNATURES[name]]  # 0 is not 0.0


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_param_group_layout_and_core_arguments_are_mains(name):
    """The default param group's keys in main's order (what ``state_dict()`` stores), what
    ``core_kwargs`` makes of it, and the torch names that errors put for core names."""
    opt = _build(name)
    group = opt.param_groups[0]
    expected_keys = [s[0] for s in SIGNATURES[name] if s[0] not in ("params", "model", "compile", "capture", "capturable")]
    assert [k for k in group if k not in ("params", "param_names")] == expected_keys
    assert list(opt.defaults) == expected_keys
    got = opt.core_kwargs(group)
    got = {k: repr(v) if k == "fallback_mask" else v for k, v in got.items()}
    assert got == CORE_KWARGS[name]
    assert _torch_state.torch_names(opt.core_kwargs, group) == TORCH_NAMES[name]


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_class_bases_module_and_pickling(name):
    """Importable by qualified name (``precond_ref.adapters.torch.ASGO``), the same bases and
    compile default as main, and a pickled optimizer comes back as an instance of the class."""
    cls = getattr(pt, name)
    assert (cls.__module__, cls.__qualname__, cls.__name__) == ("precond_ref.adapters.torch", name, name)
    base, compiles = BASES[name]
    assert base in [c.__name__ for c in cls.__mro__[1:]] and issubclass(cls, pt.CoreOptimizer)
    assert cls.compile_by_default is compiles
    opt = _build(name)
    copy = pickle.loads(pickle.dumps(opt))
    assert type(copy) is cls
    assert copy.state_dict()["param_groups"] == opt.state_dict()["param_groups"]


def test_positional_arguments_land_in_their_group_entries():
    """Positional arguments bind by the pinned order (the table's), keyword-only ones refuse
    positions: ``ASGO(params, 0.5, (0.8, 0.7))`` sets ``lr`` and ``betas``; ``model`` after ``on_nonfinite``
    is keyword-only for ASGO, positional (8th) for RF-RMSProp."""
    p = torch.nn.Parameter(torch.zeros(2, 3, dtype=torch.float64))
    opt = pt.ASGO([p], 0.5, (0.8, 0.7))
    assert (opt.defaults["lr"], opt.defaults["betas"]) == (0.5, (0.8, 0.7))
    with pytest.raises(TypeError):
        pt.ASGO([p], *[None] * 20)  # 19 group entries + params: a 21st positional is one too many
    model = torch.nn.Linear(3, 2)
    rf = pt.RFRMSProp(model.parameters(), 0.1, 0.99, 1e-4, 0.0, 0.0, 8, model)
    assert rf.defaults["batch_size"] == 8 and rf._model_names == {q: n for n, q in model.named_parameters()}
    with pytest.raises(TypeError, match="unexpected keyword|got an unexpected"):
        pt.AGD([p], model=model)


@pytest.mark.parametrize("betas", [(0.9,), (0.9, 0.99, 0.999), 0.9])
def test_a_pair_of_the_wrong_length_names_the_argument(betas):
    """A torch argument the table unpacks into several core arguments (``betas`` -> ``b1, b2``)
    must hold exactly that many values; otherwise the error names the class and the argument."""
    p = torch.nn.Parameter(torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"AGD: betas must hold 2 values \(b1, b2\)"):
        pt.AGD([p], betas=betas)


def test_defaults_torch_adds_on_restore_are_neither_kept_nor_asked_of_a_checkpoint():
    """torch's ``Optimizer.__setstate__`` adds ``differentiable`` to ``defaults``
    (``_torch_state.TORCH_ADDED_DEFAULTS``). A deep copy keeps the original's defaults, and an
    optimizer that has the entry (restored by torch's own ``__setstate__``, as a wrapper may do)
    still loads a scheduler's checkpoint, whose group has ``initial_lr`` and lacks ``differentiable``
    (a group with unknown keys that lacks a known one is otherwise refused as another optimizer's)."""
    import copy

    p = torch.nn.Parameter(torch.ones(2, 3, dtype=torch.float64))
    opt = pt.AGD([("w", p)], compile=False)
    assert "differentiable" not in copy.deepcopy(opt).defaults
    p.grad = torch.ones_like(p)
    opt.step()
    saved = opt.state_dict()
    saved["param_groups"][0]["initial_lr"] = 1e-3  # as torch's LR schedulers store it
    restored = pt.AGD([("w", torch.nn.Parameter(torch.ones(2, 3, dtype=torch.float64)))], compile=False)
    torch.optim.Optimizer.__setstate__(restored, dict(restored.__dict__))
    assert "differentiable" in restored.defaults
    restored.load_state_dict(saved)
    assert restored.param_groups[0]["initial_lr"] == 1e-3
    assert torch.equal(restored.state[restored.param_groups[0]["params"][0]]["step"], opt.state[p]["step"])


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_a_checkpoint_of_the_first_release_loads_without_the_added_arguments(name):
    """A param group saved by 0.1.0 lacks the arguments added since (:data:`ADDED`, and
    :data:`MAXIMIZE` in every class); with a scheduler's ``initial_lr`` beside them it is still this
    class's checkpoint, not another optimizer's, and the added arguments keep the loading
    optimizer's values."""
    added = (*ADDED.get(name, ()), MAXIMIZE)
    opt = _build(name)
    assert opt.added_since_first_release == {a[0] for a in added}
    saved = opt.state_dict()
    for arg in added:
        del saved["param_groups"][0][arg[0]]
    saved["param_groups"][0]["initial_lr"] = 1e-3
    restored = _build(name)
    restored.load_state_dict(saved)
    group = restored.param_groups[0]
    assert group["initial_lr"] == 1e-3
    assert all(group[arg[0]] == arg[2] for arg in added)


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_an_optimizer_pickled_by_the_first_release_steps_with_the_added_arguments_defaults(name):
    """An optimizer pickled by 0.1.0 lacks the arguments added since (:data:`ADDED`, and
    :data:`MAXIMIZE`) in ``defaults`` and its param groups; unpickled, it takes their defaults in
    both (in signature order), as torch's ``__setstate__`` gives its optimizers ``maximize=False``,
    and steps as the optimizer it was pickled from (it raised ``KeyError`` at the step)."""
    import copy

    added = [a[0] for a in (*ADDED.get(name, ()), MAXIMIZE)]
    opt = _build(name)
    p = opt.param_groups[0]["params"][0]
    p.grad = torch.ones_like(p)
    opt.step()
    state = copy.deepcopy(opt.__getstate__())
    for entries in (state["defaults"], *state["param_groups"]):
        for key in added:
            del entries[key]
    old = object.__new__(type(opt))
    old.__setstate__(state)
    assert list(old.defaults) == list(opt.defaults)
    assert list(old.param_groups[0]) == list(opt.param_groups[0])
    q = old.param_groups[0]["params"][0]
    q.grad = torch.full_like(q, 0.5)
    p.grad = torch.full_like(p, 0.5)
    old.step()
    opt.step()
    assert torch.equal(q, p)
