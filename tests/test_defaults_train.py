"""Every method trains at its defaults: the nine torch classes and the nine core factories, each with
every argument at its default (plus ``batch_size`` where the method needs B), make at least half of
``torch.optim.Adam``'s progress at its defaults on a small standard problem.

The problem is the README's ``compare`` MLP as ``records/defaults/sweep.py`` trains it
(``digits_mlp``: 64-64 tanh-10 on scikit-learn's digits, cross-entropy, mini-batches of 64), 150
steps from seed 0; progress is the fall of the training loss from its start, and the share is
``(L0 - L) / (L0 - L_adam)``. Half is the bar: at the defaults every method makes 1.3 to 1.4 of
Adam's progress on this problem (``docs/defaults.md``), while a rate a decade or more too small
makes less than two fifths of it (0.01 to 0.36).
"""

from __future__ import annotations

import inspect
import math
import pathlib

import pytest
from loading import load_file

torch = pytest.importorskip("torch")

import precond_ref as pr  # noqa: E402

SWEEP = load_file("defaults_sweep", pathlib.Path(__file__).resolve().parents[1] / "records/defaults/sweep.py")
PROBLEM = "digits_mlp"
SHARE = 0.5
#: Each torch class's core factory.
FACTORIES = {
    "AGD": pr.agd, "ASGO": pr.asgo, "DASGO": pr.dasgo, "Sketchy": pr.sketchy, "SAdaGrad": pr.s_adagrad,
    "RFRMSProp": pr.rf_rmsprop, "RFAdamW": pr.rf_adamw, "IFShampoo": pr.if_shampoo, "MBF": pr.mbf,
}


@pytest.fixture(scope="module")
def problem():
    torch.set_num_threads(1)
    return SWEEP.Problem(PROBLEM, 0)


@pytest.fixture(scope="module")
def start_and_adam():
    return SWEEP.start_and_adam(PROBLEM, 0)


def _share(loss: float, start_and_adam: tuple) -> float:
    start, adam = start_and_adam
    return (start - loss) / (start - adam) if math.isfinite(loss) else -math.inf


@pytest.mark.parametrize("method", SWEEP.METHODS)
def test_torch_class_trains_at_its_defaults(method, problem, start_and_adam):
    share = _share(SWEEP.final_loss(problem, lambda m: SWEEP.optimizer_of(method, m, problem.batch_size)), start_and_adam)
    assert share >= SHARE, f"{method} at its defaults: {share:.3f} of Adam's progress"


class _CoreOptimizer(torch.optim.Optimizer):
    """The core factory itself on the model's named parameters (torch tensors in the core, no
    adapter): ``step`` hands the gradients to ``update`` and adds the updates."""

    def __init__(self, named: list, transform) -> None:
        super().__init__([p for _, p in named], {})
        self.names = [n for n, _ in named]
        self.transform = transform
        self.state_ = None

    @torch.no_grad()
    def step(self, closure=None):
        params = dict(zip(self.names, self.param_groups[0]["params"]))
        if self.state_ is None:
            self.state_ = self.transform.init(params)
        grads = {n: p.grad for n, p in params.items()}
        updates, self.state_ = self.transform.update(grads, self.state_, params)
        for n, p in params.items():
            p.add_(updates[n])


@pytest.mark.parametrize("method", SWEEP.METHODS)
def test_core_factory_trains_at_its_defaults(method, problem, start_and_adam):
    factory = FACTORIES[method]
    kwargs = {"batch_size": problem.batch_size} if method in SWEEP.NEEDS_BATCH_SIZE else {}

    def make(model):
        return _CoreOptimizer(list(model.named_parameters()), factory(**kwargs))

    share = _share(SWEEP.final_loss(problem, make), start_and_adam)
    assert share >= SHARE, f"precond_ref.{factory.__name__} at its defaults: {share:.3f} of Adam's progress"


def test_defaults_are_the_sweeps_choice():
    """Every method's principled default is the rate ``chosen_rate`` picks from the sweep's data
    (``records/defaults/sweep.json``), so the code and its evidence page cannot drift apart. Where a
    method's default depends on its mode (``learning_rate=None``), the principled one is swept and
    faithful mode keeps the authors' rate."""
    import json

    from precond_ref.methods.asgo import ASGO_LEARNING_RATE
    from precond_ref.methods.mbf import MBF_LEARNING_RATE
    from precond_ref.methods.root_free import IF_SHAMPOO_LEARNING_RATE

    by_mode = {"ASGO": ASGO_LEARNING_RATE, "IFShampoo": IF_SHAMPOO_LEARNING_RATE, "MBF": MBF_LEARNING_RATE}
    data = json.loads(pathlib.Path(SWEEP.__file__).with_name("sweep.json").read_text())
    assert set(data["methods"]) == set(SWEEP.METHODS)
    for method, rows in data["methods"].items():
        default = inspect.signature(FACTORIES[method]).parameters["learning_rate"].default
        if method in by_mode:
            assert default is None, method
            default = by_mode[method]["principled"]
            assert by_mode[method]["faithful"] == SWEEP.AUTHORS[method], method
        assert SWEEP.chosen_rate(method, rows) == default, method


def test_the_evidence_page_shows_the_sweep():
    """``docs/defaults.md`` shows the table :func:`table` renders from the sweep's data, the chosen
    rates in bold: the page cannot drift from ``records/defaults/sweep.json`` either."""
    import json

    root = pathlib.Path(__file__).resolve().parents[1]
    data = json.loads(pathlib.Path(SWEEP.__file__).with_name("sweep.json").read_text())
    assert SWEEP.table(data) in (root / "docs" / "defaults.md").read_text()
