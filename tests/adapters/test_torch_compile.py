"""The torch optimizers' compiled step: ``torch.compile`` of the core update.

The compiled path must give the eager path's numbers (to rounding), compile a bounded number of
times (interval decisions and the learning rate are inputs, not constants), share checkpoints with
the eager path, and fall back to eager with one notice when compilation fails. Every method is
checked with the ``aot_eager`` backend (dynamo's full-graph capture and functionalisation, the
part that can break, in seconds); TorchInductor itself is checked on the element-wise AGD.
"""

from __future__ import annotations

import copy
import types
import warnings

import pytest
import torch

import precond_ref.adapters.torch as pt
from precond_ref.adapters import _torch_compile

from cases import CAPTURABLE_CASES, TORCH_CASES

AOT = {"backend": "aot_eager"}
# One configuration per class, with periodic work where the method has it (AGD: with Inductor below).
COMPILED_CASES = [
    c for c in TORCH_CASES
    if c.id in ("asgo-pe-interval", "dasgo", "rf_rmsprop", "rf_adamw", "if_shampoo-mixed-every2",
                "sketchy-faithful-interval", "s_adagrad", "mbf")
]
#: Refreshes unspread where a case spreads them over phases: on one Linear layer ASGO's bias phase
#: compiles its reuse graph once more (the bias has no root to refresh), so unspread the case
#: compiles the same two graphs, refresh and reuse, once each. Spread schedules under compile are
#: test_scheduler_and_intervals_do_not_recompile's. MBF's case (inverting every 5th step, spread
#: over 5 phases) makes only its warm-up's decisions in 6 steps, which run eagerly: inverting every
#: 2nd step, unspread, it refreshes at calls 0-2 and 4 and reuses at 3 and 5, both graphs compiled.
UNSPREAD = {"asgo-pe-interval": dict(spread_refresh=False), "mbf": dict(precondition_every=2, refresh_phases=1)}


