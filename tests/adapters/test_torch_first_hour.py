"""A new user's first mistakes with the torch classes fail early and in torch's words."""

from __future__ import annotations

import inspect

import re
import warnings
from pathlib import Path

import pytest
import torch

import precond_ref.adapters.torch as pt

from test_torch_compile import _counting_inner_compiler, fresh_dynamo_warnings  # noqa: F401  (a fixture)

ROOT_FREE = [pt.RFRMSProp, pt.RFAdamW, pt.IFShampoo]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1)).to(torch.float64)


@pytest.mark.parametrize("cls", ROOT_FREE, ids=lambda c: c.__name__)
def test_no_batch_size_fails_when_built_naming_the_torch_arguments(cls):
    """The root-free statistic is B*g*g with B the examples the loss averages over (spec
    root_free.md §2, §2.1 step 1; S5): without batch_size= or model= nothing supplies B, so the
    constructor refuses, naming the class and the three ways to give B in this API's words (not
    the core factory's "Pass batch_size= to the factory or to update")."""
    model = _model()
    with pytest.raises(ValueError) as err:
        cls(model.parameters(), lr=1e-3)
    message = str(err.value)
    assert message.startswith(f"{cls.__name__}: no batch size")
    for words in ("batch_size=", "model=", "opt.step(batch_size=...)"):
        assert words in message
    assert "factory" not in message and "update" not in message


def test_batch_size_at_each_step_holds_for_its_own_thread_only():
    """``compare``'s and ``bench``'s training loops build the root-free classes without a batch size
    inside ``_batch_size_at_each_step`` (they give one at every step); the switch is the caller's
    context, not the process's: another thread building meanwhile is still refused."""
    import threading

    from precond_ref.adapters._torch_methods import _batch_size_at_each_step

    errors = []

    def build_elsewhere():
        try:
            pt.RFAdamW(_model().parameters(), lr=1e-3)
        except ValueError as error:
            errors.append(str(error))

    with _batch_size_at_each_step():
        pt.RFAdamW(_model().parameters(), lr=1e-3)  # builds: the caller gives batch_size= at each step
        thread = threading.Thread(target=build_elsewhere)
        thread.start()
        thread.join()
    assert len(errors) == 1 and errors[0].startswith("RFAdamW: no batch size")
    with pytest.raises(ValueError, match="^RFAdamW: no batch size"):  # and not after it
        pt.RFAdamW(_model().parameters(), lr=1e-3)


@pytest.mark.parametrize("cls", ROOT_FREE, ids=lambda c: c.__name__)
def test_each_source_of_the_batch_size_builds(cls):
    """batch_size=, model= (the forward-pass count) and, for the RF classes, an unscaled statistic
    each give B (or make it unneeded), so each builds and steps."""
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
    builds = [dict(batch_size=5), dict(model="self")]
    if cls is not pt.IFShampoo:
        builds.append(dict(scale_by_batch_size=False))
    for extra in builds:
        model = _model()
        extra = {k: (model if v == "self" else v) for k, v in extra.items()}
        opt = cls(model.parameters(), lr=1e-3, **extra)
        before = [p.detach().clone() for p in model.parameters()]
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters())), extra


def test_model_without_forward_passes_fails_at_step_in_torch_words():
    """With model= the count comes from the forward passes since the last step; a step that saw
    none has no B and says so in the class's words (its gradients nonzero: a step of zero
    gradients is the same for every B and takes B = 1)."""
    model = _model()
    opt = pt.RFRMSProp(model.parameters(), lr=1e-3, model=model)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match=r"^RFRMSProp: no batch size.*counted no training-mode forward pass"):
        opt.step()
    opt.step(batch_size=3)  # the per-step value is enough


# --------------------------------------------------------------------------------------------
# torch.compile: no warning from the library's own code

_OWN_FILES = {p.name for root in ("precond_ref", "adapters") for p in (Path(__file__).parents[2] / root).rglob("*.py")}
_EVERY_STEP = {"precondition_every": 1}  # one graph, compiled at the first step
_FAMILIES = {  # one class per core module
    "AGD": {}, "ASGO": _EVERY_STEP, "Sketchy": _EVERY_STEP, "RFRMSProp": {"batch_size": 4},
    "IFShampoo": {"batch_size": 4, **_EVERY_STEP}, "MBF": {"statistics_every": 1, "refresh_phases": 1, **_EVERY_STEP},
}


