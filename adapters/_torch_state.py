"""The torch adapter's contracts outside the step: construction, copies and checkpoints.

:class:`~precond_ref.adapters.torch.CoreOptimizer` delegates here for

* parameter names (``model.named_parameters()``, torch's ``param_names``), the core path a name
  becomes (:func:`param_path`) and the nested tree of paths (:func:`nest`),
* ``copy.deepcopy`` and pickling (``__getstate__`` / ``__setstate__``),
* ``state_dict`` (callable hyperparameters are configuration and stay out of it),
* a validating, atomic ``load_state_dict``,
* error messages that name the torch argument (``lr``) rather than the core's (``learning_rate``).

This module imports nothing of the adapter's (it sits below ``_torch_core``): what it needs of an
optimizer class, it is given — ``load_state_dict`` a *builder* (param group -> core transform),
``build_transform`` the class's core factory and ``core_kwargs``.

What a checkpoint holds (``state_dict()``): torch's layout, ``{"state": {index: entries},
"param_groups": [...]}``. Every parameter's entries have ``"step"`` and ``"nonfinite_count"``
(0-D int32 tensors), ``"calls"`` (the number of ``step`` calls it took part in, a Python int) and,
on the first parameter of each core group, ``"core_group": True`` and that group's state tensors;
where that parameter does not require grad and another member of its block does (a frozen weight
with a trained bias), on that member (:func:`heads_on_trainable_members`: torch DCP leaves out
the state of a parameter that does not require grad). ``load_state_dict`` takes either layout.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import re
from collections import defaultdict
from collections.abc import Iterable
from typing import Any, Callable, Iterator, Optional

import torch

from precond_ref.engine.layout import layer_member
from precond_ref.tree import path_str

STEP, NONFINITE = "step", "nonfinite_count"
CALLS, HEAD = "calls", "core_group"
BOOKKEEPING = (STEP, NONFINITE, CALLS, HEAD)
#: Entries with which ``torch_distributed``'s split classes mark their checkpoints (the tokens of
#: the optimizer that saved the counters and a block's state); any class loads such a checkpoint
#: without them.
MARKS = ("counters_saved_by", "state_saved_by")
# torch.optim.Optimizer's own attributes: hooks are not copied (as for torch's optimizers).
_TORCH_TRANSIENT = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
                    "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
                    "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks")
#: Attributes an ``lr_scheduler`` sets on the optimizer it schedules: ``step``, a wrapper of the
#: bound ``step`` holding a weak reference to that optimizer (copied, it would step the original),
#: and its flag ``_opt_called``. torch's optimizers do not copy them either.
_SCHEDULER_ATTRIBUTES = ("step", "_opt_called")
#: Entries that torch's ``Optimizer.__setstate__`` adds to ``defaults`` of an optimizer restored
#: from a pickle or a deep copy (accelerate's ``prepare`` makes one). They are not this adapter's
#: hyperparameters: :func:`setstate` drops them again (a copy keeps the original's defaults) and
#: :func:`load_state_dict` does not ask a checkpoint for them.
TORCH_ADDED_DEFAULTS = ("differentiable",)


# --------------------------------------------------------------------------------------------
# construction: parameters and their names


def param_groups_from(params: Any) -> list[dict]:
    """``params`` as a list of param-group dicts, names left as torch's ``(name, tensor)`` pairs.

    torch's ``add_param_group`` then moves the names into the group's ``"param_names"`` (so
    ``state_dict()`` keeps them, as for ``torch.optim.Adam``) and raises when some parameters of a
    group are named and others are not.
    """
    # torch's own messages (its optimizer test suite matches them)
    if isinstance(params, torch.Tensor) or not isinstance(params, Iterable):
        raise TypeError(
            "params argument given to the optimizer should be an iterable of Tensors or dicts, but got "
            + (torch.typename(params) if isinstance(params, torch.Tensor) else type(params).__name__)
            + " (iterables of (name, tensor) pairs name the parameters)"
        )
    if isinstance(params, set):
        raise TypeError("optimizer parameters need to be organized in ordered collections (not a set)")
    groups = list(params)
    if not groups:
        raise ValueError("optimizer got an empty parameter list")
    if not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    return [dict(group) for group in groups]


def check_tensor_lr(lr: Any) -> None:
    """A tensor ``lr`` holds one number (torch's check and message, as ``torch.optim.Adam``'s)."""
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")


def names_from_groups(groups: list[dict], base: Optional[dict] = None) -> dict:
    """tensor -> dotted name, from each group's ``param_names`` over ``base`` (e.g. ``model=``)."""
    names = dict(base or {})
    for group in groups:
        for name, tensor in zip(group.get("param_names", ()), group["params"]):
            names[tensor] = name
    return names


