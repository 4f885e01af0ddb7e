"""The table of methods that ``compare`` and ``bench`` run: one :class:`MethodEntry` per optimizer.

Adding a method to both commands is adding one entry to :data:`METHODS`: the core factory's name,
its hyperparameters per model (the papers' recommended values, with the reference they come from),
the per-call keyword arguments its ``update`` needs (e.g. ``batch_size``), and the name of its torch
adapter class. An entry whose factory is not (yet) in :mod:`precond_ref` is skipped by both
commands with a note, so the table may run ahead of the library.

The two baselines (SGD with momentum and Adam) are entries too, with ``factory=None``: on the NumPy /
CuPy backends they are small core transforms defined in :mod:`precond_ref.compare`; on torch and JAX
they are ``torch.optim.SGD`` / ``torch.optim.Adam`` and ``optax.sgd`` / ``optax.adam``.

Models are the ones of ``compare`` (:mod:`precond_ref.compare.digits`): ``"mlp"`` (64-64-10,
tanh), ``"cnn"`` (two 3x3 convolutions and a linear layer) and ``"autoencoder"`` (64-64-32-8-32-64-64)
on scikit-learn's 8x8 digits, mini-batches of 64. The learning rates below are the papers' values;
the default ``compare`` run tunes each one on a log grid centred on it, the other values stay fixed.

This module is pure data (no NumPy), so that ``compare --help`` works without the ``compare`` extra.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["MethodEntry", "METHODS", "BASELINES", "BENCH_ONLY", "MODELS", "CLASSIFIERS", "entry_by_name"]

# The models of compare (defined in precond_ref.compare.digits); the autoencoder reports no accuracy.
MODELS = ("mlp", "cnn", "autoencoder")
CLASSIFIERS = ("mlp", "cnn")


@dataclass(frozen=True)
class MethodEntry:
    """One optimizer as the ``compare`` and ``bench`` commands run it.

    Attributes
    ----------
    name:
        The name on the command line (``--methods``).
    factory:
        Attribute of :mod:`precond_ref` that builds the core transform, or ``None`` for a baseline.
    label:
        Name shown in tables and plots.
    hyperparameters:
        ``{model: {argument: value}}`` in core (optax-like) names; the key ``"*"`` applies to
        every model and is overridden by a model's own entries.
    update_kwargs:
        Names of the per-call inputs ``update`` needs, filled by the runner from the training
        loop (``"batch_size"``: the number of examples averaged in the loss).
    torch_class:
        Name of the class in :mod:`precond_ref.adapters.torch` (its ``core_kwargs`` must map the
        torch-style arguments back to ``hyperparameters``; otherwise the runner wraps the factory
        in a generic adapter and says so).
    reference:
        Where the values come from (paper, table, or authors' code) and what was adapted.
    bench_hyperparameters:
        Overrides, for ``bench`` (large layers), of the hyperparameters of the ``"cnn"`` model.
    bench_max_size:
        ``bench`` skips (with a note) layers with more parameters than this, if set.
    """

    name: str
    factory: Optional[str]
    label: str
    hyperparameters: dict[str, dict[str, Any]]
    reference: str
    update_kwargs: tuple[str, ...] = ()
    torch_class: Optional[str] = None
    bench_hyperparameters: dict[str, Any] = field(default_factory=dict)
    bench_max_size: Optional[int] = None

    def kwargs_for(self, model: str) -> dict[str, Any]:
        """The core keyword arguments of this method for ``model``."""
        return {**self.hyperparameters.get("*", {}), **self.hyperparameters.get(model, {})}

    def bench_kwargs(self) -> dict[str, Any]:
        """The core keyword arguments used by ``bench``: the CNN's, with the bench overrides."""
        return {**self.kwargs_for("cnn"), **self.bench_hyperparameters}

    @property
    def is_baseline(self) -> bool:
        return self.factory is None


BASELINES = (
    MethodEntry(
        name="sgd_momentum",
        factory=None,
        label="SGD-momentum",
        hyperparameters={"*": {"learning_rate": 0.1, "momentum": 0.9}},
        reference="heavy ball, no dampening (torch.optim.SGD convention); lr 0.1 and momentum 0.9, the "
        "usual CNN setting (He et al., CVPR 2016), not tuned here",
    ),
    MethodEntry(
        name="adam",
        factory=None,
        label="Adam",
        hyperparameters={"*": {"learning_rate": 1e-3, "b1": 0.9, "b2": 0.999, "eps": 1e-8}},
        reference="Kingma & Ba, ICLR 2015, Algorithm 1 defaults (lr 1e-3, betas (0.9, 0.999), eps 1e-8)",
    ),
)

def _method(name: str, label: str, torch_class: str, hyperparameters: dict[str, Any], reference: str, **options: Any) -> MethodEntry:
    """The entry of the core factory ``precond_ref.<name>`` and the torch class ``torch_class``, with
    one set of ``hyperparameters`` for every model; ``options`` are the other fields of :class:`MethodEntry`."""
    return MethodEntry(
        name=name, factory=name, label=label, hyperparameters={"*": hyperparameters}, reference=reference, torch_class=torch_class, **options
    )


METHODS = BASELINES + (
    _method(
        "agd", "AGD", "AGD", {"learning_rate": 1e-3, "b1": 0.9, "b2": 0.999, "delta": 1e-8, "weight_decay": 0.5},
        "Yue et al., NeurIPS 2023; the authors' CIFAR example (atorch 7fb7da8): lr 1e-3, "
        "betas (0.9, 0.999), delta 1e-8, decoupled weight decay 5e-4/lr (5e-4 per step)",
    ),
    _method(
        "asgo", "ASGO", "ASGO", {"learning_rate": 1e-2, "b1": 0.9, "b2": 0.8, "weight_decay": 0.1, "rms_target": 0.2},
        "An et al., arXiv 2503.20762; the authors' GPT-2 trainer (infinity-stars/ASGO d3ef14b): "
        "lr 0.01, b1 0.9, b2 0.8, weight decay 0.1, RMS 0.2; 1-D parameters to Adam (0.9, 0.95)",
    ),
    _method(
        "dasgo", "DASGO", "DASGO", {"learning_rate": 1e-2, "b1": 0.9, "b2": 0.95, "eps": 1e-8, "weight_decay": 0.1},
        "An et al., arXiv 2503.20762; the authors' config file (infinity-stars/ASGO d3ef14b): "
        "lr 0.01, betas (0.9, 0.95), eps 1e-8, weight decay 0.1",
    ),
    _method(
        "sketchy", "Sketchy", "Sketchy", {"learning_rate": 1e-3, "rank": 16, "b2": 0.999},
        "Feinberg et al., NeurIPS 2023; tearfree defaults (google-research/precondition 239a8cd): "
        "b2 0.999, eps 1e-7, RMSProp graft, Nesterov momentum 0.9; rank = 1/4 of the largest axis as in "
        "the paper's rank 256 at block 1024; lr 1e-3, the class's default (no lr is published)",
        bench_hyperparameters={"rank": 256, "block_size": 1024},
    ),
    _method(
        "s_adagrad", "S-AdaGrad", "SAdaGrad", {"learning_rate": 0.1, "rank": 16, "delta": 0.0},
        "Feinberg et al., NeurIPS 2023, Appendix A protocol (OCO code, precondition 239a8cd): "
        "delta 0 and AdaGrad sums (b2 = 1); lr 0.1, a point of the authors' log grid [1e-6, 1] (not tuned "
        "here; the paper reports no single value); rank 16",
        # Full-matrix FD on the flattened layer in blocks of 4096: (rank + 1) x size state, 285 MB
        # of sketch for the 4096x1024 case at rank 16, which bench times like every other row.
        bench_hyperparameters={"block_size": 4096},
    ),
    _method(
        "rf_rmsprop", "RF-RMSProp", "RFRMSProp",
        {"learning_rate": 4.98e-3, "b2": 1.0 - 1.18e-3, "damping": 5.58e-5, "momentum": 0.961, "weight_decay": 2.32e-3},
        "Lin et al., ICML 2024; best CIFAR-100 ResNet-34 values in the authors' scripts "
        "(yorkerlin/remove-the-square-root e26d7c9): beta1 4.98e-3, beta2 1.18e-3, lambda 5.58e-5, "
        "alpha1 0.961, kappa 2.32e-3",
        update_kwargs=("batch_size",),
    ),
    _method(
        "rf_adamw", "RF-AdamW", "RFAdamW",
        {"learning_rate": 0.5, "b1": 0.9, "b2": 1.0 - 1.18e-3, "damping": 5.58e-5, "weight_decay": 2.32e-3},
        "an extra, not in Lin et al. (ICML 2024): yorkerlin/remove-the-square-root c8d43f2 "
        "myoptim/rfadamw.py, which publishes no values; RF-RMSProp's CIFAR-100 ResNet-34 beta2, lambda and "
        "kappa (its denominator has the same root-free form), Adam's b1 0.9, no bias correction (the code's default); "
        "lr 0.5, no published value: a first tuned compare run centred on RF-RMSProp's 4.98e-3 found the MLP and the "
        "autoencoder best at 1.6 and no rate up to 0.05 training the CNN, so the sweep is centred 100x higher",
        update_kwargs=("batch_size",),
        # bench times steps of larger models: RF-RMSProp's published lr, as before compare ran RF-AdamW
        bench_hyperparameters={"learning_rate": 4.98e-3},
    ),
    _method(
        "if_shampoo", "IF-Shampoo", "IFShampoo",
        {
            "learning_rate": 1e-3,
            "momentum": 0.9,
            "preconditioner_lr": 0.01,
            "preconditioner_momentum": 0.5,
            "damping": 1e-3,
            "precondition_every": 2,
        },
        "Lin et al., ICML 2024; SIRFShampoo defaults (f-dangel/sirfshampoo 7bc5eaf): lr 1e-3, "
        "momentum 0.9, factor lr 0.01, factor momentum 0.5, damping 1e-3; T = 2 as in the authors' scripts",
        update_kwargs=("batch_size",),
    ),
    MethodEntry(
        name="mbf",
        factory="mbf",
        label="MBF",
        hyperparameters={
            "mlp": {"learning_rate": 1e-5, "damping": 3e-4, "statistics_every": 2, "precondition_every": 25},
            "autoencoder": {"learning_rate": 1e-5, "damping": 3e-4, "statistics_every": 2, "precondition_every": 25},
            "cnn": {"learning_rate": 3e-5, "damping": 3e-3, "statistics_every": 10, "precondition_every": 100},
            "*": {"momentum": 0.9, "b2": 0.9},
        },
        reference="Bahamou, Goldfarb, Ren, AISTATS 2023; the authors' demo (achrafba96/mbf b0ace6e): "
        "autoencoder and MLP as their MNIST autoencoder (lr 1e-5, lambda 3e-4, T1 2, T2 25), CNN as their CIFAR-100 VGG16 "
        "(lr 3e-5, lambda 3e-3, T1 10, T2 100); momentum 0.9, rho 0.9",
        torch_class="MBF",
    ),
)


# Entries timed by ``bench`` but not trained by ``compare`` (none now: RF-AdamW, once here, runs in both).
BENCH_ONLY: tuple = ()


def entry_by_name(name: str) -> MethodEntry:
    """The entry of :data:`METHODS` or :data:`BENCH_ONLY` called ``name``."""
    for entry in METHODS + BENCH_ONLY:
        if entry.name == name:
            return entry
    raise KeyError(name)
