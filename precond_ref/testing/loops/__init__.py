"""Loop oracles: plain float64 statements of the nine methods, one block and one step at a time.

What to read first to validate an implementation of one of the methods: each class keeps its state
in plain dicts of float64 NumPy arrays, walks one leaf, one block (tile, chunk) and one step at a
time with explicit loops and a ``np.linalg`` call per block, and states its equations one a line in
the paper's order, citing the paper and the spec. They are written independently of the fast code
and tested equal to it (``tests/testing/test_loop_oracles.py``). Usage::

    oracle = LoopAGD(params, learning_rate=1e-2)
    updates = oracle.step(grads, params)          # the library's updates, params + updates is the step

Where the library's refresh schedule or block layout is intricate, the oracle calls the small
public helper that computes it (:func:`precond_ref.blocking.block_bounds`,
:func:`precond_ref.blocking.stable_hash`) and says so; every number is its own.
"""

from .agd import LoopAGD
from .asgo import LoopASGO, LoopDASGO
from .mbf import LoopMBF
from .sketchy import LoopSAdaGrad, LoopSketchy
from .root_free import LoopIFShampoo, LoopRFAdamW, LoopRFRMSProp

__all__ = ["LoopASGO", "LoopDASGO", "LoopRFRMSProp", "LoopRFAdamW", "LoopAGD", "LoopMBF", "LoopIFShampoo", "LoopSketchy", "LoopSAdaGrad"]