def param_path(names: dict, inputs_first: frozenset, p: torch.Tensor, index: int) -> tuple:
    """The core path of parameter ``p``, the ``index``-th of the optimizer: its dotted name split
    (``"fc1.weight"`` -> ``("fc1", "weight")``, which is what weight/bias pairing reads), or
    ``("param<index>",)`` when it has none. A weight in ``inputs_first`` (inputs x outputs, as
    transformers' ``Conv1D``) is named ``"kernel"``, the core's name for an out-last weight, which
    the core reads by the last key: ``("fc1", "kernel")``, also for the tensor a parametrization
    computes such a weight from (``"fc1.parametrizations.weight.original"``, see
    :func:`precond_ref.engine.layout.layer_member`)."""
    name = names.get(p)
    if not name:
        return (f"param{index}",)
    path = tuple(name.split("."))
    if p in inputs_first:
        layer, member = layer_member(path)
        if member == "weight":
            return layer + ("kernel",)
    return path


def nest(paths: list[tuple], leaves: list[Any]) -> dict:
    """The nested dict that holds each leaf at its path; names that clash (one a prefix of
    another, or two the same) raise ``ValueError`` naming the dotted name."""
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


def param_label(names: dict, p: torch.Tensor, index: int, own: Optional[dict] = None) -> str:
    """How errors name a parameter: its name when known, else its index in ``state_dict()``.
    ``own``: the optimizer's names where ``names`` are a checkpoint's (``load_state_dict`` takes
    the checkpoint's ``param_names``, as torch does): a parameter the two name differently is named
    as ``named_parameters()`` names it, with the checkpoint's name beside it."""
    name = names.get(p)
    mine = own.get(p) if own is not None else None
    if mine and name and mine != name:
        return f"parameter {mine!r} (index {index}; {name!r} in the checkpoint)"
    return f"parameter {name!r} (index {index})" if name else f"parameter {index}"


# --------------------------------------------------------------------------------------------
# torch argument names in error messages