@pytest.mark.parametrize("name", sorted(_FAMILIES))
def test_compiled_step_calls_no_lru_cache_wrapper_from_the_library(fresh_dynamo_warnings, monkeypatch, name):
    """Dynamo warns of every ``functools.lru_cache``-wrapped call it traces, naming the caller's
    file and line. The compiled step registers array_api_compat's wrappers with dynamo's
    allow-list, which a torch without that list, or a user's own ``torch.compile`` around the
    core, does not have; so the library's own code calls none of them: with the registration
    switched off, one compiled step of each method family warns of no call from a library file."""
    if not hasattr(torch._dynamo.utils, "allow_lru_cache_wrapper_trace_without_warning"):
        pytest.skip(f"torch {torch.__version__} has no dynamo allow-list: the compiled step filters the warning")
    monkeypatch.setattr(torch._dynamo.utils, "allow_lru_cache_wrapper_trace_without_warning", lambda wrapper: None)
    compiles = _counting_inner_compiler(monkeypatch)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).to(torch.float64)
    opt = getattr(pt, name)(model.named_parameters(), compile=True, **_FAMILIES[name])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(torch.randn(4, 3, dtype=torch.float64)).square().mean().backward()
        opt.step()
    assert opt._compile_options is not None and compiles  # it ran compiled (a fallback to eager clears the options)
    sites = [re.search(r"function at '([^:']+):(\d+)'", str(w.message)) for w in caught]
    own = [m.group(0) for m in sites if m is not None and m.group(1) in _OWN_FILES]
    assert not own, own


@pytest.mark.parametrize("notice_s, told", [(0.0, 1), (600.0, 0)], ids=["slow", "fast"])
def test_a_slow_compilation_says_so_once(monkeypatch, caplog, notice_s, told):
    """A step that compiles for longer than ``COMPILE_NOTICE_S`` says so, once per compiled
    function (a large model's first step compiles for minutes on a CPU with nothing printed
    otherwise); a faster one says nothing. The notice is a log record, made on a timer thread."""
    from precond_ref.adapters import _torch_compile

    monkeypatch.setattr(_torch_compile, "COMPILE_NOTICE_S", notice_s)
    _counting_inner_compiler(monkeypatch)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).to(torch.float64)
    opt = pt.MBF(model.named_parameters(), compile=True, statistics_every=1, precondition_every=2, refresh_phases=1)
    with caplog.at_level("WARNING", logger="precond_ref"):
        for _ in range(4):  # two patterns of interval decisions: two compilations
            opt.zero_grad()
            model(torch.randn(4, 3, dtype=torch.float64)).square().mean().backward()
            opt.step()
    notices = [r for r in caplog.records if "compiling the optimizer's update of 2 tensors" in r.getMessage()]
    assert len(notices) == told


@pytest.mark.parametrize("name", [n for n in pt.__all__ if n != "CoreOptimizer"])
def test_an_unknown_keyword_names_the_class_and_the_closest_argument(name):
    """optax's ``learning_rate`` (or a misspelling) given to a torch class is refused before
    anything is built, naming the class, the bad keyword and the torch name it should be; a
    name near none of them lists what the class takes; torch.optim's ``fused`` and ``foreach``
    say that the method has one implementation and what fuses it."""
    cls = getattr(pt, name)
    params = _model().parameters()
    with pytest.raises(TypeError, match=rf"^{name} got an unexpected keyword 'learning_rate'; did you mean 'lr'\?$"):
        cls(params, learning_rate=1e-3)
    with pytest.raises(TypeError, match=rf"^{name} got an unexpected keyword 'weight_decy'; did you mean 'weight_decay'\?$"):
        cls(params, weight_decy=0.1)
    with pytest.raises(TypeError, match=rf"^{name} got an unexpected keyword 'zzz'; it takes params, lr, "):
        cls(params, zzz=1)
    for option in ("fused", "foreach"):
        with pytest.raises(TypeError, match=rf"^{name} got an unexpected keyword '{option}'; each method has one "
                                            r"implementation.*\(compile=True fuses its element-wise passes\)$"):
            cls(params, **{option: True})


