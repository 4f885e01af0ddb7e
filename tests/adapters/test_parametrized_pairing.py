"""Weight/bias pairing (MBF, IF-Shampoo's ``grouping="weight_bias"``) of layers whose weight is
under a torch parametrization (``torch.nn.utils.parametrize``, ``parametrizations.spectral_norm``,
``orthogonal``, ``weight_norm``) or the hook-based ``spectral_norm``/``weight_norm``."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch.nn.utils import parametrize

import precond_ref.adapters.torch as pt
from precond_ref.adapters._torch_core import CoreOptimizer
from precond_ref.engine.layout import layer_member, unpaired_biases, weight_bias_groups


class Same(torch.nn.Module):
    """A parametrization that computes the weight as its ``original`` itself."""

    def forward(self, w):
        return w


class Scaled(torch.nn.Module):
    """A shape-preserving parametrization that is not the identity."""

    def forward(self, w):
        return 2.0 * w


def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).double()


def _train_alike(models, opts, inputs: int) -> None:
    """Three steps of each model with its optimizer on the same least-squares batches of ``inputs``
    features and 2 targets."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(8, inputs, generator=gen, dtype=torch.float64)
        y = torch.randn(8, 2, generator=gen, dtype=torch.float64)
        for model, opt in zip(models, opts):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()


def _blocks(opt):
    """Each param group's blocks as the optimizer's core transform makes them, by torch names."""
    out = []
    for group, paths in zip(opt.param_groups, opt._group_paths()):
        for block in CoreOptimizer._transform(opt, group).group_leaves(paths, group["params"]):
            out.append(sorted(".".join(p) for p in block.paths))
    return sorted(out)


OPTIMIZERS = [
    pytest.param(pt.MBF, dict(lr=1e-2, statistics_every=1, precondition_every=1), id="MBF"),
    pytest.param(pt.IFShampoo, dict(lr=1e-2, batch_size=8, grouping="weight_bias"), id="IFShampoo"),
]


def _parametrize(model, how):
    if how == "spectral_norm":
        torch.nn.utils.parametrizations.spectral_norm(model[0])
    elif how == "orthogonal":
        torch.nn.utils.parametrizations.orthogonal(model[0])
    elif how == "custom":
        parametrize.register_parametrization(model[0], "weight", Scaled())
    elif how == "hook_spectral_norm":
        torch.nn.utils.spectral_norm(model[0])
    return model


@pytest.mark.parametrize("how", ["spectral_norm", "orthogonal", "custom", "hook_spectral_norm"])
@pytest.mark.parametrize("cls, kwargs", OPTIMIZERS)
def test_single_tensor_parametrization_is_paired_with_the_bias(cls, kwargs, how):
    """The tensor a single-tensor parametrization keeps of a Linear weight (``original``, or the
    hook-based spectral norm's ``weight_orig``) has the weight's shape and is what the optimizer
    steps: it is paired with the layer's bias into the layer block ``[W | b]`` (spec ``mbf.md``:
    a linear layer's block has the bias as its homogeneous column), as the plain weight is, and
    without a warning."""
    model = _parametrize(_mlp(), how)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = cls(model.named_parameters(), **kwargs)
    names = dict(model.named_parameters())
    weight = next(n for n in names if n.startswith("0.") and n != "0.bias")
    assert _blocks(opt) == sorted([sorted([weight, "0.bias"]), ["2.bias", "2.weight"]])
    ((model(torch.randn(8, 4, dtype=torch.float64)) ** 2).mean()).backward()
    opt.step()
    if cls is pt.MBF:
        assert opt.state[names[weight]]["momentum"].shape == (3, 5)  # [W | b]: the bias as the homogeneous column