def _model(dtype, seed=0):
    """One weight with its bias: dynamo unrolls the per-block work, so every further layer adds its
    whole trace (S-AdaGrad's step on two layers took 12 s to capture)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 2)).to(dtype)


def _batches(dtype, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 5, generator=gen).to(dtype), torch.randn(16, 2, generator=gen).to(dtype)) for _ in range(steps)]


def _train(model, opt, batches, case=None, scheduler=None):
    for x, y in batches:
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step(**(case.step_kwargs if case else {}))
        if scheduler is not None:
            scheduler.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("case", COMPILED_CASES, ids=lambda c: c.id)
def test_compiled_step_equals_eager(case):
    """Same parameters after 6 steps (refresh and reuse steps alike) with or without compilation,
    one graph compiled for each combination of interval decisions the 6 steps make that recurs
    (those made only at the schedule's start run eagerly: ``transient_patterns``), at least one.

    float64, and aot_eager runs the captured graph with the eager kernels: any difference is from
    decompositions reordering a few operations, a few ulps per step, hence 1e-10 relative.

    Dynamo traces each graph once: no restart of its analysis, which a 0-D float64 CPU input (the
    learning rate, S-AdaGrad's 0-D state entries) would cause by giving it a symbolic float that the
    graph never uses (``_torch_core._read``, ``_torch_compile._boxed``)."""
    batches = _batches(torch.float64, 6)
    eager_model, compiled_model = _model(torch.float64), _model(torch.float64)
    unspread = UNSPREAD.get(case.id, {})
    eager = case.make(eager_model.named_parameters(), compile=False, **unspread)
    compiled = case.make(compiled_model.named_parameters(), compile=AOT, **unspread)
    torch._dynamo.utils.clear_compilation_metrics()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would warn
        got = _train(compiled_model, compiled, batches, case)
    restarts = [m.restart_reasons for m in torch._dynamo.utils.get_compilation_metrics() if m.restart_reasons]
    assert not restarts, f"dynamo traced a graph again: {restarts}"
    transform = compiled._transform(compiled.param_groups[0])
    recurring = set(_torch_compile.due_pattern_steps(transform, len(batches))) - _torch_compile.transient_patterns(transform)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == len(recurring) > 0, recurring
    want = _train(eager_model, eager, batches, case)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module")
def compiled_asgo():
    """ASGO in its principled mode (``precondition_every=2``, its default: refreshes spread over two
    phases, two graphs) compiled with aot_eager, trained on ``_batches(float64, 6)`` with a
    checkpoint after 3 steps, none falling back to eager (its warning an error). The principled
    optimizer of test_two_optimizers_with_different_constants_both_compile and the compiled one of
    test_checkpoints_move_between_compiled_and_eager: one run, its graphs compiled once for both,
    read and not stepped by them."""
    batches = _batches(torch.float64, 6)
    model = _model(torch.float64)
    opt = pt.ASGO(model.named_parameters(), lr=1e-2, precondition_every=2, compile=AOT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would warn
        after_3 = _train(model, opt, batches[:3])
        checkpoint = copy.deepcopy((model.state_dict(), opt.state_dict()))
        after_6 = _train(model, opt, batches[3:])
    return types.SimpleNamespace(optimizer=opt, batches=batches, checkpoint=checkpoint, params={3: after_3, 6: after_6})


def test_two_optimizers_with_different_constants_both_compile(compiled_asgo):
    """Two ASGO optimizers in one process whose transforms hold different floats (``eps`` of the
    principled and the faithful mode) each compile their own graph with those floats as constants.
    Dynamo records which inputs changed between calls by the compiled function's file, line and
    name, so with one name the second optimizer's ``eps`` became symbolic, the core's checks could
    not trace it, and the step fell back to eager (``_torch_compile._fresh`` gives each its own name).
    The principled optimizer is the ``compiled_asgo`` fixture's, compiled before the faithful one,
    whose graph runs on the ``eager`` backend: the record of changed inputs is dynamo's, whatever
    the backend."""
    batches = compiled_asgo.batches[:3]
    eager_model = _model(torch.float64)
    eager = pt.ASGO(eager_model.named_parameters(), lr=1e-2, precondition_every=2, compile=False)
    torch.testing.assert_close(compiled_asgo.params[3], _train(eager_model, eager, batches), rtol=1e-10, atol=1e-12)
    model, eager_model = _model(torch.float64), _model(torch.float64)
    compiled = pt.ASGO(model.named_parameters(), lr=1e-2, compile={"backend": "eager"}, mode="faithful")
    eager = pt.ASGO(eager_model.named_parameters(), lr=1e-2, compile=False, mode="faithful")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would warn
        got = _train(model, compiled, batches)
    torch.testing.assert_close(got, _train(eager_model, eager, batches), rtol=1e-10, atol=1e-12)


def test_inductor_agd_equals_eager_to_float32_rounding():
    """TorchInductor fuses AGD's step into one kernel (state, non-finite selection and parameter
    update). Fused arithmetic may round differently by a few ulps per operation (FMA contraction);
    AGD's update is a smooth function of its inputs (max(√b̂, δ) is continuous), so 5 steps of
    float32 agree to ~1e-5 relative."""
    batches = _batches(torch.float32, 5)
    eager_model, compiled_model = _model(torch.float32), _model(torch.float32)
    eager = pt.AGD(eager_model.named_parameters(), lr=1e-2, compile=False)
    compiled = pt.AGD(compiled_model.named_parameters(), lr=1e-2, compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = _train(compiled_model, compiled, batches)
    want = _train(eager_model, eager, batches)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("interval, spread, graphs", [(3, False, 2), (3, True, 3), (9, True, 9)])
def test_scheduler_and_intervals_do_not_recompile(monkeypatch, interval, spread, graphs):
    """The learning rate is a tensor input and interval decisions are bools: a cosine schedule over
    12 steps of ASGO compiles one graph per combination of decisions that recurs: two (refresh,
    reuse) unspread, T spread over T phases (one phase a step; the first step's combination, every
    phase at once, occurs only then and runs eagerly: ``CompiledStep.eager_patterns``), with the
    eager trajectory's numbers. T = 9 needs 9 graphs, past dynamo's default limit of 8 per
    function, beyond which it stopped compiling and the step ran eagerly (with a warning)."""
    compiles = []
    real = _torch_compile.CompiledStep.__init__

    def counting_backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    def init(self, transform, options, kernels=None):
        real(self, transform, {"backend": counting_backend}, kernels)

    monkeypatch.setattr(_torch_compile.CompiledStep, "__init__", init)
    kwargs = dict(lr=1e-2, precondition_every=interval, spread_refresh=spread)
    model, eager_model = _model(torch.float64), _model(torch.float64)
    opt = pt.ASGO(model.named_parameters(), compile=True, **kwargs)
    eager = pt.ASGO(eager_model.named_parameters(), compile=False, **kwargs)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=12, eta_min=0.0)
    eager_sched = torch.optim.lr_scheduler.CosineAnnealingLR(eager, T_max=12, eta_min=0.0)
    batches = _batches(torch.float64, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would warn
        got = _train(model, opt, batches, scheduler=sched)
    want = _train(eager_model, eager, batches, scheduler=eager_sched)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert len(compiles) == graphs


def test_only_the_schedules_start_runs_eagerly():
    """``transient_patterns``: the interval decisions the schedule makes at its start and never
    again are the ones a compiled step runs eagerly. Spread over T = 3 phases: the first step's
    (every phase); unspread, or without intervals: none (each pattern recurs); MBF's default
    schedule (statistics every 10 calls, inverses spread over 10 phases of T2 = 100): the 11
    decisions all due, made on each statistics call of its warm-up (calls 0, 10, ..., 100) and
    never after, while each phase's pattern recurs every 100 calls."""
    import precond_ref

    every_phase = _torch_compile.transient_patterns(precond_ref.asgo(learning_rate=1e-2, precondition_every=3))
    assert every_phase == {(True, True, True)}
    unspread = precond_ref.asgo(learning_rate=1e-2, precondition_every=3, spread_refresh=False)
    assert _torch_compile.transient_patterns(unspread) == frozenset()
    assert len(_torch_compile.due_pattern_steps(unspread)) == 2
    assert _torch_compile.transient_patterns(precond_ref.agd(learning_rate=1e-3)) == frozenset()
    mbf = precond_ref.mbf(learning_rate=1e-3)
    warm_up = (True,) * 11
    assert _torch_compile.transient_patterns(mbf) == {warm_up}
    assert [step for step in range(1024) if mbf.due(step) == warm_up] == list(range(0, 101, 10))
    assert len(_torch_compile.due_pattern_steps(mbf)) == 12


def test_failed_compilation_warns_once_and_runs_eagerly(monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("InductorError: no C++ compiler found")

        return run

    monkeypatch.setattr(_torch_compile.torch, "compile", broken_compile)
    batches = _batches(torch.float64, 3)
    model, eager_model = _model(torch.float64), _model(torch.float64)
    opt = pt.AGD(model.named_parameters(), lr=1e-2, compile=True)
    with pytest.warns(RuntimeWarning, match="torch.compile failed .*no C\\+\\+ compiler.*running the same update eagerly"):
        got = _train(model, opt, batches[:1])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # once: later steps are eager, silently
        got = _train(model, opt, batches[1:])
    want = _train(eager_model, pt.AGD(eager_model.named_parameters(), lr=1e-2, compile=False), batches)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_fallback_notice_names_the_compilers_cause():
    """Inductor's BackendCompilerFailed says only "backend='inductor' raised:" on its first line;
    the notice adds the first line of the exception it wraps, the failure's actual cause."""
    try:
        try:
            raise TypeError("cannot lower aten.foo\nmore detail")
        except TypeError as inner:
            raise RuntimeError("backend='inductor' raised:\nTypeError: cannot lower aten.foo") from inner
    except RuntimeError as error:
        with pytest.warns(RuntimeWarning, match=r"raised: <- TypeError: cannot lower aten.foo\); running"):
            _torch_compile.notice_eager("ASGO", error)


@pytest.fixture
def fresh_dynamo_warnings(monkeypatch):
    """Dynamo as in a new process for the lru_cache warning: no site warned yet, no helper
    registered, and the compiled step's registration to be made again (also after the test)."""
    utils = torch._dynamo.utils
    monkeypatch.setattr(utils, "warn_once_cache", set())
    registered = "_lru_cache_wrappers_allowed_to_trace_without_warning"  # the allow-list's registry
    if hasattr(utils, registered):  # torch 2.11 has neither the list nor its registry
        monkeypatch.setattr(utils, registered, type(getattr(utils, registered))())
    _torch_compile._cached_helpers_traced_quietly.cache_clear()
    yield
    _torch_compile._cached_helpers_traced_quietly.cache_clear()


@pytest.mark.parametrize("allow_list", [True, False], ids=["registered", "filtered"])
def test_tracing_the_namespace_lookups_warns_nothing(fresh_dynamo_warnings, monkeypatch, allow_list):
    """The core's namespace lookups are array_api_compat's ``functools.lru_cache`` helpers, which
    dynamo warns about (once per call site) when it traces them; harmless, and not the user's to
    see. The compiled step registers them with dynamo's allow-list, or on a torch without one
    filters the warning around each call. S-AdaGrad's step traces such lookups (AGD's traces none:
    on it this test would pass whatever the compiled step did); the warning is dynamo's, whatever
    the backend, so the graph runs on the ``eager`` backend."""
    has_list = hasattr(torch._dynamo.utils, "allow_lru_cache_wrapper_trace_without_warning")
    if allow_list and not has_list:
        pytest.skip(f"torch {torch.__version__} has no dynamo allow-list for lru_cache helpers "
                    "(torch._dynamo.utils.allow_lru_cache_wrapper_trace_without_warning): the filtered case covers it")
    if not allow_list and has_list:
        monkeypatch.delattr(torch._dynamo.utils, "allow_lru_cache_wrapper_trace_without_warning")
    model = _model(torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(model, pt.SAdaGrad(model.named_parameters(), lr=1e-2, compile={"backend": "eager"}), _batches(torch.float64, 2))
    assert _torch_compile._cached_helpers_traced_quietly() is allow_list
    assert [str(w.message)[:80] for w in caught if "lru_cache" in str(w.message)] == []


def test_input_errors_are_not_taken_for_compiler_failures():
    """A bad step argument raises the core's own error, and the compiled path stays enabled."""
    model = _model(torch.float64)
    opt = pt.RFRMSProp(model.named_parameters(), lr=1e-2, batch_size=8, compile=AOT)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(ValueError, match="batch_size"):
            opt.step(batch_size=0)
    assert opt._compile_options == AOT


def test_checkpoints_move_between_compiled_and_eager(compiled_asgo):
    """The compiled ``compiled_asgo``'s checkpoint after 3 steps, loaded into an eager optimizer,
    continues as the compiled optimizer did (float64, eager kernels: 1e-10 relative); a deep copy of
    the compiled optimizer rebuilds its compiled function instead of copying it."""
    eager_model = _model(torch.float64)
    eager_model.load_state_dict(compiled_asgo.checkpoint[0])
    eager = pt.ASGO(eager_model.named_parameters(), lr=1e-2, precondition_every=2, compile=False)
    eager.load_state_dict(compiled_asgo.checkpoint[1])
    want = _train(eager_model, eager, compiled_asgo.batches[3:])
    torch.testing.assert_close(compiled_asgo.params[6], want, rtol=1e-10, atol=1e-12)

    compiled = compiled_asgo.optimizer
    copied = copy.deepcopy(compiled)  # the compiled function is rebuilt, not copied
    assert copied._compiled == {} and copied.state_dict()["state"].keys() == compiled.state_dict()["state"].keys()


def test_compile_settings(monkeypatch):
    params = [torch.nn.Parameter(torch.zeros(2))]
    monkeypatch.setenv(_torch_compile.ENVIRONMENT_VARIABLE, "0")
    assert pt.AGD(params)._compile_options is None
    assert pt.AGD(params, compile=True)._compile_options == {}  # the argument wins
    monkeypatch.setenv(_torch_compile.ENVIRONMENT_VARIABLE, "1")
    assert pt.AGD(params)._compile_options == {}
    assert pt.AGD(params, compile={"mode": "max-autotune"})._compile_options == {"mode": "max-autotune"}
    monkeypatch.delenv(_torch_compile.ENVIRONMENT_VARIABLE)
    assert isinstance(pt.AGD(params)._compile_options, _torch_compile.Auto)  # element-wise: where it pays
    assert pt.ASGO(params)._compile_options is None
    with pytest.raises(TypeError, match="compile must be"):
        pt.AGD(params, compile="yes")
    with pytest.raises(ValueError, match="capturable must be"):
        pt.AGD(params, capturable=1)


def test_capturable_refuses_cpu_parameters_and_periodic_work():
    model = _model(torch.float32)
    opt = pt.AGD(model.named_parameters(), lr=1e-2, capturable=True)
    _train_one = lambda o: _train(model, o, _batches(torch.float32, 1))  # noqa: E731
    with pytest.raises(ValueError, match="capturable=True needs CUDA parameters.*'0.weight' is on cpu"):
        _train_one(opt)
    periodic = pt.ASGO(model.named_parameters(), lr=1e-2, precondition_every=2, capturable=True)
    with pytest.raises(ValueError, match="capturable=True needs a step without periodic work"):
        _train_one(periodic)


@pytest.mark.parametrize(
    "case, overrides, compile",
    [pytest.param(c, o, False, id=f"{c.id}-eager") for c, o in CAPTURABLE_CASES]
    + [pytest.param(c, o, AOT, id=f"{c.id}-compiled") for c, o in CAPTURABLE_CASES if c.id in ("agd", "dasgo")],
)
def test_capturable_steps_write_every_state_tensor_in_place(monkeypatch, case, overrides, compile):
    """``capturable=True``: once the first step has made the state, every step writes each state
    tensor (counters included) and each parameter in place, with the numbers of
    ``capturable=False``.

    A replayed CUDA graph reads and writes the addresses its capture saw: a state tensor replaced
    by a new one would leave every replay reading the capture-time input (freed once the state
    drops it, its memory reused) and the new tensor never updated again. CPU has no CUDA graphs,
    so the CUDA requirement is lifted here and that invariant is checked directly.
    """
    real = _torch_compile.check_capturable
    monkeypatch.setattr(_torch_compile, "check_capturable", lambda owner, transform, named: real(owner, transform, []))
    batches = _batches(torch.float64, 4)
    model = _model(torch.float64)
    expected = _train(model, case.make(model.named_parameters(), compile=compile, **overrides), batches, case)
    model = _model(torch.float64)
    opt = case.make(model.named_parameters(), compile=compile, capturable=True, **overrides)
    _train(model, opt, batches[:1], case)

    def tensors() -> dict:
        return {(id(p), k): v for p, entries in opt.state.items() for k, v in entries.items() if isinstance(v, torch.Tensor)}

    before = {key: (v, v.data_ptr()) for key, v in tensors().items()}
    params = [(p, p.data_ptr()) for p in model.parameters()]
    got = _train(model, opt, batches[1:], case)
    after = tensors()
    assert after.keys() == before.keys()
    moved = [key[1] for key, (v, ptr) in before.items() if after[key] is not v or after[key].data_ptr() != ptr]
    assert not moved, f"state entries left in new tensors: {sorted(set(moved))}"
    assert all(p.data_ptr() == ptr for p, ptr in params)
    assert all(int(entries["step"]) == len(batches) for entries in opt.state.values())
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_default_decides_at_the_first_step_from_the_groups_size(monkeypatch):
    """compile=None on AGD: a param group of AUTO_MIN_ELEMENTS or more compiles at its first step; a
    smaller one steps eagerly at every step, however many it has taken (a compilation of seconds
    in the middle of a run is a stall nobody asked for). The long run is simulated by the
    parameter's count of steps taken, set past any step count a run could reach cheaply."""
    from precond_ref.adapters._torch_state import CALLS

    monkeypatch.delenv(_torch_compile.ENVIRONMENT_VARIABLE, raising=False)
    built = []

    def fake(transform, options, kernels=None):
        def step(grads, state, params, due, extra):
            built[-1][1] += 1
            return pt.CoreOptimizer._eager_update(transform, grads, state, params, 0, extra)

        built.append([options, 0])
        step.transform, step.eager_patterns = transform, frozenset()
        return step

    monkeypatch.setattr(_torch_compile, "CompiledStep", fake)
    steps = {}
    for name, numel in (("small", 8), ("large", _torch_compile.AUTO_MIN_ELEMENTS)):
        p = torch.nn.Parameter(torch.zeros(numel))
        opt = pt.AGD([p], lr=1e-2)
        for i in range(4):
            p.grad = torch.ones_like(p)
            opt.step()
            if i == 1:
                opt.state[p][CALLS] = 10**6
        steps[name] = built.pop() if built else None
    assert steps == {"small": None, "large": [{}, 4]}


def test_hyperparameter_list_changed_in_place_takes_effect():
    """``betas`` given as a list and changed in place between steps: the next steps continue as an
    optimizer loaded from the checkpoint with the new betas would. The adapter reuses a
    group's core transform while the group holds the same hyperparameter objects, which a list
    does even after it changed."""
    batches = _batches(torch.float64, 4)
    model, twin = _model(torch.float64), _model(torch.float64)
    opt = pt.AGD(model.named_parameters(), lr=1e-2, betas=[0.9, 0.999], compile=False)
    _train(model, opt, batches[:2])
    checkpoint = copy.deepcopy(opt.state_dict())
    opt.param_groups[0]["betas"][0] = 0.5
    _train(model, opt, batches[2:])
    _train(twin, pt.AGD(twin.named_parameters(), lr=1e-2, betas=[0.9, 0.999], compile=False), batches[:2])
    rebuilt = pt.AGD(twin.named_parameters(), lr=1e-2, compile=False)
    checkpoint["param_groups"][0]["betas"] = (0.5, 0.999)
    rebuilt.load_state_dict(checkpoint)
    assert torch.equal(_train(twin, rebuilt, batches[2:]), _train(model, opt, []))


def test_changes_between_steps_reach_the_compiled_step():
    """The compiled step keeps no guard on the transform's closures or on module globals
    (``_torch_compile._guard_filter``): what may change between steps must still reach it. A new
    ``batch_size`` (a keyword argument: guarded, recompiles), a new learning rate (a tensor the
    kernels read) and new betas (a new transform, so a new compiled step) give the eager numbers.
    Guards are dynamo's, whatever the backend: the graphs run on the ``eager`` backend."""
    batches = _batches(torch.float64, 6)
    models = {c: _model(torch.float64) for c in (False, True)}
    opts = {c: pt.RFRMSProp(m.named_parameters(), lr=1e-2, momentum=0.5, batch_size=16, compile={"backend": "eager"} if c else False) for c, m in models.items()}
    plan = [dict(batch_size=16), dict(batch_size=16), dict(batch_size=4), dict(lr=3e-2, batch_size=4),
            dict(alpha=0.9, batch_size=4), dict(alpha=0.9, batch_size=4)]
    got = {}
    for compiled, opt in opts.items():
        model = models[compiled]
        for (x, y), settings in zip(batches, plan):
            for key in ("lr", "alpha"):
                if key in settings:
                    opt.param_groups[0][key] = settings[key]
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)
                opt.step(batch_size=settings["batch_size"])
        got[compiled] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(got[True], got[False], rtol=1e-10, atol=1e-12)


def test_a_scheduled_hyperparameter_other_than_lr_steps_eagerly_while_it_changes(monkeypatch):
    """OneCycleLR cycles ``betas`` by default, writing a new value at every step. Each value builds
    a new core transform, which compiled its step anew at every step (seconds each, without end).
    A param group whose hyperparameters other than ``lr`` changed at two steps in a row steps
    eagerly while they change, told once by a ``RuntimeWarning`` that names them, with the eager
    optimizer's numbers; a single change (a weight decay set once by hand) compiles once more, as
    before, without a notice."""
    compiles = _counting_inner_compiler(monkeypatch)
    batches = _batches(torch.float64, 8)
    models = {c: _model(torch.float64) for c in (False, True)}
    opts = {c: pt.AGD(m.named_parameters(), lr=1e-2, compile=c) for c, m in models.items()}
    got = {}
    for compiled, opt in opts.items():
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=20)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got[compiled] = _train(models[compiled], opt, batches, scheduler=sched)
        told = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        if compiled:
            assert len(told) == 1 and told[0].startswith("AGD: betas changed at two steps in a row"), told
        else:
            assert told == []
    torch.testing.assert_close(got[True], got[False], rtol=1e-10, atol=1e-12)
    assert len(compiles) == 1  # the first step's, before the second change

    model = _model(torch.float64)
    opt = pt.AGD(model.named_parameters(), lr=1e-2, compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _train(model, opt, batches[:3])
        opt.param_groups[0]["weight_decay"] = 1e-3
        _train(model, opt, batches[3:])
    assert len(compiles) == 3


# --------------------------------------------------------------------------------------------
# torch.compile(opt.step), torch's recipe for compiled optimizers


def _counting_inner_compiler(monkeypatch):
    """The optimizers' own compiled function with a backend that runs dynamo's graph eagerly and
    records each compilation (seconds instead of TorchInductor's minutes on 2 cores)."""
    compiles = []
    real = _torch_compile.CompiledStep.__init__

    def counting_backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    monkeypatch.setattr(_torch_compile.CompiledStep, "__init__",
                        lambda self, transform, options, kernels=None: real(self, transform, {"backend": counting_backend}, kernels))
    return compiles


def test_compiled_opt_step_does_not_recompile(monkeypatch):
    """``torch.compile(opt.step)``: after a warm-up of 5 steps that meets both interval decisions
    (MBF inverts on every statistics step up to ``precondition_every`` = 3, then every 3rd: calls
    0-3 refresh, 4 reuses), no frame recompiles over 5 more steps with refreshes at calls 6 and 9
    (``error_on_recompile``: before the fix dynamo guarded on the host call count and recompiled
    every step until its limit, then ran eagerly); the core update ran compiled (two graphs:
    refresh and reuse steps) and the parameters equal the eager optimizer's (float64,
    the graphs run with eager kernels: a few ulps per step, hence 1e-10 relative)."""
    compiles = _counting_inner_compiler(monkeypatch)
    kwargs = dict(lr=1e-2, damping=0.1, statistics_every=1, precondition_every=3, refresh_phases=1)  # unspread: two graphs
    model, eager_model = _model(torch.float64), _model(torch.float64)
    opt = pt.MBF(model.named_parameters(), **kwargs)
    eager = pt.MBF(eager_model.named_parameters(), compile=False, **kwargs)
    torch._dynamo.reset()

    @torch.compile(backend="eager")
    def compiled_step():
        opt.step()

    batches = _batches(torch.float64, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would warn
        for k, (x, y) in enumerate(batches):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            with torch._dynamo.config.patch(error_on_recompile=k >= 5):
                compiled_step()
    want = _train(eager_model, eager, batches)
    assert len(compiles) == 2
    got = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_compiled_opt_step_of_optimizers_made_in_sequence(monkeypatch):
    """A learning-rate sweep in one process: optimizers of several classes and parameter shapes,
    built one after another, each stepped through ``torch.compile(opt.step)``: every one runs its
    update compiled (its own compilations: an element-wise rule's kernel too, which belongs to its
    optimizer), none falls back to eager or warns, and each equals its eager twin (float64, eager
    kernels: 1e-10 relative)."""
    compiles = _counting_inner_compiler(monkeypatch)
    monkeypatch.setattr(_torch_compile, "PER_LEAF_MIN_TENSORS", 1)  # the per-leaf kernels, on one layer
    torch._dynamo.reset()
    settings = [(pt.AGD, 5, {}), (pt.AGD, 7, {}), (pt.MBF, 4, {}), (pt.MBF, 6, {}),
                (pt.RFRMSProp, 3, {"batch_size": 16}), (pt.RFRMSProp, 5, {"batch_size": 12})]
    for n, (cls, width, step_kwargs) in enumerate(settings):
        torch.manual_seed(n)
        model = torch.nn.Linear(width, 2).double()
        eager_model = copy.deepcopy(model)
        opt = cls(model.named_parameters(), lr=1e-2, compile=None, **step_kwargs)
        eager = cls(eager_model.named_parameters(), lr=1e-2, compile=False, **step_kwargs)
        step = torch.compile(opt.step, backend="eager")
        gen = torch.Generator().manual_seed(n)
        before = len(compiles)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for _ in range(3):
                x, y = torch.randn(16, width, generator=gen, dtype=torch.float64), torch.randn(16, 2, generator=gen, dtype=torch.float64)
                for m, o, s in ((model, opt, step), (eager_model, eager, eager.step)):
                    o.zero_grad()
                    ((m(x) - y) ** 2).mean().backward()
                    s(**step_kwargs)
        assert len(compiles) > before, (cls.__name__, width)  # a fallback to eager would warn
        for p, q in zip(model.parameters(), eager_model.parameters()):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-10, atol=1e-12)


def test_elementwise_step_compiles_one_kernel_for_every_length(monkeypatch):
    """An element-wise class's compiled step is one compiled per-leaf function (``KernelWrites``):
    a single compilation serves leaves of every length (1-D operands of a dynamic size) in both
    param groups of an optimizer (two compiled steps, one kernel), and a second optimizer with the
    same options compiles its own (the kernels are the optimizer's, and go with it); a param group
    of ``PER_LEAF_MIN_TENSORS`` tensors or more, the threshold lowered here. Each equals the eager
    optimizer (float64, the graph run with eager kernels: 1e-10 relative). The first leaf is a
    matrix, whose flat view enters as a tensor that is not a view: AOTAutograd guards on a view
    input's base, and the next leaf (1-D) would compile again. The count is dynamo's of distinct
    graphs (a compilation may call the backend twice: dynamo restarts its analysis once to turn
    0-D float64 CPU inputs into symbolic floats)."""
    from torch._dynamo.backends.debugging import aot_eager
    from torch._dynamo.utils import counters

    options = {"backend": lambda gm, example_inputs: aot_eager(gm, example_inputs)}  # its own kernels
    monkeypatch.setattr(_torch_compile, "PER_LEAF_MIN_TENSORS", 1)  # per leaf all the same
    before = counters["stats"]["unique_graphs"]
    # groups: a, b alone; c, d one pack (another learning rate: another transform and compiled step)
    shapes = [{"a": (150, 120), "b": (20000,)}, {"c": (5,), "d": (3, 4)}]
    for seed in range(2):
        torch.manual_seed(seed)
        groups = [[(k, torch.randn(s, dtype=torch.float64)) for k, s in group.items()] for group in shapes]
        opt = _agd_equals_eager(groups, options, steps=3)
        assert len(opt._compiled) == 2 and counters["stats"]["unique_graphs"] - before == seed + 1


def test_dropped_optimizer_takes_its_kernels_along(monkeypatch, own_objects_collected):
    """The compiled per-leaf kernels belong to the optimizer that compiled them: once it is dropped
    and the garbage collected, nothing holds any function ``torch.compile`` made for it (no
    process-wide cache)."""
    import gc
    import weakref

    from torch._dynamo.backends.debugging import aot_eager

    made, compile = [], torch.compile

    def recording(*args, **kwargs):
        compiled = compile(*args, **kwargs)
        made.append(weakref.ref(compiled))
        return compiled

    monkeypatch.setattr(torch, "compile", recording)
    monkeypatch.setattr(_torch_compile, "PER_LEAF_MIN_TENSORS", 1)
    params = [torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64)), torch.nn.Parameter(torch.randn(3, dtype=torch.float64))]
    opt = pt.AGD(params, lr=1e-2, compile={"backend": lambda gm, example_inputs: aot_eager(gm, example_inputs)})
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt._kernels and all(kernel in [ref() for ref in made] for kernel in opt._kernels.values())
    del opt
    gc.collect()
    assert made and all(ref() is None for ref in made)