@pytest.mark.parametrize("name", [n for n in pt.__all__ if n != "CoreOptimizer"])
def test_an_unknown_keyword_of_step_is_refused_before_the_step(name):
    """``step`` takes ``closure`` and, in the root-free classes, ``batch_size`` (the core's
    per-step B): any other keyword raises ``TypeError`` as ``torch.optim.Adam.step(foo=1)`` does,
    naming the class and the closest valid keyword, and the parameters do not move (a misspelt
    ``batchsize=`` used to be dropped, the step taking the constructor's B)."""
    cls = getattr(pt, name)
    model = _model()
    opt = cls(model.named_parameters(), **({"batch_size": 4} if "batch_size" in inspect.signature(cls).parameters else {}))
    model(torch.randn(5, 4, dtype=torch.float64)).square().mean().backward()
    before = [p.detach().clone() for p in model.parameters()]
    takes = "closure, batch_size" if "batch_size" in opt.defaults else "closure"
    with pytest.raises(TypeError, match=rf"^{name}\.step got an unexpected keyword 'lr'; it takes {takes}$"):
        opt.step(lr=1.0)
    if "batch_size" in opt.defaults:
        with pytest.raises(TypeError, match=rf"^{name}\.step got an unexpected keyword 'batchsize'; did you mean 'batch_size'\?$"):
            opt.step(batchsize=8)
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


@pytest.mark.parametrize("cls, key, before, after", [(pt.RFRMSProp, "momentum", 0.0, 0.9), (pt.AGD, "amsgrad", False, True)],
                         ids=["RFRMSProp", "AGD"])
def test_a_hyperparameter_that_changes_the_state_layout_is_named(cls, key, before, after):
    """A hyperparameter whose value decides the state's layout (a momentum buffer, AGD's
    ``amsgrad`` maximum), changed after the first step, cannot take the state made for the old
    value (as in torch's Adam): the error names the hyperparameter and what to do, in torch's
    words; it used to point at the gradient ("a transposed gradient, another dtype, or a weight
    without its bias?")."""
    model = _model()
    opt = cls(model.named_parameters(), **{key: before}, **({"batch_size": 4} if cls is pt.RFRMSProp else {}))
    for value in (before, after):
        opt.param_groups[0][key] = value
        opt.zero_grad()
        model(torch.randn(5, 4, dtype=torch.float64)).square().mean().backward()
        if value is after:
            with pytest.raises(ValueError, match=rf"^{cls.__name__}: {key} changed after the optimizer state was made"):
                opt.step()
        else:
            opt.step()