class _Probe:
    """Stands in for a torch hyperparameter to see which core argument ``core_kwargs`` maps it to."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __bool__(self) -> bool:
        return True


def torch_names(core_kwargs: Callable[[dict], dict], group: dict) -> dict[str, str]:
    """core argument name -> torch argument name, found by running ``core_kwargs`` on probes."""
    probe: dict[str, Any] = {}
    for key, value in group.items():
        if key in ("params", "param_names"):
            continue
        if isinstance(value, tuple) and 0 < len(value) <= 4:
            probe[key] = tuple(_Probe(f"{key}[{i}]") for i in range(len(value)))
        else:
            probe[key] = _Probe(key)
    try:
        kwargs = core_kwargs(probe)
    except Exception:  # a core_kwargs that computes with the values: no translation
        return {}
    return {core: value.name for core, value in kwargs.items() if isinstance(value, _Probe) and value.name != core}


def translate_error(message: str, names: dict[str, str]) -> str:
    """``message`` with every core argument name of ``names`` replaced by the torch one."""
    for core in sorted(names, key=len, reverse=True):
        message = re.sub(rf"(?<![\w.\[]){re.escape(core)}(?![\w\[])", names[core], message)
    return message


def paths_named_like_torch(message: str, names: dict[str, str]) -> str:
    """``message`` with each quoted core path string of ``names`` (``'fc1/weight'``, as the core's
    errors name a leaf) replaced by the quoted torch name (``'fc1.weight'``, as ``named_parameters()``
    gives it)."""
    for path in sorted(names, key=len, reverse=True):
        message = message.replace(repr(path), repr(names[path]))
    return message


@contextlib.contextmanager
def torch_names_in_errors(names: Callable[[], dict[str, str]]) -> Iterator[None]:
    """A ``ValueError`` or ``TypeError`` of the core raised within names its parameters as torch
    does (:func:`paths_named_like_torch` with ``names()``, made only for an error)."""
    try:
        yield
    except (ValueError, TypeError) as error:
        message = paths_named_like_torch(str(error), names()) if type(error) in (ValueError, TypeError) else str(error)
        if message == str(error):
            raise
        raise type(error)(message) from error


def build_transform(core_factory: Callable[..., Any], core_kwargs: Callable[[dict], dict], group: dict,
                    **overrides: Any) -> Any:
    """``core_factory(**core_kwargs(group), **overrides)``; invalid values raise naming the torch argument."""
    try:
        return core_factory(**{**core_kwargs(group), **overrides})
    except (ValueError, TypeError) as error:
        message = translate_error(str(error), torch_names(core_kwargs, group))
        if message == str(error):
            raise
        raise type(error)(message) from error


def check_learning_rate(owner: str, lr: Any) -> None:
    """A Python ``lr`` written into a param group (by a scheduler or by hand) is a non-negative number."""
    from precond_ref.transform import check_learning_rate as check

    try:
        check("lr", lr)
    except ValueError as error:
        raise ValueError(f"{owner}: {error}") from None


# --------------------------------------------------------------------------------------------
# deepcopy / pickle


def getstate(opt: torch.optim.Optimizer) -> dict:
    """torch's ``defaults``/``state``/``param_groups`` plus the adapter's own attributes.

    Compiled transforms (``_transforms`` and the names in ``_transient_attributes``) are rebuilt
    on first use; hooks and a scheduler's wrapper of ``step`` are not copied, as for torch's
    optimizers.
    """
    skip = set(_TORCH_TRANSIENT) | set(_SCHEDULER_ATTRIBUTES) | set(opt._transient_attributes)
    return {k: v for k, v in opt.__dict__.items() if k not in skip}


def setstate(opt: torch.optim.Optimizer, state: dict) -> None:
    """torch's ``__setstate__``, less the :data:`TORCH_ADDED_DEFAULTS` it adds (a copy keeps the
    original's defaults); the transient attributes start empty. An optimizer pickled by a release
    before an argument was added (``added_since_first_release``) takes that argument's default in
    ``defaults`` and every param group, as torch's own ``__setstate__`` gives its optimizers
    ``maximize=False``."""
    added = [k for k in TORCH_ADDED_DEFAULTS if k not in state.get("defaults", {})] if "defaults" in state else []
    torch.optim.Optimizer.__setstate__(opt, state)
    for key in added:
        opt.defaults.pop(key, None)
    table = next((c for c in type(opt).__mro__ if "added_since_first_release" in vars(c)), None)
    if table is not None:
        for name, parameter in inspect.signature(table.__init__).parameters.items():
            if name in table.added_since_first_release:
                opt.defaults.setdefault(name, parameter.default)
                for group in opt.param_groups:
                    group.setdefault(name, parameter.default)
    opt.__dict__.setdefault("_param_names", names_from_groups(opt.param_groups))
    opt.__dict__.setdefault("_behind", set())
    for name in opt._transient_attributes:
        setattr(opt, name, {})


# --------------------------------------------------------------------------------------------
# state_dict / load_state_dict


def strip_callables(state_dict: dict) -> dict:
    """Drop callable hyperparameters (``fallback_filter``, schedules, ...) from the param groups.

    They are configuration, not state (and lambdas cannot be pickled); ``load_state_dict`` keeps
    the loading optimizer's own value for every hyperparameter a checkpoint lacks.
    """
    groups = []
    for group in state_dict["param_groups"]:
        groups.append({k: v for k, v in group.items() if not (callable(v) and not isinstance(v, torch.Tensor))})
    return {**state_dict, "param_groups": groups}


def heads_on_trainable_members(state_dict: dict, blocks: list) -> dict:
    """``state_dict`` with the state of each block in ``blocks`` (``(index, requires_grad)`` of its
    members, the first member first) whose first member does not require grad moved onto its first
    member that does, marked ``"core_group"``; the first member keeps its counters.

    torch DCP's ``set_state_dict`` hands ``load_state_dict`` no state for a parameter that does not
    require grad, so a block's state held by a frozen weight (a frozen weight with a trained bias, as
    BitFit trains) would be lost; :func:`load_state_dict` moves it back onto the first member, where
    the step keeps it. The optimizer's own state is not changed: the entries of the two members are
    new dicts holding the same tensors."""
    if not blocks:
        return state_dict
    state = dict(state_dict["state"])
    for (head, head_trains), *others in blocks:
        entries = state.get(head)
        if head_trains or not entries or not entries.get(HEAD):
            continue
        holder = next((i for i, trains in others if trains and state.get(i)), None)
        if holder is None:
            continue
        state[head] = {k: v for k, v in entries.items() if k in BOOKKEEPING and k != HEAD}
        state[holder] = {**state[holder], HEAD: True, **{k: v for k, v in entries.items() if k not in BOOKKEEPING}}
    return {**state_dict, "state": state}


def _counter(value: Any, what: str) -> int:
    """A saved counter (0-D tensor, or a Python number in older checkpoints) as a Python int, read
    from the checkpoint's tensor (the parameters' device may hold no values: the meta device)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{what} must be a single number, got a tensor of shape {tuple(value.shape)}")
        number = value.detach().reshape(()).item()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = value
    else:
        raise ValueError(f"{what} must be a number, got {type(value).__name__}")
    if not math.isfinite(number) or number < 0 or number != int(number):
        raise ValueError(f"{what} must be a non-negative integer, got {number!r}")
    return int(number)