def _agd_equals_eager(groups, options, steps):
    """AGD compiled with ``options`` and eagerly, from the param groups ``groups`` (lists of named
    parameters, the n-th with learning rate n * 1e-2), stepped ``steps`` times on the same random
    gradients: equal parameters (float64, eager kernels: 1e-10 relative). Returns the compiled
    optimizer."""
    compiled = [[(k, torch.nn.Parameter(p)) for k, p in group] for group in groups]
    eager = [[(k, torch.nn.Parameter(p.detach().clone())) for k, p in group] for group in compiled]
    opts = [pt.AGD([{"params": group, "lr": (n + 1) * 1e-2} for n, group in enumerate(tree)], lr=1e-2, compile=compile)
            for tree, compile in ((compiled, options), (eager, False))]
    pairs = [(p, q) for group, twin in zip(compiled, eager) for (_, p), (_, q) in zip(group, twin)]
    for _ in range(steps):
        for p, q in pairs:
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        for o in opts:
            o.step()
    for p, q in pairs:
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-10, atol=1e-12)
    return opts[0]


def test_small_group_compiles_the_whole_step(monkeypatch):
    """Below ``PER_LEAF_MIN_TENSORS`` tensors an element-wise class compiles one graph of the whole
    group's step (no per-leaf kernel is called), and at the threshold the per-leaf kernels (no
    whole-group graph); both equal the eager optimizer (float64, eager kernels: 1e-10 relative)."""
    monkeypatch.setattr(_torch_compile, "PER_LEAF_MIN_TENSORS", 3)
    calls = {"kernel": 0, "whole": 0}
    real_step, real_call = _torch_compile.KernelWrites.step, _torch_compile.CompiledStep._call

    def kernel(self, *args, **kwargs):
        calls["kernel"] += 1
        return real_step(self, *args, **kwargs)

    def whole(self, *args, **kwargs):
        calls["whole"] += 1
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(_torch_compile.KernelWrites, "step", kernel)
    monkeypatch.setattr(_torch_compile.CompiledStep, "_call", whole)
    for count, used in ((2, "whole"), (3, "kernel")):
        calls.update(kernel=0, whole=0)
        torch.manual_seed(count)
        _agd_equals_eager([[(f"p{i}", torch.randn(4, 3, dtype=torch.float64)) for i in range(count)]], {"backend": "eager"}, steps=2)
        assert calls[used] == 2 and sum(calls.values()) == 2, (count, calls)