@pytest.mark.parametrize("cls, key, before, after", [
    (pt.Sketchy, "rank", 2, 1), (pt.SAdaGrad, "rank", 2, 1), (pt.IFShampoo, "factor_dtype", None, torch.float32),
    (pt.RFAdamW, "state_dtype", None, "float32"), (pt.AGD, "amsgrad", False, True),
], ids=["Sketchy", "SAdaGrad", "IFShampoo", "RFAdamW", "AGD"])
def test_a_step_refused_in_a_later_param_group_changes_nothing(cls, key, before, after):
    """A step that refuses refuses before it changes anything: a hyperparameter of the *second*
    param group whose new value needs a state of another layout raises before the first group
    steps, so every parameter and every state tensor of every group is bit-identical to before
    the call (not a half-taken step: the first group stepped, the second not). The error says
    what changed and names the parameter as ``named_parameters()`` does, after the class name;
    with the old value back the optimizer steps on."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).to(torch.float64)
    named = list(model.named_parameters())
    opt = cls([{"params": named[:2]}, {"params": named[2:]}], **{key: before},
              **({"batch_size": 4} if cls in ROOT_FREE else {}))

    def backward():
        opt.zero_grad()
        model(torch.randn(5, 4, dtype=torch.float64)).square().mean().backward()

    for _ in range(2):
        backward()
        opt.step()
    opt.param_groups[1][key] = after
    backward()
    params = [p.detach().clone() for p in model.parameters()]
    state = [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}
             for p in model.parameters()]
    with pytest.raises(ValueError, match=rf"^{cls.__name__}: {key} changed after the optimizer state was made") as err:
        opt.step()
    for p, was, entries in zip(model.parameters(), params, state):
        assert torch.equal(p, was)
        assert opt.state[p].keys() == entries.keys()
        for k, v in entries.items():
            now = opt.state[p][k]
            assert now.dtype == v.dtype and torch.equal(now, v) if isinstance(v, torch.Tensor) else now == v, k
    assert "parameter '2.weight'" in str(err.value)
    opt.param_groups[1][key] = before
    opt.step()
    assert not torch.equal(next(model.parameters()), params[0])


@pytest.mark.parametrize("change", ["double", "shape"])
@pytest.mark.parametrize("cls", [pt.AGD, pt.MBF, pt.Sketchy, pt.IFShampoo], ids=lambda c: c.__name__)
def test_a_parameter_changed_in_place_in_a_later_param_group_changes_nothing(cls, change):
    """A step refuses parameters of the *second* param group changed in place after their state
    was made (``module.double()``; a ``.data`` of another shape) before the first group steps:
    every parameter and every state tensor of every group is bit-identical to before the call (not
    a half-taken step, refused by the core during the second group's update). The error says, in
    torch's words, which parameter changed, how, and what to do; it refuses again until the
    parameters are changed back, and then the optimizer steps on. A parameter whose state still
    fits it after the change (a float32 ``state_dtype`` of a parameter cast to float64) steps on."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    named = list(model.named_parameters())
    opt = cls([{"params": named[:2]}, {"params": named[2:]}], **({"batch_size": 4} if cls in ROOT_FREE else {}))

    def gradients():
        for p in model.parameters():
            p.grad = torch.randn_like(p)

    for _ in range(2):
        gradients()
        opt.step()
    weight, old = model[2].weight, model[2].weight.data
    if change == "double":
        model[2].double()
        what = "dtype torch.float32 -> torch.float64"
    else:
        weight.data = torch.randn(2, 5)
        what = "shape (2, 3) -> (2, 5)"
    gradients()
    params = [p.detach().clone() for p in model.parameters()]
    state = [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}
             for p in model.parameters()]
    for _ in range(2):
        with pytest.raises(ValueError, match=rf"^{cls.__name__}: a parameter changed in place after the optimizer "
                                             r"state was made, and its state does not fit it") as err:
            opt.step()
        for p, was, entries in zip(model.parameters(), params, state):
            assert p.dtype == was.dtype and torch.equal(p, was)
            assert opt.state[p].keys() == entries.keys()
            for k, v in entries.items():
                now = opt.state[p][k]
                assert now.dtype == v.dtype and torch.equal(now, v) if isinstance(v, torch.Tensor) else now == v, k
        assert f"parameter '2.weight' (index 2): {what}" in str(err.value)
        assert "build a new optimizer" in str(err.value) and "load a state_dict" in str(err.value)
    if change == "double":
        model[2].float()
    else:
        weight.data = old
    gradients()
    opt.step()
    assert not torch.equal(next(model.parameters()), params[0])

    layer = torch.nn.Linear(3, 2)
    opt = pt.RFAdamW(layer.named_parameters(), batch_size=4, state_dtype="float32")
    for step in range(2):
        layer.weight.grad, layer.bias.grad = torch.randn_like(layer.weight), torch.randn_like(layer.bias)
        opt.step()
        layer.double()
    assert opt.state[layer.weight]["m"].dtype == torch.float32 and layer.weight.dtype == torch.float64