def load_state_dict(opt: torch.optim.Optimizer, state_dict: dict, build: Callable[[dict], Any],
                    before_commit: Optional[Callable[[], None]] = None) -> None:
    """Validate ``state_dict`` completely, then load it into ``opt``; on any error nothing changes.

    ``build(group)`` makes a param group's core transform (raising ``ValueError``/``TypeError``
    that names the torch argument for invalid hyperparameters): the optimizer's own, given here
    so that this module needs nothing of the optimizer's class. ``before_commit()``, when given,
    runs after every check and before anything of ``opt`` changes; raising there refuses the load
    (``torch_distributed``'s classes agree there with the other ranks that each could load).

    Checks, each error naming the parameter: the number and sizes of param groups; param-group
    keys this class does not take are kept (as torch keeps them: schedulers store ``initial_lr`` and
    others there), unless the group also lacks one this class takes (another optimizer's); a group that
    holds another class's hyperparameters is refused naming that class (:func:`saved_by`); for every parameter that has
    been stepped, the counters, and the core group state that a step would read — every entry
    present, no extra entries, shapes as the optimizer's own ``init`` makes them (a transposed
    statistic is rejected), finite values. Tensors are copied onto the parameter's device in the
    dtype ``init`` uses (so float32 state of bf16 parameters stays float32). Hyperparameters
    the checkpoint lacks (callables, which ``state_dict`` leaves out, or ones added in a later
    version) keep the loading optimizer's value. Load hooks run as in torch: pre-hooks on the
    incoming dict before validation, post-hooks after the state is in place.
    """
    cls = type(opt).__name__
    state_dict = state_dict.copy()
    for pre_hook in opt._optimizer_load_state_dict_pre_hooks.values():
        result = pre_hook(opt, state_dict)
        if result is not None:
            state_dict = result
    where = f"{cls}.load_state_dict"
    if not isinstance(state_dict, dict) or "param_groups" not in state_dict or "state" not in state_dict:
        raise ValueError(f"{where}: expected a dict with 'state' and 'param_groups' (from state_dict())")
    saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(
            f"{where}: loaded state dict has a different number of parameter groups "
            f"({len(saved_groups)}, the optimizer has {len(opt.param_groups)})"
        )

    # Param-group keys this class does not take are kept, as torch keeps them: learning-rate
    # schedulers store theirs there (``initial_lr``; OneCycleLR's ``max_lr``, ``min_lr``,
    # ``max_momentum``, ``base_momentum``; SWALR's ``swa_lr``) and read them back after a resume.
    # A group that has such keys *and* lacks one this class takes (other than callables, which
    # ``state_dict`` leaves out) is another optimizer's: refused.
    allowed = set(opt.defaults) | {"params", "param_names"}
    expected = {
        k for k, v in opt.defaults.items()
        if k not in TORCH_ADDED_DEFAULTS and not (callable(v) and not isinstance(v, torch.Tensor))
        and k not in getattr(opt, "added_since_first_release", ())  # an older checkpoint lacks these
    }
    new_groups = []
    for gi, (saved, group) in enumerate(zip(saved_groups, opt.param_groups)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"{where}: loaded state dict contains a parameter group that doesn't match the size of "
                f"optimizer's group (group {gi}: {len(saved['params'])} parameters, expected {len(group['params'])})"
            )
        unknown, lacking = sorted(set(saved) - allowed), sorted(expected - set(saved))
        saver = saved_by(opt, saved)
        has = f"has {unknown}, which {cls} does not take" if unknown else ""
        lacks = f"lacks {lacking}, which {cls} takes" if lacking else ""
        if saver is not None:
            raise ValueError(
                f"{where}: the state_dict was saved by {saver}, not {cls} (param group {gi} holds {saver}'s "
                f"hyperparameters: it {', and '.join(filter(None, (has, lacks)))})"
            )
        if unknown and lacking:
            raise ValueError(f"{where}: param group {gi} {has}, and {lacks}; the state_dict was saved by another optimizer")
        new = {k: v for k, v in group.items() if k != "params"}
        new.update({k: copy.deepcopy(v) for k, v in saved.items() if k != "params"})
        new["params"] = group["params"]
        new_groups.append(new)
    base = {p: n for p, n in opt._param_names.items()}
    names = names_from_groups(new_groups, base)

    # Every param group's hyperparameters must build a transform (errors name torch arguments).
    # Paths as the step will see them, under the loaded names.
    inputs_first = getattr(opt, "_inputs_first", frozenset())
    path_of = lambda p, i: param_path(names, inputs_first, p, i)  # noqa: E731
    transforms = []
    for gi, group in enumerate(new_groups):
        try:
            transforms.append(build(group))
        except (ValueError, TypeError) as error:
            unknown = sorted(set(saved_groups[gi]) - allowed)
            foreign = (f" (the group also has {unknown}, which {cls} does not take: a state_dict of another optimizer?)"
                       if unknown else "")
            raise type(error)(f"{where}: param group {gi}: {error}{foreign}") from error
    # The checkpoint's names (torch's load takes them) key each group's tree: two alike could not step.
    first = 0
    for gi, group in enumerate(new_groups):
        try:
            nest([path_of(p, first + k) for k, p in enumerate(group["params"])], group["params"])
        except ValueError as error:
            raise ValueError(f"{where}: param group {gi}: {error} (the checkpoint's param_names)") from None
        first += len(group["params"])

    id_map = {}
    for saved, group in zip(saved_groups, new_groups):
        id_map.update(zip(saved["params"], group["params"]))
    new_state: defaultdict = defaultdict(dict)
    for key, value in saved_state.items():
        if key not in id_map:
            new_state[key] = value  # not a parameter's state: kept as is (torch does the same)

    hint = ""
    if any(("param_names" in saved) != ("param_names" in group) for saved, group in zip(saved_groups, opt.param_groups)):
        hint = (" (the checkpoint and this optimizer differ in having parameter names, and names decide "
                "which weights and biases form one block)")
    index = 0
    behind = set()
    counts: dict = {}  # each loaded parameter's (step, nonfinite_count)
    for group, transform in zip(new_groups, transforms):
        by_calls: dict[int, list] = {}
        first, absent = index, []
        for saved_id, p in zip(_saved_ids(saved_groups, new_groups, group), group["params"]):
            label = param_label(names, p, index, opt._param_names)
            entries = saved_state.get(saved_id)
            if not entries and not p.requires_grad:
                absent.append((index, p))  # torch DCP leaves out the state of a frozen parameter
            if entries:
                entries = {k: v for k, v in entries.items() if k not in MARKS}
                if STEP not in entries:
                    raise ValueError(f"{where}: the state of {label} lacks 'step'")
                # torch's rule for 'step' (not cast to the parameter's dtype); on the parameter's
                # device, where the step's counters live.
                counts[p] = (_counter(entries[STEP], f"{where}: 'step' of {label}"),
                             _counter(entries.get(NONFINITE, 0), f"{where}: 'nonfinite_count' of {label}"))
                entries[STEP], entries[NONFINITE] = (torch.tensor(n, dtype=torch.int32, device=p.device) for n in counts[p])
                calls = entries.get(CALLS, counts[p][0])
                if isinstance(calls, torch.Tensor):
                    calls = int(calls.item())
                if isinstance(calls, bool) or not isinstance(calls, int) or calls < 0:
                    raise ValueError(f"{where}: 'calls' of {label} must be an integer >= 0, got {calls!r}")
                entries[CALLS] = calls
                by_calls.setdefault(calls, []).append((index, p, label, entries))
                new_state[p] = entries
            index += 1
        if absent:
            for i, p, label, entries in _frozen_members(path_of, transform, group["params"], first, absent, by_calls, names):
                counts[p] = (0, 0)
                new_state[p] = entries
        for calls, members in by_calls.items():
            behind.update(_held_back([(m[1], counts[m[1]]) for m in members]))
            if calls == 0 and not any(m[3].get(HEAD) for m in members):
                continue  # counters only: the first step makes the state
            # stepped, or warm-started (MBF.warm_start: state made before the first call)
            _check_core_state(path_of, transform, members, where, hint)

    if before_commit is not None:
        before_commit()
    # Commit: nothing above touched the optimizer.
    opt.__setstate__({"state": new_state, "param_groups": new_groups})
    opt._param_names = names
    opt._behind = behind
    opt._transforms.clear()
    for post_hook in opt._optimizer_load_state_dict_post_hooks.values():
        post_hook(opt)