def test_dasgo_steps_leaf_by_leaf_one_graph_per_rank(monkeypatch):
    """A DASGO param group of ``PER_LEAF_MIN_TENSORS`` tensors or more (the threshold lowered here)
    steps each leaf by one call of a function compiled for leaves of every size (``LeafCalls``):
    matrices of two shapes (row counts that are multiples of ``sum_across``'s block and not),
    vectors of two lengths and a 0-D parameter compile one graph per rank (3), not one per shape,
    and a matrix of ``PER_SHAPE_MIN_ELEMENTS`` or more (the threshold lowered) one for its shape. A NaN in one leaf's gradient skips the step in every leaf (the core's
    non-finite rule, one decision per step: spec DESIGN §non-finite). Parameters and state equal
    the eager optimizer's after 4 steps (float64, the graphs run with eager kernels: 1e-10 relative)."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(_torch_compile, "PER_LEAF_MIN_TENSORS", 1)
    monkeypatch.setattr(_torch_compile, "PER_SHAPE_MIN_ELEMENTS", 600)  # c alone
    shapes = {"a": (48, 7), "b": (37, 7), "c": (33, 20), "u": (7,), "v": (20,), "s": ()}
    torch.manual_seed(0)
    compiled = [(k, torch.nn.Parameter(torch.randn(s, dtype=torch.float64))) for k, s in shapes.items()]
    eager = [(k, torch.nn.Parameter(p.detach().clone())) for k, p in compiled]
    opts = [pt.DASGO(compiled, lr=1e-2, compile={"backend": counting_backend}), pt.DASGO(eager, lr=1e-2, compile=False)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would warn
        for step in range(4):
            for (_, p), (_, q) in zip(compiled, eager):
                p.grad = torch.randn_like(p)
                if step == 2 and p.ndim == 2:
                    p.grad[1, 1] = float("nan")  # one leaf's entry: the whole step is skipped
                q.grad = p.grad.clone()
            before = [p.detach().clone() for _, p in compiled]
            for o in opts:
                o.step()
            if step == 2:
                assert all(torch.equal(p.detach(), b) for (_, p), b in zip(compiled, before))
    assert len(graphs) == 4
    for (_, p), (_, q) in zip(compiled, eager):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-10, atol=1e-12)
    got, want = opts[0].state_dict()["state"], opts[1].state_dict()["state"]
    assert got.keys() == want.keys()
    for i in want:
        assert got[i].keys() == want[i].keys()
        for name in want[i]:
            torch.testing.assert_close(got[i][name], want[i][name], rtol=1e-10, atol=1e-12)


def _step_alike(compiled: list, eager: list, opts: list, steps: int) -> None:
    """``steps`` steps of every optimizer in ``opts`` with the same random gradients on the named
    parameters ``compiled`` and their copies ``eager``; a fallback to eager (which warns) fails."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for _ in range(steps):
            for (_, p), (_, q) in zip(compiled, eager):
                p.grad = torch.randn_like(p)
                q.grad = p.grad.clone()
            for o in opts:
                o.step()


