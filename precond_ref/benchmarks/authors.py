"""The authors' implementations, timed beside ours (torch rows) where they can be imported.

Nothing of them is shipped: ``sirfshampoo`` (f-dangel/sirfshampoo, the authors' IF-Shampoo) installs
from the package index; the authors' ASGO / DASGO (infinity-stars/ASGO, not packaged) are imported
from a checkout named by ``--authors-path``. Each runs at the settings of our entry (and of each
variant whose settings its constructor can express), on the same module and gradients; what cannot
be imported is listed as skipped with the reason.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

from .common import Contender, core_kwargs_for

__all__ = ["AUTHORS", "authors_rows"]


class _Together:
    """Several torch optimizers stepped as one (the authors' trainers send some tensors to Adam)."""

    def __init__(self, optimizers: list) -> None:
        self.optimizers = optimizers

    @property
    def state(self) -> dict:
        return {k: v for o in self.optimizers for k, v in o.state.items()}

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()


def _sirfshampoo_kwargs(kw: dict, batch_size: int) -> dict:
    return {
        "lr": kw["learning_rate"], "alpha1": kw["momentum"], "beta2": kw["preconditioner_lr"],
        "alpha2": kw["preconditioner_momentum"], "lam": kw["damping"], "kappa": kw.get("weight_decay", 0.0),
        "T": kw.get("precondition_every", 1), "structures": kw.get("structures", "dense"),
        "preconditioner_dtypes": kw.get("factor_dtype"), "batch_size": batch_size,
    }


def _sirfshampoo(cls: Any, module: Any, named: list, kwargs: dict) -> Any:
    return cls(module, **kwargs)


def _asgo_kwargs(kw: dict, batch_size: int) -> dict:
    return {"learning_rate": kw["learning_rate"], "momentum": kw["b1"], "weight_decay": kw["weight_decay"], "beta2": kw["b2"]}


def _dasgo_kwargs(kw: dict, batch_size: int) -> dict:
    return {**_asgo_kwargs(kw, batch_size), "eps": kw["eps"]}


def _split_like_the_asgo_trainer(cls: Any, module: Any, named: list, kwargs: dict) -> Any:
    """The authors' trainer: matrices to their optimizer, 1-D tensors and embeddings to Adam(0.9, 0.95)."""
    import torch

    matrices = [p for n, p in named if p.ndim == 2 and "emb" not in n]
    rest = [p for n, p in named if not (p.ndim == 2 and "emb" not in n)]
    optimizers = [cls(matrices, **kwargs)] if matrices else []
    if rest:
        optimizers.append(torch.optim.Adam(rest, lr=kwargs["learning_rate"], betas=(0.9, 0.95), eps=1e-8))
    return _Together(optimizers)


@dataclasses.dataclass(frozen=True)
class AuthorsCode:
    """How to import and build one authors' optimizer at the settings of our ``method``."""

    method: str
    label: str
    module: str
    attribute: str
    kwargs: Callable[[dict, int], dict]  # (our core kwargs, batch size) -> their constructor's
    build: Callable[[Any, Any, list, dict], Any]  # (class, module, named parameters, kwargs) -> optimizer
    how: str


AUTHORS = (
    AuthorsCode("if_shampoo", "SIRFShampoo (authors)", "sirfshampoo", "SIRFShampoo", _sirfshampoo_kwargs, _sirfshampoo,
                "pip install sirfshampoo"),
    # Their optimizer modules import each other through optimizers.utils.utils, which imports both
    # cleanly (importing optimizers.asgo or .dasgo first is a circular import); their modules also
    # `from config import *`, a module of their trainer's that the checkout does not have.
    AuthorsCode("asgo", "asgo (authors)", "optimizers.utils.utils", "asgo", _asgo_kwargs, _split_like_the_asgo_trainer,
                "--authors-path to a checkout of infinity-stars/ASGO (with a config module on the path)"),
    AuthorsCode("dasgo", "dasgo (authors)", "optimizers.utils.utils", "dasgo", _dasgo_kwargs, _split_like_the_asgo_trainer,
                "--authors-path to a checkout of infinity-stars/ASGO (with a config module on the path)"),
)


def authors_rows(
    contenders: list[Contender],
    measure: Callable[[Callable[[Any, list], tuple[Any, list[str]]], dict, dict], dict],
    batch_size: int,
    timing: Callable[[Contender], dict],
) -> tuple[list[dict], list[str]]:
    """Rows of the authors' code for the contenders' methods, and the reasons for what was skipped.

    ``measure(make, extra, timing)`` times ``make(module, named) -> (optimizer, notes)`` as our
    torch rows are timed.
    """
    import torch

    from .measure import run_row

    rows, skipped = [], []
    for code in AUTHORS:
        mine = [c for c in contenders if c.entry.name == code.method]
        if not mine:
            continue
        try:
            cls = getattr(importlib.import_module(code.module), code.attribute)
        except Exception as err:  # their modules import their trainers' packages, which may fail in many ways
            skipped.append(f"{code.label}: cannot import {code.module}.{code.attribute} ({type(err).__name__}: {err}); {code.how}")
            continue
        seen = set()
        for contender in mine:
            kwargs = code.kwargs(core_kwargs_for(contender.entry, torch, "torch"), batch_size)
            if repr(kwargs) in seen:  # a variant its constructor cannot express (e.g. our faithful mode)
                continue
            seen.add(repr(kwargs))
            label = code.label if contender.variant is None else f"{code.label} ({contender.variant})"

            def make(module: Any, named: list, kwargs: dict = kwargs) -> tuple[Any, list[str]]:
                return code.build(cls, module, named, kwargs), []

            rows.append(run_row("torch", f"authors:{code.method}", label, lambda m=make, c=contender: measure(m, {}, timing(c)), contender.variant))
    return rows, skipped