#: ``__init__`` arguments of a table class that are not param-group entries.
_NOT_HYPERPARAMETERS = ("self", "params", "model", "compile", "capture", "capturable")


def _rows(opt: torch.optim.Optimizer) -> dict[str, tuple[frozenset, frozenset]]:
    """The optimizer classes of ``opt``'s adapter (the table rows of ``adapters/torch.py``: the
    classes below ``opt``'s base class that define ``added_since_first_release``), each as its
    name -> (the param-group keys it takes, those a checkpoint of it may lack: keys added since the
    first release and ones that may hold a callable, which ``state_dict`` leaves out)."""
    root = [c for c in type(opt).__mro__ if issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer][-1]
    rows, todo = {}, [root]
    while todo:
        c = todo.pop()
        todo.extend(c.__subclasses__())
        if "added_since_first_release" not in vars(c) or c.__name__ in rows:
            continue
        params = inspect.signature(c.__init__).parameters
        keys = frozenset(params) - set(_NOT_HYPERPARAMETERS)
        optional = set(c.added_since_first_release) | {"lr"} | {
            k for k in keys if "Callable" in str(params[k].annotation) or str(params[k].annotation) == "Any"}
        rows[c.__name__] = (keys, frozenset(optional))
    return rows


def saved_by(opt: torch.optim.Optimizer, group: dict) -> Optional[str]:
    """The name of the other optimizer class of the adapter whose hyperparameters a checkpoint's param
    ``group`` holds, where that is not ``opt``'s class, else ``None``.

    A class's checkpoint has every key the class takes (less ones it may lack: :func:`_rows`), and
    none of another class's that it does not take (a scheduler's ``initial_lr`` is no class's). Of
    the classes that fit, the one that lacks the fewest keys (DASGO's keys are a part of ASGO's: a
    DASGO checkpoint fits both, lacking none of DASGO's)."""
    own = next((c.__name__ for c in type(opt).__mro__ if "added_since_first_release" in vars(c)), None)
    if own is None:  # a class of its own, not of the table: its checkpoints are not told apart here
        return None
    rows = _rows(opt)
    saved = set(group) - {"params", "param_names"}
    known = set().union(*(keys for keys, _ in rows.values())) if rows else set()
    fits = sorted(
        (len(keys - saved), name) for name, (keys, optional) in rows.items()
        if saved & known <= keys and keys - saved <= optional
    )
    if not fits or fits[0][1] == own or (len(fits) > 1 and fits[1][0] == fits[0][0]):
        return None
    return fits[0][1]