def test_dasgo_leaf_by_leaf_steps_bf16_parameters_compiled(monkeypatch):
    """bf16 parameters take DASGO's compiled leaf-by-leaf step (``LeafCalls``; the threshold
    lowered) without falling back to eager: the step's one skip decision over every gradient tests
    each in its compute dtype (float32 for bf16) through the array API's torch namespace, as the
    core's own update does. Parameters after 3 steps equal the eager optimizer's to bf16 rounding:
    the graphs run with eager kernels on float32 state, and an update a few float32 ulps apart
    rounds a parameter to at most the neighbouring bf16 value, one bf16 ulp (2**-8 relative) a step."""
    monkeypatch.setattr(_torch_compile, "PER_LEAF_MIN_TENSORS", 1)
    torch.manual_seed(0)
    compiled = list(torch.nn.Linear(4, 3).to(torch.bfloat16).named_parameters())
    eager = [(k, torch.nn.Parameter(p.detach().clone())) for k, p in compiled]
    opts = [pt.DASGO(compiled, lr=1e-2, compile={"backend": lambda gm, example_inputs: gm.forward}),
            pt.DASGO(eager, lr=1e-2, compile=False)]
    _step_alike(compiled, eager, opts, steps=3)
    assert opts[0]._compiled
    for (_, p), (_, q) in zip(compiled, eager):
        assert p.dtype == torch.bfloat16
        torch.testing.assert_close(p.detach(), q.detach(), rtol=3 * 2.0**-8, atol=0.0)


