"""The per-layer cases of ``bench``: one optimizer step on the parameters of one layer or block stack.

A case is a torch module whose parameters form one param group: ``OUTxIN`` a ``Linear`` (weight and
bias), ``OUTxINxKHxKW`` a ``Conv2d``, ``tfLxW`` the parameters of ``L`` GPT blocks of width ``W``
(qkv, proj, fc, out and two LayerNorms each: equal shapes repeat, so batched-block code paths run).
Gradients cycle through a few fixed random tensors so that sketches and factors see new data.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional

import numpy as np

from ..cli import UserError
from .authors import authors_rows
from .common import (
    BUDGET_S, Contender, core_kwargs_for, jax_optimizer, time_steps, torch_optimizer, update_extra, warms_every_pattern,
)
from .measure import add_ratios, core_measure, jax_measure, section_rows, timing_for, torch_measure, torch_sync

__all__ = ["CASES", "QUICK_CASES", "parse_cases", "bench_case", "eigh_reference", "FRAMEWORKS"]

CASES = {
    "1024x1024": ("linear", 1024, 1024),
    "4096x1024": ("linear", 4096, 1024),
    "conv64-64-3x3": ("conv", 64, 64, 3, 3),
    "tf2x512": ("tf", 2, 512),
}
QUICK_CASES = {"64x32": ("linear", 64, 32), "conv8-8-3x3": ("conv", 8, 8, 3, 3), "tf2x16": ("tf", 2, 16)}
FRAMEWORKS = ("torch", "jax", "numpy", "cupy")
BATCH_SIZE = 128  # what the methods that need B (root-free) are told
_GRADIENTS = 3
EIGH_SIZE = 1024  # the CPU yardstick: one float32 eigh of a 1024x1024 matrix


def _parse_case(name: str) -> tuple:
    match = re.fullmatch(r"tf(\d+)x(\d+)", name)
    if match:
        layers, width = int(match.group(1)), int(match.group(2))
        if layers >= 1 and width >= 1:
            return ("tf", layers, width)
    try:
        dims = tuple(int(d) for d in name.lower().split("x"))
    except ValueError:
        dims = ()
    if len(dims) == 2 and min(dims) >= 1:
        return ("linear", *dims)
    if len(dims) == 4 and min(dims) >= 1:
        return ("conv", *dims)
    known = ", ".join({**CASES, **QUICK_CASES})
    raise UserError(f"unknown layer case {name!r}: use one of {known}, a shape like 512x256 or 32x16x3x3, or tfLxW")


def parse_cases(text: str) -> dict[str, tuple]:
    known = {**CASES, **QUICK_CASES}
    out = {name: known[name] if name in known else _parse_case(name) for name in (t.strip() for t in text.split(",")) if name}
    if not out:
        raise UserError("--cases is empty")
    return out


def case_module(spec: tuple, dtype: Any, device: str) -> Any:
    """The case's torch module, initialised with torch's defaults (seeded)."""
    import torch

    from .models import torch_block

    torch.manual_seed(1234)
    kind = spec[0]
    if kind == "linear":
        return torch.nn.Linear(spec[2], spec[1]).to(device=device, dtype=dtype)
    if kind == "conv":
        _, out, cin, kh, kw = spec
        return torch.nn.Conv2d(cin, out, (kh, kw), padding=(kh // 2, kw // 2)).to(device=device, dtype=dtype)
    _, layers, width = spec
    return torch.nn.ModuleDict({"blocks": torch.nn.ModuleList([torch_block(width, dtype, device) for _ in range(layers)])})


def _gradients(named: dict, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{name: rng.standard_normal(tuple(p.shape)) for name, p in named.items()} for _ in range(_GRADIENTS)]


# ---------------------------------------------------------------------------------------------
# Baselines and the eigh yardstick


def torch_baselines() -> list[tuple[str, Callable[[list], Any]]]:
    import torch

    return [
        ("torch Adam(foreach)", lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True)),
        ("torch Adam(fused)", lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True)),
    ]


def eigh_reference(device: str, warmup: int, repeats: int, budget_s: float, n: int = EIGH_SIZE) -> dict:
    """One ``torch.linalg.eigh`` of a symmetric positive definite ``n x n`` float32 matrix: the yardstick of the layer cases (docs/performance.md)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen, dtype=torch.float64)
    spd = (a @ a.T / n + torch.eye(n, dtype=torch.float64)).to(device=device, dtype=torch.float32)
    result = time_steps(lambda i: torch.linalg.eigh(spd), torch_sync(device), warmup=warmup, repeats=repeats, budget_s=budget_s)
    return {"framework": "torch", "method": "reference", "variant": None, "label": f"torch.linalg.eigh {n}x{n} float32", **result}


# ---------------------------------------------------------------------------------------------