def _frozen_members(path_of: Any, transform: Any, params: list, first: int, absent: list, by_calls: dict,
                    names: dict) -> list:
    """The counters of the parameters ``absent`` (``(index, parameter)``: they do not require grad
    and the checkpoint has no state for them, as torch DCP's ``set_state_dict`` leaves out) that
    are members of a block (a weight paired with its bias) whose other members' state was loaded,
    added to ``by_calls`` beside those members; returns their ``(index, parameter, label, entries)``.

    Such a member took part in its block's steps with a zero gradient, its own counters held back
    (``CoreOptimizer._fill_missing_members``): it has its partners' ``calls``, and the counters of
    a parameter frozen from the start, 0, which the step never reads in place of its partners'
    (a member held back, :func:`_held_back`). ``params``: the group's parameters, the first of
    index ``first``."""
    blocks = transform.group_leaves([path_of(p, first + k) for k, p in enumerate(params)], params)
    calls_of = {m[1]: calls for calls, members in by_calls.items() for m in members}
    absent_index = {p: i for i, p in absent}
    added = []
    for block in blocks:
        members = [params[i] for i in block.indices]
        calls = next((calls_of[p] for p in members if p in calls_of), None)
        if calls is None:
            continue
        for p in members:
            if p in absent_index:
                i = absent_index[p]
                entries = {STEP: torch.zeros((), dtype=torch.int32, device=p.device),
                           NONFINITE: torch.zeros((), dtype=torch.int32, device=p.device), CALLS: calls}
                added.append((i, p, param_label(names, p, i), entries))
                by_calls[calls].append(added[-1])
                by_calls[calls].sort(key=lambda member: member[0])
    return added