def test_dasgo_leaf_by_leaf_steps_a_kernel_as_its_tree_does(monkeypatch):
    """A parameter the core reads as an out-last ``kernel`` (by its name; DASGO takes the other side
    of its matrix view, the layer's input side) steps alone (``LeafCalls``) under that name, as in its
    tree: a non-square and a square kernel beside a weight compile and take the eager optimizer's
    steps (no fallback to eager, which would warn), with the statistic of their input side."""
    monkeypatch.setattr(_torch_compile, "PER_LEAF_MIN_TENSORS", 1)
    shapes = {"l.kernel": (7, 5), "sq.kernel": (6, 6), "w.weight": (5, 7)}
    torch.manual_seed(0)
    compiled = [(k, torch.nn.Parameter(torch.randn(s, dtype=torch.float64))) for k, s in shapes.items()]
    eager = [(k, torch.nn.Parameter(p.detach().clone())) for k, p in compiled]
    opts = [pt.DASGO(compiled, lr=1e-2, compile={"backend": "eager"}), pt.DASGO(eager, lr=1e-2, compile=False)]
    _step_alike(compiled, eager, opts, steps=3)
    for (_, p), (_, q) in zip(compiled, eager):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-14)
    assert opts[0].state[compiled[0][1]]["statistic"].shape == (7,)


