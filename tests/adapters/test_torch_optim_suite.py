"""The generic tests of torch's ``test/test_optim.py`` (``TestOptimRenewed``), transcribed for our
optimizers.

Transcribed here: ``test_forloop_goes_right_direction`` (contiguous or not, with and without LR
schedulers; and with ``maximize=True``), ``test_tensor_lr``, ``test_step_is_noop_for_zero_grads``,
``test_optimizer_can_be_printed``, ``test_can_load_older_state_dict``,
``test_can_load_from_to_named_state_dict``, ``test_save_load_equality_with_weights_only``,
``test_deepcopy_copies_all_public_attrs``, the step / state_dict / load_state_dict hook tests and
``test_non_empty_state``, the param-group tests (``test_param_groups_weight_decay``,
``test_param_groups_lr``, ``test_param_group_with_lrscheduler_goes_right_direction``) for every
class, and ``test_errors`` on torch's own generic error inputs. Already in the suite and not repeated: no-grad no-op and closures
(``test_torch_contract.py``), deepcopy/pickle continuation, non-tensor ``step``, load hooks seeing
the state, ``param_names`` (``test_torch_checkpoints.py``), param-group learning rates and LR
schedulers (``test_torch_contract.py``). Torch's tests of sparse, complex, fused/foreach,
differentiable and CUDA-specific paths have no counterpart here (the adapters refuse sparse and
complex gradients; there is one implementation per method).
"""

from __future__ import annotations

import copy
import inspect
import io

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import precond_ref.adapters.torch as pt
from cases import TORCH_CASES
from test_torch_checkpoints import _trained
from test_torch_contract import _data, _flat, _model, _train

each_case = pytest.mark.parametrize("case", TORCH_CASES, ids=lambda c: c.id)

# Default settings of every class (every class has a default learning rate, as every torch.optim
# class does), plus the number of examples of the root-free methods' loss. Plus the two settings of
# MBF at lr = damping = 1e-3 (diverged without KL clipping: loss 149 -> 2.5e21)
# and IF-Shampoo with momentum at lr 5e-2.
DEFAULTS = {
    "agd": (pt.AGD, {}),
    "asgo": (pt.ASGO, {}),
    "dasgo": (pt.DASGO, {}),
    "mbf": (pt.MBF, {}),
    "mbf-lr1e-2": (pt.MBF, {"lr": 1e-2}),
    "rf_rmsprop": (pt.RFRMSProp, {"batch_size": 1}),
    "rf_adamw": (pt.RFAdamW, {"batch_size": 1}),
    "if_shampoo": (pt.IFShampoo, {"batch_size": 1}),
    "if_shampoo-momentum-lr5e-2": (pt.IFShampoo, {"lr": 5e-2, "momentum": 0.9, "batch_size": 1}),
    "sketchy": (pt.Sketchy, {}),
    "s_adagrad": (pt.SAdaGrad, {}),
}


def _schedulers(opt, with_lrsched):
    if not with_lrsched:
        return []
    return [torch.optim.lr_scheduler.StepLR(opt, gamma=0.9, step_size=10),
            torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=5)]


@pytest.mark.filterwarnings("ignore:MBF. .* parameter")  # torch's test passes unnamed [weight, bias]
@pytest.mark.parametrize("with_lrsched", [False, True], ids=["constant", "lrsched"])
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_forloop_goes_right_direction(name, contiguous, with_lrsched):
    """torch's test: 20 steps on ||W x + b||^2 (W 10x5, b 10, float32, unnamed ``[weight, bias]``,
    non-contiguous views when ``strided``) lower the loss, for default settings, here on 3 seeds
    (MBF rose on 22 of 30 seeds before its principled KL clipping)."""
    cls, kwargs = DEFAULTS[name]
    for seed in range(3):
        torch.manual_seed(seed)
        if contiguous:
            weight = torch.nn.Parameter(torch.randn(10, 5))
            bias = torch.nn.Parameter(torch.randn(10))
        else:
            weight = torch.nn.Parameter(torch.randn(10, 5, 2)[..., 0])
            bias = torch.nn.Parameter(torch.randn(10, 2)[..., 0])
        x = torch.randn(5)
        opt = cls([weight, bias], **kwargs)
        _descends(opt, weight, bias, x, _schedulers(opt, with_lrsched))


