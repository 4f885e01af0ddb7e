"""Nothing outlives an optimizer: the arrays a method keeps between steps (its constants, index
arrays, layouts) belong to the transform or torch optimizer that made them and go with it.

A user sweeping model widths in one process makes, steps and drops an optimizer per width. The
invariant (DESIGN.md, "No process-wide mutable state in the core"): once such an optimizer and its
model are dropped and the garbage collected, the live arrays' bytes are what they were before it
was made, for every method, in torch (the ``torch.optim`` classes) and in NumPy (the core
factories). No tolerance: a kept array of any size is a leak, and a cache keyed by shapes would
grow with every width.

The sweeps run in one interpreter of their own (``python tests/test_no_leaks.py``, once per test
session), every method's after the ones before it, as a user's sweeps follow each other; each test
judges its method's line. Finding every live array walks every object the garbage collector tracks:
in a fresh interpreter that is the libraries' own objects, where in a suite worker it is also every
object the tests before it left (compiled graphs, traces), which made the walk the test's cost.
"""

from __future__ import annotations

import gc
import itertools
import json
import warnings

import numpy as np
import pytest
import torch
from session_jobs import json_lines_of

import precond_ref as pr
from precond_ref.adapters import torch as pt

METHODS = ("agd", "asgo", "dasgo", "sketchy", "s_adagrad", "rf_rmsprop", "rf_adamw", "if_shampoo", "mbf")
WIDTHS = range(2, 12)  # 10 models of growing width, as a user sweeping widths in one process makes them
STEPS = 3
BATCH = 8

#: Options that make three steps reach each method's periodic work (a refresh of its statistics
#: and preconditioner, a sketch smaller than a layer).
_CORE = {
    "agd": {},
    "asgo": {},
    "dasgo": {},
    "sketchy": {"rank": 4},
    "s_adagrad": {"rank": 4},
    "rf_rmsprop": {"batch_size": BATCH},
    "rf_adamw": {"batch_size": BATCH},
    "if_shampoo": {"batch_size": BATCH, "precondition_every": 1},
    "mbf": {"statistics_every": 1, "precondition_every": 2},
}
_TORCH = {
    "agd": ("AGD", {}),
    "asgo": ("ASGO", {}),
    "dasgo": ("DASGO", {}),
    "sketchy": ("Sketchy", {"rank": 4}),
    "s_adagrad": ("SAdaGrad", {"rank": 4}),
    "rf_rmsprop": ("RFRMSProp", {"batch_size": BATCH}),
    "rf_adamw": ("RFAdamW", {"batch_size": BATCH}),
    "if_shampoo": ("IFShampoo", {"batch_size": BATCH, "precondition_every": 1}),
    "mbf": ("MBF", {"statistics_every": 1, "precondition_every": 2}),
}


def _shapes(width: int) -> dict:
    """A layer's parameters, 3 inputs to ``width`` outputs: its weight (out, in) and its bias."""
    return {"w": (width, 3), "b": (width,)}


def _live_bytes() -> dict:
    """The bytes of the live torch tensors and NumPy arrays after a collection: every such array
    the garbage collector tracks or finds referred to by an object it tracks (a NumPy array is not
    tracked itself), each counted once by the memory it owns (a tensor by its storage, a NumPy view
    by its base's). The objects are gathered and sorted by type in bulk (C loops): one Python-level
    call per object made this scan the test's cost in a process holding other tests' objects."""
    gc.collect()
    tracked = gc.get_objects()
    found = tracked + gc.get_referents(*tracked)
    # type(), not isinstance: some objects warn when asked for __class__
    types = list(map(type, found))
    kinds = {kind for kind in set(types) if issubclass(kind, (torch.Tensor, np.ndarray))}
    owners: dict = {"torch": {}, "numpy": {}}
    for x in itertools.compress(found, map(kinds.__contains__, types)):
        if issubclass(type(x), torch.Tensor):
            try:
                storage = x.untyped_storage()
                owners["torch"][storage.device, storage.data_ptr()] = storage.nbytes()
            except RuntimeError:  # a compiler's fake tensor (another test's trace): no memory of its own
                continue
        else:
            while isinstance(x.base, np.ndarray):
                x = x.base
            owners["numpy"][id(x)] = x.nbytes
    return {backend: sum(sizes.values()) for backend, sizes in owners.items()}


def _torch_sweep(method: str, widths) -> None:
    name, options = _TORCH[method]
    generator = torch.Generator().manual_seed(0)
    for width in widths:
        params = [torch.nn.Parameter(torch.randn(shape, generator=generator, dtype=torch.float64))
                  for shape in _shapes(width).values()]
        opt = getattr(pt, name)(list(zip(_shapes(width), params)), compile=False, **options)
        for _ in range(STEPS):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)
            opt.step()
        del opt, params, p


def _numpy_sweep(method: str, widths) -> None:
    rng = np.random.default_rng(0)
    for width in widths:
        params = {k: rng.standard_normal(shape) for k, shape in _shapes(width).items()}
        transform = getattr(pr, method)(**_CORE[method])
        state = transform.init(params)
        for _ in range(STEPS):
            grads = {k: rng.standard_normal(v.shape) for k, v in params.items()}
            updates, state = transform.update(grads, state, params)
            params = pr.apply_updates(params, updates)
        del transform, state, params, grads, updates


def _measure():
    """For each method in turn: the live bytes before and after its sweeps, and the message of
    every warning it raised; one line per method. The baseline is taken after one model of width 1
    of every method (outside the sweeps), which imports what the libraries import lazily (modules
    whose constants are arrays: NumPy's polynomial classes); a method's sweeps start where the
    previous one's ended, so what was measured after it is the next one's before."""
    with warnings.catch_warnings(record=True) as raised:
        warnings.simplefilter("always")
        first = {}
        for method in METHODS:
            for sweep in (_torch_sweep, _numpy_sweep):
                sweep(method, [1])
            first[method] = [f"{w.category.__name__}: {w.message}" for w in raised]
            raised.clear()
        before = _live_bytes()
        for method in METHODS:
            for sweep in (_torch_sweep, _numpy_sweep):
                sweep(method, WIDTHS)
            after = _live_bytes()
            said = first[method] + [f"{w.category.__name__}: {w.message}" for w in raised]
            raised.clear()
            yield {"method": method, "before": before, "after": after, "warnings": said}
            before = after


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every method's line of this file run as a script, once per session."""
    return json_lines_of(tmp_path_factory, "no_leaks", __file__, "the no-leaks sweeps", timeout=600)


@pytest.mark.parametrize("method", METHODS)
def test_dropped_optimizers_leave_no_arrays(results, method):
    """After the 10 widths' optimizers and models are dropped, the live arrays' bytes are not more
    than before the sweep, in torch and in NumPy; the sweeps raise no warning."""
    line = results[method]
    before, after = line["before"], line["after"]
    assert not line["warnings"], line["warnings"]
    # Not more bytes: a kept array of any size is a leak. (Fewer is the earlier sweeps' garbage
    # freed meanwhile.)
    assert all(after[backend] <= before[backend] for backend in before), (before, after)


if __name__ == "__main__":
    for line in _measure():
        print(json.dumps(line), flush=True)