def _held_back(members: list) -> list:
    """The parameters among ``members`` (``(parameter, (step, nonfinite_count))`` of parameters
    stepped together so far) whose counters are behind the others': a block member that a step
    left unchanged (no gradient of its own, see ``CoreOptimizer._fill_missing_members``); the step
    never takes the set's counters from them."""
    top = tuple(map(max, zip(*(count for _, count in members))))
    return [p for p, count in members if count != top]


def _saved_ids(saved_groups: list, new_groups: list, group: dict) -> list:
    return saved_groups[next(i for i, g in enumerate(new_groups) if g is group)]["params"]


def _layout_hint(transform: Any, entries: dict, arrays: dict) -> str:
    """The method's word on a saved state whose layout is not ``init``'s (``build_transform``'s
    ``layout_hint``: e.g. the ``block_size`` that continues a state saved under an older default),
    or ``""``."""
    hint = getattr(transform.init, "layout_hint", None)
    if hint is None:
        return ""
    found = {k: (tuple(v.shape), v.dtype) for k, v in entries.items() if isinstance(v, torch.Tensor)}
    return hint(found, {k: (tuple(v.shape), v.dtype) for k, v in arrays.items()})


def _check_core_state(path_of: Any, transform: Any, members: list, where: str, hint: str) -> None:
    """Check the saved state of parameters stepped together against ``transform.init``'s layout,
    and put each tensor into the dtype/device ``init`` gives it (in ``members``' entries)."""
    paths = [path_of(p, i) for i, p, _, _ in members]
    leaves = [p.detach() for _, p, _, _ in members]
    for block in transform.group_leaves(paths, leaves):
        # A block's state that state_dict() put on a member other than the first (whose parameter
        # did not require grad: heads_on_trainable_members) goes back onto the first member, where
        # the step keeps it.
        head = members[block.indices[0]][3]
        if len(block.indices) < 2 or head.get(HEAD) or any(k not in BOOKKEEPING for k in head):
            continue
        holder = next((members[i][3] for i in block.indices[1:] if members[i][3].get(HEAD)), None)
        if holder is not None:
            del holder[HEAD]
            head[HEAD] = True
            for name in [k for k in holder if k not in BOOKKEEPING]:
                head[name] = holder.pop(name)
    expected = transform.init(nest(paths, leaves))
    by_key = {path_str(path): member for path, member in zip(paths, members)}
    heads = set()
    rename = getattr(transform.init, "legacy_names", None)
    for key, arrays in expected.groups.items():
        _, p, label, entries = by_key[key]
        heads.add(key)
        if rename is not None:  # a state saved under the entry names of an earlier version
            core = {k: v for k, v in entries.items() if k not in BOOKKEEPING}
            renamed = rename(core)
            if renamed is not core:
                kept = {k: entries[k] for k in BOOKKEEPING if k in entries}
                entries.clear()
                entries.update(kept)
                entries.update(renamed)
        missing = sorted(set(arrays) - set(entries))
        if missing:
            raise ValueError(
                f"{where}: the state of {label} lacks {missing} (a state_dict saved with other settings?){hint}"
                + _layout_hint(transform, entries, arrays)
            )
        for name, like in arrays.items():
            value = entries[name]
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{where}: state {name!r} of {label} must be a tensor, got {type(value).__name__}")
            if tuple(value.shape) != tuple(like.shape):
                raise ValueError(
                    f"{where}: state {name!r} of {label} has shape {tuple(value.shape)}, expected {tuple(like.shape)}{hint}"
                    + _layout_hint(transform, entries, arrays)
                )
            if value.is_floating_point() or value.is_complex():
                if not bool(torch.isfinite(value).all()):
                    raise ValueError(f"{where}: state {name!r} of {label} holds NaN or Inf")
            elif like.is_floating_point():
                raise ValueError(f"{where}: state {name!r} of {label} has dtype {value.dtype}, expected {like.dtype}")
            entries[name] = value.detach().to(device=like.device, dtype=like.dtype, copy=True)
        entries[HEAD] = True
    for key, (_, _, label, entries) in by_key.items():
        extra = sorted(k for k in entries if k not in BOOKKEEPING and (key not in heads or k not in expected.groups[key]))
        if extra:
            raise ValueError(
                f"{where}: the state of {label} has unexpected entries {extra} (a state_dict saved with other settings?){hint}"
            )
        if key not in heads:
            entries.pop(HEAD, None)