@pytest.mark.filterwarnings("ignore:MBF. .* parameter")  # torch's test passes unnamed [weight, bias]
@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_forloop_goes_right_direction_when_maximizing(name):
    """torch's test with ``maximize=True`` (its optimizers' inputs include it): 20 steps on
    ||W x + b||^2 raise the loss, for default settings, on 3 seeds."""
    cls, kwargs = DEFAULTS[name]
    for seed in range(3):
        weight, bias, x = _weight_bias(seed)
        opt = cls([weight, bias], **kwargs, maximize=True)
        _descends(opt, weight, bias, x, up=True)


@pytest.mark.filterwarnings("ignore:MBF. .* parameter")
@pytest.mark.parametrize("cls", sorted({c for c, _ in DEFAULTS.values()}, key=lambda c: c.__name__), ids=lambda c: c.__name__)
def test_maximize_must_be_a_bool(cls):
    """``maximize`` is ``True`` or ``False``: another value (``"yes"``, ``1``) is refused with a
    ``ValueError`` naming it, at construction, in ``add_param_group`` (the optimizer keeps its
    groups) and, written into a group after construction, at the step before any parameter moves
    (naming the group)."""
    weight, bias = torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(2))
    for value in ("yes", 1):
        with pytest.raises(ValueError, match=f"maximize must be True or False, got {value!r}"):
            cls([weight], **_required(cls), maximize=value)
    opt = cls([weight], **_required(cls))
    with pytest.raises(ValueError, match="maximize must be True or False"):
        opt.add_param_group({"params": [bias], "maximize": "yes"})
    assert len(opt.param_groups) == 1
    opt.param_groups[0]["maximize"] = 1
    weight.grad = torch.ones_like(weight)
    before = weight.detach().clone()
    with pytest.raises(ValueError, match=r"maximize must be True or False, got 1 \(param group 0\)"):
        opt.step()
    assert torch.equal(weight.detach(), before)


@each_case
def test_tensor_lr(case):
    """torch's test: a 0-D tensor learning rate gives the trajectory of the same float one."""
    x, y = _data()
    runs = []
    for lr in (case.lr, torch.tensor(case.lr, dtype=torch.float64)):
        model = _model()
        _train(model, case.make(model.named_parameters(), lr=lr), case, 4, x, y)
        runs.append(_flat(model))
    assert torch.equal(runs[0], runs[1])


@each_case
def test_step_is_noop_for_zero_grads(case):
    """torch's test: a first step with zero gradients (and no weight decay, which moves parameters
    by itself) leaves the parameters unchanged. (Later zero-gradient steps move them by the
    momentum, as in torch's SGD and Adam.)"""
    model = _model()
    opt = case.make(model.named_parameters(), weight_decay=0.0)
    before = _flat(model).clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step(**case.step_kwargs)
    assert torch.equal(before, _flat(model))
    assert all(int(opt.state[p]["step"]) == 1 for p in model.parameters())


@each_case
@pytest.mark.filterwarnings("ignore:MBF. .* parameter")  # unnamed parameters: MBF says it cannot pair them
def test_optimizer_can_be_printed(case):
    text = repr(case.make(_model().named_parameters()))
    assert type(case.make(_model().parameters())).__name__ in text and "lr" in text


@each_case
def test_can_load_older_state_dict(case):
    """torch's test: a checkpoint of an older version lacks hyperparameters added since (here:
    each group's last key, and ``nonfinite_count``/``calls``); it loads, the missing
    hyperparameters keep the loading optimizer's values, and the run continues as the original."""
    model, opt, (x, y) = _trained(case)
    old = copy.deepcopy(opt.state_dict())
    dropped = [k for k in old["param_groups"][0] if k not in ("params", "param_names")][-1]
    for group in old["param_groups"]:
        del group[dropped]
    for entries in old["state"].values():
        entries.pop("nonfinite_count")
        entries.pop("calls")
    resumed = _model(seed=11)
    resumed.load_state_dict(model.state_dict())
    opt2 = case.make(resumed.named_parameters())
    opt2.load_state_dict(old)
    assert opt2.param_groups[0][dropped] == opt.param_groups[0][dropped]
    _train(model, opt, case, 2, x, y)
    _train(resumed, opt2, case, 2, x, y)
    assert torch.equal(_flat(model), _flat(resumed))


