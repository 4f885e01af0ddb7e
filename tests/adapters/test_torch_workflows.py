"""The torch classes inside the workflows torch users already have: the edge cases of param
groups and parameters (empty, 0-D), mixed precision with ``torch.amp.GradScaler``, schedulers and
checkpoints, each checked against the same steps taken plainly or against ``torch.optim``'s
own behaviour.

One configuration per class (the first of each in ``cases.TORCH_CASES``) keeps the file cheap.
"""

from __future__ import annotations

import pytest
import torch

import precond_ref.adapters.torch as pt
from cases import TORCH_CASES

CLASS_CASES = list({c.cls: c for c in reversed(TORCH_CASES)}.values())[::-1]

every_class = pytest.mark.parametrize("case", CLASS_CASES, ids=lambda c: c.cls.__name__)


@every_class
def test_a_skipped_step_skips_a_group_holding_an_empty_parameter(case):
    """The non-finite rule decides for the whole step (docs/adapters/torch.md: "a non-finite
    gradient in any param group skips every group's update (counted in each parameter's
    nonfinite_count)"). A param group that also holds an empty parameter (numel 0, e.g. a
    zero-width layer of a configurable model) is skipped like any other, and a group of empty
    parameters alone counts the skip as well. The decision reaches each update through a NaN
    written into one of its gradients, which an empty gradient cannot hold: the weight beside
    the empty parameter used to take the step the other group skipped, and the empty group to
    count it as taken."""
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(5, 4, dtype=torch.float64))
    empty = torch.nn.Parameter(torch.zeros(0, 4, dtype=torch.float64))
    alone = torch.nn.Parameter(torch.zeros(0, dtype=torch.float64))
    opt = case.make([{"params": [("a", a)]}, {"params": [("b", b), ("empty", empty)]}, {"params": [("alone", alone)]}])
    b_before = b.detach().clone()
    a.grad = torch.full_like(a, float("inf"))
    b.grad = torch.randn_like(b)
    empty.grad, alone.grad = torch.zeros_like(empty), torch.zeros_like(alone)
    opt.step(**case.step_kwargs)
    assert torch.equal(b.detach(), b_before)
    counters = [(int(opt.state[p]["step"]), int(opt.state[p]["nonfinite_count"])) for p in (a, b, empty, alone)]
    assert counters == [(0, 1)] * 4


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).double()


def _train(model, opt, case, steps):
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 4, generator=gen, dtype=torch.float64), torch.randn(8, 2, generator=gen, dtype=torch.float64)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step(**case.step_kwargs)


@every_class
def test_a_checkpoint_of_another_parameter_order_names_the_parameter_as_named_parameters_does(case):
    """A checkpoint whose parameters come in another order than the loading optimizer's is refused
    where a state does not fit (torch's ``load_state_dict`` matches parameters by position and
    takes the checkpoint's ``param_names``), and the refusal names the parameter as the loading
    model's ``named_parameters()`` does, with the checkpoint's name beside it (the project's rule
    for errors: torch parameters named as ``named_parameters()`` names them). It used to name it by
    the checkpoint's name alone: "'0.bias' has shape (6,), expected (2, 6)" of the model's
    ``2.weight``, whose ``0.bias`` is (6,)."""
    model = _model()
    opt = case.make(model.named_parameters())
    _train(model, opt, case, 2)
    reordered = _model()
    fresh = case.make(list(reordered.named_parameters())[::-1])
    with pytest.raises(ValueError, match=r"parameter '2\.weight' \(index 1; '0\.bias' in the checkpoint\)"):
        fresh.load_state_dict(opt.state_dict())
    assert not fresh.state  # refused whole: nothing was loaded


@every_class
def test_a_refused_value_written_into_a_group_names_the_class_and_the_group(case):
    """A hyperparameter written into a param group after construction (by hand, or by a scheduler)
    that the class refuses raises at the next step naming the class and the param group, as the
    class's other step-time refusals name the class (a loop may hold several optimizers), and
    before any parameter moves. It used to name no group, and a value other than ``lr`` (whose
    check names the class) came with the core's bare message."""
    model = _model()
    named = list(model.named_parameters())
    opt = case.make([{"params": named[:2]}, {"params": named[2:]}])
    _train(model, opt, case, 1)
    before = [p.detach().clone() for _, p in named]
    opt.param_groups[1]["lr"] = -1.0
    name = case.cls.__name__
    with pytest.raises(ValueError, match=rf"^{name}: lr must be in \[0\.0, inf\), got -1\.0 \(param group 1\)$"):
        _train(model, opt, case, 1)
    assert all(torch.equal(p, b) for (_, p), b in zip(named, before))