def test_dasgo_leaf_compilation_failing_mid_step_finishes_it_eagerly(monkeypatch):
    """A leaf-by-leaf step (``LeafCalls``) whose compilation fails after earlier leaves were written
    (the second layout, a vector after a matrix) finishes that step eagerly, leaf by leaf, and
    raises at the next step before writing anything: the optimizer then says so once and steps
    eagerly. No leaf is stepped twice: the parameters equal the eager optimizer's (float64, eager
    kernels: 1e-10 relative)."""
    graphs = []

    def second_fails(gm, example_inputs):
        graphs.append(gm)
        if len(graphs) == 2:
            raise RuntimeError("InductorError: cannot compile this layout")
        return gm.forward

    monkeypatch.setattr(_torch_compile, "PER_LEAF_MIN_TENSORS", 1)
    torch.manual_seed(0)
    compiled = [(k, torch.nn.Parameter(torch.randn(s, dtype=torch.float64))) for k, s in (("a", (40, 6)), ("b", (6,)))]
    eager = [(k, torch.nn.Parameter(p.detach().clone())) for k, p in compiled]
    opts = [pt.DASGO(compiled, lr=1e-2, compile={"backend": second_fails}), pt.DASGO(eager, lr=1e-2, compile=False)]
    for step in range(3):
        for (_, p), (_, q) in zip(compiled, eager):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for o in opts:
                o.step()
        assert [str(w.message) for w in caught if "torch.compile failed" in str(w.message)] != [] if step == 1 else not caught
    assert opts[0]._compile_options is None
    for (_, p), (_, q) in zip(compiled, eager):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-10, atol=1e-12)