@pytest.mark.filterwarnings("ignore:MBF. .* parameter")
@each_case
@pytest.mark.parametrize("direction", ["named_to_unnamed", "unnamed_to_named"])
def test_can_load_from_to_named_state_dict(case, direction):
    """torch's test: a state_dict of named parameters loads into an optimizer of unnamed ones (it
    takes the checkpoint's names) and the reverse; both then take the same steps. The exception is a
    method whose names pair a Linear weight with its bias into one block (MBF, IF-Shampoo with
    ``grouping="weight_bias"``): an unnamed checkpoint's blocks do not fit a named optimizer, and
    loading raises, naming the parameter and the cause."""
    x, y = _data()
    model = _model()
    params = model.named_parameters() if direction == "named_to_unnamed" else model.parameters()
    opt = case.make(params)
    _train(model, opt, case, 3, x, y)
    resumed = _model(seed=13)
    resumed.load_state_dict(model.state_dict())
    opt2 = case.make(resumed.parameters() if direction == "named_to_unnamed" else resumed.named_parameters())
    pairs = case.cls is pt.MBF or case.kwargs.get("grouping") == "weight_bias"
    if pairs and direction == "unnamed_to_named":
        with pytest.raises(ValueError, match=r"parameter '0\.weight'.*differ in having parameter names"):
            opt2.load_state_dict(opt.state_dict())
        return
    opt2.load_state_dict(opt.state_dict())
    _train(model, opt, case, 2, x, y)
    _train(resumed, opt2, case, 2, x, y)
    assert torch.equal(_flat(model), _flat(resumed))


@each_case
def test_save_load_equality_with_weights_only(case):
    """torch's test: ``torch.save`` / ``torch.load(weights_only=True)`` of ``state_dict()`` gives an
    equal state_dict, and the loaded optimizer continues bit for bit."""
    model, opt, (x, y) = _trained(case)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    _assert_state_dicts_equal(loaded, opt.state_dict())
    resumed = _model(seed=17)
    resumed.load_state_dict(model.state_dict())
    opt2 = case.make(resumed.named_parameters())
    opt2.load_state_dict(loaded)
    _assert_state_dicts_equal(opt2.state_dict(), opt.state_dict())
    _train(model, opt, case, 2, x, y)
    _train(resumed, opt2, case, 2, x, y)
    assert torch.equal(_flat(model), _flat(resumed))


@each_case
def test_deepcopy_copies_all_public_attrs(case):
    """torch's test: every public attribute survives ``copy.deepcopy`` (state and groups equal)."""
    _, opt, _ = _trained(case)
    clone = copy.deepcopy(opt)
    public = {k for k in vars(opt) if not k.startswith("_")}
    assert public == {k for k in vars(clone) if not k.startswith("_")}
    assert clone.defaults == opt.defaults
    _assert_state_dicts_equal(clone.state_dict(), opt.state_dict())


@each_case
def test_step_hooks(case):
    """torch's step pre/post hooks (per optimizer and global) run once per step, in order."""
    x, y = _data()
    model = _model()
    opt = case.make(model.named_parameters())
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    handles = [register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global_pre")),
               register_optimizer_step_post_hook(lambda o, a, k: calls.append("global_post"))]
    try:
        _train(model, opt, case, 2, x, y)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == ["global_pre", "pre", "post", "global_post"] * 2


@each_case
def test_state_dict_hooks(case):
    """torch's state_dict pre/post hooks run; a post-hook's changes reach the returned dict."""
    _, opt, _ = _trained(case)
    seen = []
    opt.register_state_dict_pre_hook(lambda o: seen.append("pre"))

    def post(o, state_dict):
        seen.append("post")
        state_dict["param_groups"][0]["marker"] = True
        return state_dict

    opt.register_state_dict_post_hook(post)
    assert opt.state_dict()["param_groups"][0]["marker"] is True
    assert seen == ["pre", "post"]


@each_case
def test_load_state_dict_pre_hook_prepend_order(case):
    """torch's test: ``prepend=True`` runs a load pre-hook before the ones registered earlier."""
    _, opt, _ = _trained(case)
    saved = opt.state_dict()
    order = []
    opt.register_load_state_dict_pre_hook(lambda o, sd: order.append("first registered"))
    opt.register_load_state_dict_pre_hook(lambda o, sd: order.append("prepended"), prepend=True)
    opt.register_load_state_dict_post_hook(lambda o: order.append("post"))
    opt.load_state_dict(saved)
    assert order == ["prepended", "first registered", "post"]