def test_one_cycle_momentum_refused_by_faithful_s_adagrad_names_the_class():
    """``OneCycleLR`` (``cycle_momentum=True`` by default) writes ``momentum`` into every param
    group; faithful S-AdaGrad has no momentum (its ``momentum`` must stay 0): the first step
    refuses it naming the class, the group and the remedy, not with the core's bare message."""
    model = _model()
    opt = pt.SAdaGrad(model.parameters(), rank=2, mode="faithful")
    torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    with pytest.raises(ValueError, match=r"^SAdaGrad: momentum is not available in mode='faithful'.*\(param group 0\)$"):
        _train(model, opt, CLASS_CASES[0], 1)


@every_class
def test_grad_scaler_steps_as_the_same_steps_without_it(case):
    """``torch.amp.GradScaler`` (CPU, bfloat16 autocast) with ``unscale_`` and gradient clipping
    after it: its scale is a power of two, so the unscaled gradients are those of the loop without
    the scaler, and the trajectory is the same bit for bit. A batch with an Inf gradient is skipped
    by the scaler (it does not call ``step``), as the plain loop skips it: no parameter moves and
    no counter advances."""
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    y = torch.randn(8, 2, generator=torch.Generator().manual_seed(2))
    models = [_model().float() for _ in range(2)]
    opts = [case.make(m.named_parameters()) for m in models]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4, growth_interval=1)
    for i in range(4):
        for model, opt, scales in zip(models, opts, (True, False)):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = torch.nn.functional.mse_loss(model(x).float(), y)
            (scaler.scale(loss) if scales else loss).backward()
            if i == 1:
                model[0].weight.grad[0, 0] = float("inf")
            if scales:
                scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            if scales:
                scaler.step(opt, **case.step_kwargs)
                scaler.update()
            elif i != 1:
                opt.step(**case.step_kwargs)
    for a, b in zip(*(m.parameters() for m in models)):
        assert torch.equal(a, b)
    assert int(opts[0].state[models[0][0].weight]["step"]) == 3


@every_class
def test_a_cycled_momentum_reaches_the_step(case):
    """``OneCycleLR(cycle_momentum=True)`` writes ``betas`` (their first) or ``momentum`` into the
    param groups, whichever the class has (torch's rule: ``betas`` where ``defaults`` has them):
    the steps are those of writing the same ``lr`` and momentum by hand, and not those of the
    ``lr`` alone."""
    scheduled = _model()
    opt = case.make(scheduled.named_parameters())
    key = "betas" if "betas" in opt.defaults else "momentum"
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=case.lr, total_steps=10, cycle_momentum=True)
    written = []
    for _ in range(4):
        written.append((opt.param_groups[0]["lr"], opt.param_groups[0][key]))
        _train(scheduled, opt, case, 1)
        sched.step()
    assert len({m for _, m in written}) == 4  # the momentum did change at every step
    trajectories = []
    for with_momentum in (True, False):
        model = _model()
        by_hand = case.make(model.named_parameters())
        for lr, momentum in written:
            by_hand.param_groups[0]["lr"] = lr
            if with_momentum:
                by_hand.param_groups[0][key] = momentum
            _train(model, by_hand, case, 1)
        trajectories.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    scheduled_flat = torch.cat([p.detach().reshape(-1) for p in scheduled.parameters()])
    assert torch.equal(scheduled_flat, trajectories[0])
    assert not torch.equal(scheduled_flat, trajectories[1])


@every_class
def test_two_parameters_of_a_group_named_alike_are_refused_when_the_group_is_added(case):
    """A param group's parameters form one tree keyed by their names, so two that share a name (the
    ``named_parameters()`` of two models given together, which torch itself accepts) cannot be
    stepped. They are refused when the group is given, at construction or by ``add_param_group``,
    naming the class, the name and the group, and a refused ``add_param_group`` leaves the
    optimizer as it was (docs/adapters/torch.md). The step used to refuse them, after the param
    groups before had stepped."""
    encoder, decoder, head = _model(0), _model(1), _model(2)
    clashing = list(encoder.named_parameters()) + list(decoder.named_parameters())
    name = case.cls.__name__
    refusal = rf"^{name}: two parameters share the name '0\.weight' in param group {{}}: "
    with pytest.raises(ValueError, match=refusal.format(0)):
        case.make(clashing)
    opt = case.make(head.named_parameters())
    with pytest.raises(ValueError, match=refusal.format(1)):
        opt.add_param_group({"params": clashing})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [(f"enc.{n}", p) for n, p in encoder.named_parameters()]
                                   + [(f"dec.{n}", p) for n, p in decoder.named_parameters()]})
    x = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    head(decoder(encoder(x).repeat(1, 2)).repeat(1, 2)).sum().backward()
    opt.step(**case.step_kwargs)
    assert all(int(opt.state[p]["step"]) == 1 for m in (encoder, decoder, head) for p in m.parameters())