@pytest.mark.parametrize("cls, kwargs", OPTIMIZERS)
def test_identity_parametrization_steps_as_the_plain_model(cls, kwargs):
    """A parametrization whose weight is its ``original`` itself gives the same gradients as the
    plain layer, so with ``original`` paired as the weight the optimizer takes the plain model's
    steps: both trajectories are equal bit for bit (same blocks, same arithmetic; the parametrized
    model lists the bias before ``original``, which the pairing does not depend on)."""
    plain, wrapped = _mlp(), _mlp()
    parametrize.register_parametrization(wrapped[0], "weight", Same())
    opts = [cls(m.named_parameters(), **kwargs) for m in (plain, wrapped)]
    _train_alike((plain, wrapped), opts, 4)
    assert torch.equal(plain[0].weight, wrapped[0].parametrizations.weight.original)
    for a, b in ((plain[0].bias, wrapped[0].bias), (plain[2].weight, wrapped[2].weight), (plain[2].bias, wrapped[2].bias)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("hook", [False, True], ids=["parametrizations", "hook"])
@pytest.mark.parametrize("cls, kwargs", OPTIMIZERS)
def test_weight_norm_bias_is_its_own_block_with_a_warning(cls, kwargs, hook):
    """``weight_norm`` keeps a Linear weight as a magnitude and a direction (``original0``/``original1``,
    or ``weight_g``/``weight_v``), neither of them the weight: the bias cannot form the layer
    block, so it and each of those tensors are blocks of their own, which differs from the plain
    model's method; a warning at construction names the layer and its tensors (never silent)."""
    model = _mlp()
    if hook:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's deprecation of the hook-based weight_norm
            torch.nn.utils.weight_norm(model[0])
        split = ["0.weight_g", "0.weight_v"]
    else:
        torch.nn.utils.parametrizations.weight_norm(model[0])
        split = ["0.parametrizations.weight.original0", "0.parametrizations.weight.original1"]
    with pytest.warns(UserWarning, match=rf"{cls.__name__}: the weight of layer '0' is kept as '{split[0]}', "
                                         rf"'{split[1]}' .* its bias '0.bias' is not paired") as record:
        opt = cls(model.named_parameters(), **kwargs)
    assert len(record) == 1 and record[0].filename == __file__  # once, at the user's line
    assert _blocks(opt) == sorted([["0.bias"], [split[0]], [split[1]], ["2.bias", "2.weight"]])


def test_weight_norm_warns_only_where_the_bias_would_be_paired():
    """No warning where the plain model would not pair either: IF-Shampoo's default
    ``grouping="per_parameter"`` (no pairing at all), and a convolution (whose bias MBF never pairs)."""
    model = torch.nn.utils.parametrizations.weight_norm(torch.nn.Conv2d(2, 3, 3)).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pt.MBF(model.named_parameters(), lr=1e-2)
        linear = _mlp()
        torch.nn.utils.parametrizations.weight_norm(linear[0])
        pt.IFShampoo(linear.named_parameters(), lr=1e-2, batch_size=8)


@pytest.mark.parametrize("by_model", [False, True], ids=["named", "model"])
@pytest.mark.parametrize("cls, kwargs", OPTIMIZERS)
def test_a_weight_and_its_bias_in_different_param_groups_warn(cls, kwargs, by_model):
    """A param group is stepped as one tree, so a layer's weight and bias given in different param
    groups (the weight-decay recipe that gives every bias a group of its own) are blocks of their
    own, not the layer block ``[W | b]`` they make in one group: a warning names each such layer's
    weight and bias with their groups, once, at the user's line, when the second of them is given
    (constructor or ``add_param_group``); names come from ``named_parameters()`` or ``model=``.
    Layers whose weight and bias share a group, groups added later, and a method that pairs
    nothing (IF-Shampoo's default grouping) warn of nothing."""
    model = _mlp()
    named = dict(model.named_parameters())
    given = (lambda *names: [named[n] for n in names]) if by_model else (lambda *names: [(n, named[n]) for n in names])
    extra = {"model": model} if by_model else {}
    def split(layer: int, bias_group: int) -> str:
        return (f"{cls.__name__}: the weight '{layer}.weight' (param group 0) and the bias '{layer}.bias' (param "
                f"group {bias_group}) of one layer are in different param groups, so they are stepped as blocks")

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        opt = cls([{"params": given("0.weight", "2.weight")}, {"params": given("0.bias", "2.bias"), "lr": 1e-3}],
                  **kwargs, **extra)
    assert [str(w.message)[:len(split(0, 1))] for w in record] == [split(0, 1), split(2, 1)]
    assert all(w.filename == __file__ for w in record)
    assert _blocks(opt) == sorted([["0.weight"], ["2.weight"], ["0.bias"], ["2.bias"]])
    other = _mlp(1)
    unrelated = list(other.parameters()) if by_model else [(f"other.{n}", p) for n, p in other.named_parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        together = cls([{"params": given("0.weight", "0.bias")}, {"params": given("2.weight", "2.bias")}], **kwargs, **extra)
        assert _blocks(together) == sorted([["0.bias", "0.weight"], ["2.bias", "2.weight"]])
        one = cls(given("0.weight", "0.bias", "2.weight"), **kwargs, **extra)
        one.add_param_group({"params": unrelated})
        pt.IFShampoo([{"params": given("0.weight")}, {"params": given("0.bias")}], lr=1e-2, batch_size=8, **extra)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        one.add_param_group({"params": given("2.bias")})
    assert [str(w.message)[:len(split(2, 2))] for w in record] == [split(2, 2)] and record[0].filename == __file__


class Conv1D(torch.nn.Module):
    """Stand-in for transformers' ``Conv1D``: its weight stored inputs x outputs, ``x @ W + b``."""

    def __init__(self, nx, nf):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(nx, nf, dtype=torch.float64) * 0.3)
        self.bias = torch.nn.Parameter(torch.randn(nf, dtype=torch.float64) * 0.1)

    def forward(self, x):
        return x @ self.weight + self.bias


def test_parametrized_inputs_first_weight_pairs_as_its_plain_twin():
    """MBF pairs an inputs-first weight (found from ``model=``) with its bias as an out-last
    ``kernel``; under a parametrization its ``original`` is that weight, so a square one (which only
    the module tells apart) steps as the plain layer: equal trajectories bit for bit."""
    torch.manual_seed(0)
    plain = torch.nn.Sequential(Conv1D(3, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).double()
    wrapped = torch.nn.Sequential(Conv1D(3, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).double()
    wrapped.load_state_dict(plain.state_dict())
    parametrize.register_parametrization(wrapped[0], "weight", Same())
    kwargs = dict(lr=1e-2, statistics_every=1, precondition_every=1)
    opts = [pt.MBF(m.parameters(), model=m, **kwargs) for m in (plain, wrapped)]
    _train_alike((plain, wrapped), opts, 3)
    assert opts[1]._path(wrapped[0].parametrizations.weight.original, 1) == ("0", "kernel")  # out-last, as the plain one
    assert torch.equal(plain[0].weight, wrapped[0].parametrizations.weight.original)
    assert torch.equal(plain[0].bias, wrapped[0].bias)


def test_core_pairing_reads_parametrized_names():
    """The core rule (specs README section 5, with torch's parametrization names): a layer's
    weight is its ``weight``/``kernel`` leaf, or the ``parametrizations/weight/original`` or
    ``weight_orig`` tensor it is computed from; a plain leaf comes before such a tensor; the
    split tensors of ``weight_norm`` are never a weight, and :func:`unpaired_biases` names their
    layer unless the tensors are a convolution's."""
    w, b = np.zeros((3, 4)), np.zeros(3)
    assert layer_member(("a", "parametrizations", "weight", "original")) == (("a",), "weight")
    assert layer_member(("a", "weight_orig")) == (("a",), "weight")
    assert layer_member(("a", "bias")) == (("a",), "bias")
    paths = [("a", "bias"), ("a", "parametrizations", "weight", "original"),
             ("b", "weight"), ("b", "weight_orig"), ("b", "bias"),
             ("c", "bias"), ("c", "parametrizations", "weight", "original0"), ("c", "parametrizations", "weight", "original1"),
             ("d", "bias"), ("d", "parametrizations", "weight", "original0"), ("d", "parametrizations", "weight", "original1"),
             ("e", "weight"), ("e", "parametrizations", "bias", "original")]
    leaves = [b, w, w, w, b, b, np.zeros((3, 1)), w, b, np.zeros((3, 1, 2, 2)), np.zeros((3, 4, 2, 2)), w, b]
    groups = {g.key: g.indices for g in weight_bias_groups(paths, leaves)}
    assert groups == {"a/parametrizations/weight/original": (1, 0), "b/weight": (2, 4), "b/weight_orig": (3,),
                      "c/bias": (5,), "c/parametrizations/weight/original0": (6,),
                      "c/parametrizations/weight/original1": (7,), "d/bias": (8,),
                      "d/parametrizations/weight/original0": (9,), "d/parametrizations/weight/original1": (10,),
                      "e/weight": (11, 12)}
    assert unpaired_biases(paths, leaves) == [(("c",), [paths[6], paths[7]])]