@each_case
def test_non_empty_state(case):
    """torch's test: after a step every parameter with a gradient has state."""
    _, opt, _ = _trained(case)
    assert all(opt.state[p] for group in opt.param_groups for p in group["params"])


def _assert_state_dicts_equal(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for index, entries in a["state"].items():
        assert entries.keys() == b["state"][index].keys()
        for key, value in entries.items():
            other = b["state"][index][key]
            if isinstance(value, torch.Tensor):
                assert value.dtype == other.dtype and torch.equal(value, other), (index, key)
            else:
                assert value == other, (index, key)


# --------------------------------------------------------------------------------------------
# torch's param-group tests and generic error inputs, for every class


def _weight_bias(seed):
    torch.manual_seed(seed)
    return torch.nn.Parameter(torch.randn(10, 5)), torch.nn.Parameter(torch.randn(10)), torch.randn(5)


def _descends(opt, weight, bias, x, schedulers=(), up=False):
    def closure():
        opt.zero_grad()
        loss = (weight.mv(x) + bias).pow(2).sum()
        loss.backward()
        return loss

    initial = closure().item()
    for _ in range(20):
        loss = opt.step(closure)
        for scheduler in schedulers:
            scheduler.step(loss) if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) else scheduler.step()
    final = closure().item()
    assert (final > initial) if up else (final < initial), (initial, final)


def _batch(kwargs):
    """The root-free methods' loss size, the one setting torch's tests cannot know (a sum over 1 example)."""
    return {"batch_size": kwargs["batch_size"]} if "batch_size" in kwargs else {}


def _required(cls):
    """What ``cls`` cannot be built without beyond torch's arguments: the root-free classes' B."""
    return {"batch_size": 1} if "batch_size" in inspect.signature(cls).parameters else {}


@pytest.mark.filterwarnings("ignore:MBF. .* parameter")
@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_param_groups_weight_decay(name):
    """torch's test: weight and bias in two groups, weight decay on the weight only; the loss falls."""
    cls, kwargs = DEFAULTS[name]
    weight, bias, x = _weight_bias(0)
    opt = cls([dict(params=[weight], **kwargs, weight_decay=1e-2), dict(params=[bias], **kwargs, weight_decay=0.0)])
    _descends(opt, weight, bias, x)


@pytest.mark.filterwarnings("ignore:MBF. .* parameter")
@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_param_groups_lr(name):
    """torch's test: the optimizer's lr is 0 and a group sets its own; that group's loss falls and
    a parameter of a group left at lr 0 is untouched (after the same gradient steps)."""
    cls, kwargs = DEFAULTS[name]
    weight, bias, x = _weight_bias(1)
    irrelevant = torch.nn.Parameter(torch.randn(2, 2))
    before = irrelevant.detach().clone()
    group_kwargs = {"lr": inspect.signature(cls).parameters["lr"].default, **kwargs}  # the class's, or the setting's
    outer = {"lr": 0.0, "weight_decay": 0.0, **_batch(kwargs)}
    opt = cls([dict(params=[weight, bias], **group_kwargs), dict(params=[irrelevant])], **outer)
    irrelevant.grad = torch.ones_like(irrelevant)
    _descends(opt, weight, bias, x)
    assert torch.equal(irrelevant.detach(), before)