@every_class
def test_a_complex_parameter_is_refused_at_the_step_before_any_group_steps(case):
    """The methods are defined for real matrices. A complex parameter is taken at construction (as
    torch.optim and pytorch_optimizer's contract take it: their ``test_complex_not_supported``
    refuses it at ``step``), and refused by ``step`` before any param group moves, naming the
    class, the parameter as ``named_parameters()`` names it, its dtype and its group. It crashed
    in the step's non-finite test (``"lt_cpu" not implemented for 'ComplexFloat'``), or, alone,
    was named in the core's words (``params leaf``, ``mask ... out``)."""
    head = _model(2)
    z = torch.nn.Parameter(torch.zeros(3, 2, dtype=torch.complex128))
    opt = case.make([{"params": list(head.named_parameters())}, {"params": [("z", z)]}])
    for p in head.parameters():
        p.grad = torch.ones_like(p)
    z.grad = torch.ones_like(z)
    before = [p.detach().clone() for p in head.parameters()]
    name = case.cls.__name__
    with pytest.raises(TypeError, match=rf"^{name}: parameter 'z' has dtype torch\.complex128 in param group 1; "):
        opt.step(**case.step_kwargs)
    assert all(torch.equal(b, p) for b, p in zip(before, head.parameters()))
    assert not any(opt.state.values())  # no state made, no step counted


@every_class
def test_a_sparse_gradient_is_refused_naming_its_parameter_before_any_group_steps(case):
    """A sparse gradient (``nn.Embedding(sparse=True)``) is refused by ``step`` before any param
    group moves, as torch.optim's dense optimizers refuse it, naming the class, the parameter as
    ``named_parameters()`` names it, its group and the remedy. The refusal named the class alone."""
    head = _model(2)
    table = torch.nn.Embedding(5, 3, sparse=True)
    opt = case.make([{"params": list(head.named_parameters())}, {"params": list(table.named_parameters())}])
    for p in head.parameters():
        p.grad = torch.ones_like(p)
    table(torch.tensor([0, 2])).sum().backward()
    before = [p.detach().clone() for p in head.parameters()]
    name = case.cls.__name__
    with pytest.raises(RuntimeError, match=rf"^{name}: parameter 'weight' in param group 1 has a sparse gradient "
                                           rf"\(torch\.sparse_coo\); {name} does not support sparse gradients \(make "):
        opt.step(**case.step_kwargs)
    assert all(torch.equal(b, p) for b, p in zip(before, head.parameters()))
    assert not any(opt.state.values())  # no state made, no step counted


@every_class
def test_a_checkpoint_naming_two_parameters_alike_is_refused_by_load_state_dict(case):
    """``load_state_dict`` takes the checkpoint's ``param_names`` (as torch does), which key each
    param group's tree: a checkpoint that names two parameters of a group alike is refused whole
    by ``load_state_dict``, naming the class, the group and the checkpoint's names. It used to be
    refused with the bare "two parameters share the name '0.weight'" where the parameters had
    state, and loaded, for the step to refuse, where they had none."""
    model = _model()
    opt = case.make(model.named_parameters())
    _train(model, opt, case, 1)
    state_dict = opt.state_dict()
    state_dict["param_groups"][0]["param_names"] = ["0.weight"] * 4
    fresh = case.make(_model().named_parameters())
    with pytest.raises(ValueError, match=rf"^{case.cls.__name__}.load_state_dict: param group 0: two parameters share "
                                         r"the name '0\.weight' \(the checkpoint's param_names\)$"):
        fresh.load_state_dict(state_dict)
    assert not fresh.state and fresh.param_groups[0]["param_names"] == ["0.weight", "0.bias", "2.weight", "2.bias"]