def test_errors_name_a_parameter_as_named_parameters_does():
    """The torch classes' errors name a parameter as ``named_parameters()`` does (``'0.weight'``),
    never by the core's tree path (``'0/weight'``): capturable=True's refusal of a CPU parameter,
    and the refusal of a step whose parameters no longer fit the optimizer state (the model cast to
    float64 after the first step)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))

    def backward():
        model.zero_grad()
        model(torch.randn(5, 4, dtype=next(model.parameters()).dtype)).square().mean().backward()

    backward()
    with pytest.raises(ValueError, match="capturable=True needs CUDA parameters") as err:
        pt.AGD(model.named_parameters(), capturable=True).step()
    assert "parameter '0.weight' is on cpu" in str(err.value) and "/" not in str(err.value)
    opt = pt.AGD(model.named_parameters(), compile=False)
    opt.step()
    model.to(torch.float64)
    backward()
    with pytest.raises(ValueError, match="its state does not fit it") as err:
        opt.step()
    assert "parameter '0.bias' (index 1): dtype torch.float32 -> torch.float64" in str(err.value)
    assert "0/" not in str(err.value)


def test_an_unknown_keyword_of_an_optax_factory_names_the_optax_argument():
    """The optax factories in their own words: torch's ``lr`` and ``betas`` point to
    ``learning_rate`` and ``b1``."""
    pj = pytest.importorskip("precond_ref.adapters.jax")
    for factory in (pj.agd, pj.rf_adamw, pj.asgo, pj.mbf):
        name = factory.__name__
        with pytest.raises(TypeError, match=rf"^{name} got an unexpected keyword 'lr'; did you mean 'learning_rate'\?$"):
            factory(lr=1e-3)
    with pytest.raises(TypeError, match=r"^agd got an unexpected keyword 'betas'; did you mean 'b1'\?$"):
        pj.agd(betas=(0.9, 0.999))


@pytest.mark.parametrize("cls", ROOT_FREE, ids=lambda c: c.__name__)
def test_model_does_not_guess_the_batch_size_of_token_sequences(cls):
    """B is the number of examples the loss averages over (spec root_free.md §2). A model whose
    first input is a (sequences, length) batch of token ids does not tell it: a per-token loss
    averages over sequences x length tokens, a per-sequence one over the sequences. model= alone
    then refuses at the step, naming the shape and batch_size=; given batch_size= at the step,
    the step is that of an optimizer built with it."""
    def lm():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.Linear(3, 5))

    tokens = torch.randint(0, 5, (4, 6), generator=torch.Generator().manual_seed(1))
    counted, explicit = lm(), lm()
    opt = cls(None, model=counted, lr=1e-2)
    reference = cls(explicit.named_parameters(), lr=1e-2, batch_size=24)

    def backward(model):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(tokens).reshape(-1, 5), tokens.reshape(-1)).backward()

    backward(counted)
    with pytest.raises(ValueError) as err:
        opt.step()
    message = str(err.value)
    assert message.startswith(f"{cls.__name__}: model='s input is a batch of integer sequences (4, 6)")
    assert "4 x 6" in message and "batch_size=" in message
    backward(counted)
    opt.step(batch_size=24)
    backward(explicit)
    reference.step()
    assert torch.equal(torch.cat([p.flatten() for p in counted.parameters()]),
                       torch.cat([p.flatten() for p in explicit.parameters()]))


@pytest.mark.parametrize("cls", [pt.ASGO, pt.DASGO], ids=lambda c: c.__name__)
def test_a_fallback_filter_on_unnamed_parameters_warns(cls):
    """``fallback_filter(name, p)`` sees 'param<index>' for a parameter without a name, so a filter
    by name ("emb" in name, the authors' split) routes nothing to the fallback Adam without a word:
    the constructor (and ``add_param_group``) says so, naming the class and the remedy; named
    parameters, or ``model=``, build silently and route by name."""
    by_name = lambda name, p: name.startswith("2.")  # noqa: E731: the last Linear's weight
    with pytest.warns(UserWarning, match=rf"^{cls.__name__}: fallback_filter .* 2 parameter\(s\) have none .*named_parameters"):
        unnamed = cls(list(_model().parameters())[2:], fallback_filter=by_name)
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        named = cls(model.named_parameters(), fallback_filter=by_name)
        from_model = cls(model.parameters(), fallback_filter=by_name, model=model)
        cls(model.parameters())  # no filter: names are not needed
    for opt in (named, from_model):
        opt.zero_grad()
        model(torch.ones(2, 4, dtype=torch.float64)).sum().backward()
        opt.step()
        assert "mu" in opt.state[model[2].weight] and "momentum" in opt.state[model[0].weight]
    with pytest.warns(UserWarning, match="1 parameter"):
        from_model.add_param_group({"params": [torch.nn.Parameter(torch.ones(3, 3, dtype=torch.float64))]})
    assert unnamed.param_groups[0]["fallback_filter"] is by_name