@pytest.mark.filterwarnings("ignore:MBF. .* parameter")
@pytest.mark.parametrize("scheduler", ["StepLR", "ReduceLROnPlateau"])
@pytest.mark.parametrize("cls", sorted({c for c, _ in DEFAULTS.values()}, key=lambda c: c.__name__), ids=lambda c: c.__name__)
def test_param_group_with_lrscheduler_goes_right_direction(cls, scheduler):
    """torch's test: ``cls([{"params": [weight]}, {"params": [bias], "lr": 0.01}])``, no other
    argument (every class has a default lr; the root-free ones are told their loss's batch size),
    under a scheduler: the loss falls."""
    weight, bias, x = _weight_bias(2)
    root_free = issubclass(cls, (pt.RFRMSProp, pt.RFAdamW, pt.IFShampoo))
    opt = cls([{"params": [weight]}, {"params": [bias], "lr": 0.01}], **({"batch_size": 1} if root_free else {}))
    make = {"StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, gamma=0.9, step_size=10),
            "ReduceLROnPlateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o)}[scheduler]
    _descends(opt, weight, bias, x, [make(opt)])


def _torch_error_inputs():
    """torch 2.13's ``get_error_inputs_for_all_optims("cpu", ...)`` (common_optimizers.py, which
    needs torch's test-only dependencies to import): (description, params, kwargs, error type,
    message regex), all raised at construction."""
    p1, p2 = torch.nn.Parameter(torch.randn(1, 1)), torch.nn.Parameter(torch.randn(1, 1))
    return [
        ("invalid param type", p1, {}, TypeError,
         "params argument given to the optimizer should be an iterable of Tensors or dicts"),
        ("a param group cannot have duplicate parameters", [p1, p1], {}, UserWarning,
         ".*a parameter group with duplicate parameters.*"),
        ("duplicate parameters should not occur across param groups either", [{"params": p1}, {"params": p1}], {},
         ValueError, "some parameters appear in more than one parameter group"),
        ("Tensor lr must be 1-element", None, {"lr": torch.tensor([0.001, 0.001])}, ValueError,
         "Tensor lr must be 1-element"),
        ("all optimizer params should be with/without names", [("weight", p1), p2], {}, ValueError,
         "all optimizer params should be with/without names. Some param names are missing"),
        ("all optimizer param groups should be with/without names.",
         [{"params": [p1], "lr": 1e-2}, {"params": [("weight", p2)]}], {}, ValueError,
         "all optimizer param groups should be with/without names. cannot add param group with names to the optimizer"),
    ]


@pytest.mark.filterwarnings("ignore:MBF. .* parameter")
@pytest.mark.parametrize("cls", sorted({c for c, _ in DEFAULTS.values()}, key=lambda c: c.__name__), ids=lambda c: c.__name__)
def test_errors(cls):
    """torch's ``test_errors`` on its generic error inputs: the same exception types with messages
    matching torch's regexes (a tensor ``params``; a 2-element tensor ``lr``
    given with ``params=None``, which must be refused before the parameters are looked at)."""
    for desc, params, kwargs, error_type, regex in _torch_error_inputs():
        kwargs = {**_required(cls), **kwargs}
        if issubclass(error_type, Warning):
            with pytest.warns(error_type, match=regex):
                cls(params, **kwargs)
        else:
            with pytest.raises(error_type, match=regex):
                cls(params, **kwargs)


@pytest.mark.filterwarnings("ignore:MBF. .* parameter")  # unnamed parameters: MBF says it cannot pair them
def test_every_class_and_core_factory_has_the_same_default_learning_rate():
    """Every torch class and every core factory constructs without a learning rate, and a class's
    default ``lr`` is its core factory's default ``learning_rate`` (the values
    are documented in each factory's docstring). ASGO's, IF-Shampoo's and MBF's are ``None`` in
    both, the mode's default, which the class sets in its param groups as a number for
    learning-rate schedulers."""
    import precond_ref as pr
    from precond_ref.methods.asgo import ASGO_LEARNING_RATE
    from precond_ref.methods.mbf import MBF_LEARNING_RATE
    from precond_ref.methods.root_free import IF_SHAMPOO_LEARNING_RATE

    by_mode = {pt.ASGO: ASGO_LEARNING_RATE, pt.IFShampoo: IF_SHAMPOO_LEARNING_RATE, pt.MBF: MBF_LEARNING_RATE}

    classes = sorted({c for c, _ in DEFAULTS.values()}, key=lambda c: c.__name__)
    assert len(classes) == 9
    factories = {getattr(pr, name) for name in ("agd", "asgo", "dasgo", "mbf", "rf_rmsprop", "rf_adamw",
                                                 "if_shampoo", "sketchy", "s_adagrad")}
    assert {c.core_factory for c in classes} == factories
    for cls in classes:
        lr = inspect.signature(cls).parameters["lr"].default
        core_lr = inspect.signature(cls.core_factory).parameters["learning_rate"].default
        cls.core_factory()  # no learning_rate
        opt = cls([torch.nn.Parameter(torch.zeros(3, 2, dtype=torch.float64))], **_required(cls))
        if cls in by_mode:
            assert lr is None and core_lr is None
            core_lr = by_mode[cls]["principled"]
            faithful = cls([torch.nn.Parameter(torch.zeros(3, 2))], mode="faithful", **_required(cls))
            assert faithful.defaults["lr"] == by_mode[cls]["faithful"] != core_lr
        else:
            assert isinstance(lr, float) and lr == core_lr > 0, (cls.__name__, lr, core_lr)
        assert opt.defaults["lr"] == core_lr