@every_class
def test_a_step_inside_an_autocast_region_is_the_step_outside_it(case):
    """A loop that calls ``step`` inside its ``torch.autocast`` region (``scaler.step(opt)`` indented
    one level too far) steps as outside it, bit for bit: the optimizer's arithmetic is its own
    (float32 state of the parameters' dtype, docs/adapters/torch.md), as ``torch.optim``'s
    element-wise steps are untouched by autocast. Autocast used to run ASGO's, IF-Shampoo's and
    MBF's products in bfloat16 (other numbers), and Sketchy and S-AdaGrad refused their own
    float32 sketches as of another dtype. A closure, the user's forward and backward, still
    runs under the loop's autocast."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 4, generator=gen), torch.randn(8, 2, generator=gen)
    models = [_model().float() for _ in range(2)]
    opts = [case.make(m.named_parameters()) for m in models]
    autocast_in_closure = []
    for _ in range(3):
        for model, opt, inside in zip(models, opts, (True, False)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            if inside:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    opt.step(lambda: autocast_in_closure.append(torch.is_autocast_enabled("cpu")), **case.step_kwargs)
            else:
                opt.step(**case.step_kwargs)
    for a, b in zip(*(m.parameters() for m in models)):
        assert torch.equal(a, b)
    assert autocast_in_closure == [True] * 3


def test_autocast_is_found_without_torchs_private_query(monkeypatch):
    """Without torch's private one-call query of any autocast (``torch._C._is_any_autocast_enabled``,
    which a later torch may drop), ``step`` and ``MBF.warm_start`` ask each parameter device type
    through the public ``torch.is_autocast_enabled``: ASGO stepped and MBF warm-started inside a
    bfloat16 autocast region give the numbers of the same calls outside it, bit for bit (the same
    float32 operations on the same inputs: docs/adapters/torch.md), and neither raises. With the
    query gone and no fallback, the step raised ``AttributeError``; with a fallback that found
    nothing, autocast ran ASGO's products in bfloat16."""
    import torch._dynamo  # noqa: F401 - torch's own module reads the query at import: loaded before it goes

    monkeypatch.delattr(torch._C, "_is_any_autocast_enabled")
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 4, generator=gen), torch.randn(8, 2, generator=gen)
    models = [_model().float() for _ in range(2)]
    opts = [pt.ASGO(m.named_parameters(), lr=0.1) for m in models]
    grads = [{n: torch.randn(p.shape, generator=gen) for n, p in models[0].named_parameters()} for _ in range(2)]
    warm = [pt.MBF(m.named_parameters(), lr=1e-3) for m in models]
    for model, opt, mbf, inside in zip(models, opts, warm, (True, False)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=inside):
            mbf.warm_start(grads)
        for _ in range(2):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=inside):
                opt.step()
    for a, b in zip(*(m.parameters() for m in models)):
        assert torch.equal(a, b)
    for a, b in zip(*(m.parameters() for m in models)):
        assert all(torch.equal(torch.as_tensor(warm[0].state[a][k]), torch.as_tensor(v))
                   for k, v in warm[1].state[b].items())


@every_class
def test_channels_last_parameters_step_as_contiguous_ones_and_stay_channels_last(case):
    """A convolutional model in ``channels_last`` memory format (the layout GPU convolutions
    prefer: its 4-D weights are not contiguous) steps as the same model in the default format, bit
    for bit: both get the same gradient values (each in its parameter's layout, as autograd makes
    them) and the optimizer's arithmetic does not depend on the strides. Its weights stay
    ``channels_last`` after the steps: the update is written into the parameters, not into new
    tensors of another layout."""

    def conv_model():
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 2), torch.nn.Flatten(),
            torch.nn.Linear(2 * 3 * 3, 2),
        ).double()

    plain, last = conv_model(), conv_model().to(memory_format=torch.channels_last)
    weights = [m.weight for m in last if isinstance(m, torch.nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in weights)
    opts = [case.make(m.named_parameters()) for m in (plain, last)]
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        x, y = torch.randn(4, 3, 6, 6, generator=gen, dtype=torch.float64), torch.randn(4, 2, generator=gen, dtype=torch.float64)
        plain.zero_grad()
        torch.nn.functional.mse_loss(plain(x), y).backward()
        for p, q in zip(plain.parameters(), last.parameters()):
            q.grad = torch.empty_like(q).copy_(p.grad)  # empty_like keeps q's layout
        for opt in opts:
            opt.step(**case.step_kwargs)
    for p, q, start in zip(plain.parameters(), last.parameters(), conv_model().parameters()):
        assert torch.equal(p, q) and not torch.equal(q, start)
    assert all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in weights)