def bench_case(
    contenders: list[Contender],
    spec: tuple,
    frameworks: list[str],
    *,
    dtype: str = "float32",
    warmup: int = 2,
    repeats: int = 7,
    budget_s: float = BUDGET_S,
    refresh_windows: bool = True,
    min_window_s: float = 0.0,
    torch_device: str = "cpu",
    torch_compile: str = "default",
    with_authors: bool = True,
    reference: Optional[dict] = None,
    progress: Optional[Callable[[str], None]] = None,
    on_row: Optional[Callable[[dict], None]] = None,
    rounds: int = 1,
    peers: Any = None,
) -> tuple[list[dict], list[str]]:
    """Rows of one layer case (per framework: its baselines first, then every contender, then the
    authors' code for torch), and the reasons the authors' code was skipped. The torch rows'
    ``reference_ratio`` is their mean over the mean of ``reference`` (the eigh yardstick). With
    ``peers``, the torch section also holds the other libraries' rows (:mod:`~.peers`)."""
    import torch

    tdtype = getattr(torch, dtype)
    initial = {name: p.detach().double().numpy() for name, p in case_module(spec, tdtype, "cpu").named_parameters()}
    grads = _gradients(initial)
    size = sum(int(np.prod(v.shape)) for v in initial.values())
    timing = timing_for(warmup, repeats, budget_s, refresh_windows, min_window_s)
    every_pattern = warms_every_pattern(torch_compile, torch_device)
    torch_timing = timing_for(warmup, repeats, budget_s, refresh_windows, min_window_s, every_pattern)
    captured_timing = timing_for(warmup, repeats, budget_s, refresh_windows, min_window_s, True)  # CuPy rows

    def too_large(contender: Contender) -> Optional[str]:
        limit = contender.entry.bench_max_size
        return f"{size} parameters > the entry's bench_max_size {limit}" if limit is not None and size > limit else None

    rows: list[dict] = []
    skipped: list[str] = []
    for framework in frameworks:
        if framework == "jax":
            baselines = [("optax.adam (jit)", lambda: _jax_layer(None, initial, grads, dtype, {}, timing(None)))]
            measure = lambda c: _jax_layer(c, initial, grads, dtype, update_extra(c, BATCH_SIZE), timing(c))  # noqa: E731
        else:  # the numpy / cupy rows are the core on those arrays, against torch Adam on the same device
            device = torch_device if framework == "torch" else ("cuda" if framework == "cupy" else "cpu")
            torch_measure_ = _torch_measurer(spec, tdtype, device, grads)
            baselines = [
                (label, lambda f=factory: torch_measure_(lambda module, named: (f([p for _, p in named]), []), {}, timing(None)))
                for label, factory in torch_baselines()[: 2 if framework == "torch" else 1]
            ]
            if framework == "torch":
                measure = lambda c: torch_measure_(  # noqa: E731
                    lambda module, named: torch_optimizer(c, named, torch_compile), update_extra(c, BATCH_SIZE), torch_timing(c)
                )
            else:
                core_timing = captured_timing if framework == "cupy" else timing
                measure = lambda c, f=framework, t=core_timing: _core_layer(  # noqa: E731
                    c, initial, grads, dtype, update_extra(c, BATCH_SIZE), f, t(c)
                )
        section = section_rows(framework, baselines, contenders, measure, progress, too_large, rounds, on_row=on_row)
        if framework == "torch" and with_authors:
            authors, skipped = authors_rows(contenders, torch_measure_, BATCH_SIZE, timing)
            section.extend(authors)
        if framework == "torch" and peers:
            from .peers import peer_rows

            others, notes = peer_rows(torch_measure_, timing, tuple(peers))
            section.extend(others)
            skipped = skipped + notes
        add_ratios(section, reference if framework == "torch" else None)
        rows.extend(section)
    return rows, skipped


def _torch_measurer(spec: tuple, tdtype: Any, device: str, grads: list) -> Callable[..., dict]:
    """``measure(make, extra, timing)``: a fresh copy of the case's module, the fixed gradients, one step."""
    import torch

    tgrads = [{k: torch.tensor(v, dtype=tdtype, device=device) for k, v in g.items()} for g in grads]

    def measure(make: Callable[[Any, list], tuple[Any, list[str]]], extra: dict, timing: dict) -> dict:
        module = case_module(spec, tdtype, device)
        named = list(module.named_parameters())

        def set_grads(i: int) -> None:
            for name, p in named:
                p.grad = tgrads[i % len(tgrads)][name]

        return torch_measure(lambda: make(module, named), set_grads, extra, device, timing)

    return measure


def _jax_layer(contender: Optional[Contender], initial: dict, grads: list, dtype: str, extra: dict, timing: dict) -> dict:
    import jax.numpy as jnp
    import optax

    from .models import nest

    jdtype = getattr(jnp, dtype)
    params = nest({k: jnp.asarray(v, dtype=jdtype) for k, v in initial.items()})
    batches = [nest({k: jnp.asarray(v, dtype=jdtype) for k, v in g.items()}) for g in grads]
    optimizer = optax.adam(1e-3) if contender is None else jax_optimizer(contender)
    return jax_measure(optimizer, params, batches, None, extra, timing)


def _core_layer(contender: Contender, initial: dict, grads: list, dtype: str, extra: dict, framework: str, timing: dict) -> dict:
    import precond_ref

    from .models import nest

    if framework == "numpy":
        xp, sync = np, (lambda: None)
    else:
        import cupy as xp

        sync = xp.cuda.Device().synchronize
    xdtype = getattr(xp, dtype)
    params = nest({k: xp.asarray(v, dtype=xdtype) for k, v in initial.items()})
    batches = [nest({k: xp.asarray(v, dtype=xdtype) for k, v in g.items()}) for g in grads]
    transform = getattr(precond_ref, contender.entry.factory)(**core_kwargs_for(contender.entry, xp, framework))
    if framework == "cupy":  # each pattern's step captured once as a CUDA graph and replayed
        from ..adapters.cupy import captured

        transform = captured(transform)
    return core_measure(transform, params, batches, extra, sync, timing)
