"""Loop oracles: plain float64 statements of the nine methods, one block and one step at a time.

What to read first to validate an implementation of one of the methods. Each class keeps its state
in plain dicts of float64 NumPy arrays, walks one leaf, one block (tile, chunk) and one step at a
time with explicit loops and a ``np.linalg`` call per block, and states its equations one a line in
the paper's order, citing the paper and the spec. They are written independently of the fast code
and tested equal to it, in both modes where the library's numbers allow
(``tests/testing/test_loop_oracles.py``):

========================  =========================  ==============================================
oracle                    library                    module (paper)
========================  =========================  ==============================================
:class:`LoopASGO`         ``asgo(root_method="eigh")``  :mod:`.asgo` (ASGO, principled)
:class:`LoopDASGO`        ``dasgo``                  :mod:`.asgo`
:class:`LoopSketchy`      ``sketchy(decomposition="svd")``  :mod:`.sketchy` (FD-Shampoo)
:class:`LoopSAdaGrad`     ``s_adagrad``              :mod:`.sketchy`
:class:`LoopRFRMSProp`    ``rf_rmsprop``             :mod:`.root_free`
:class:`LoopRFAdamW`      ``rf_adamw``               :mod:`.root_free`
:class:`LoopIFShampoo`    ``if_shampoo``             :mod:`.root_free`
:class:`LoopMBF`          ``mbf``                    :mod:`.mbf`
:class:`LoopAGD`          ``agd``                    :mod:`.agd`
========================  =========================  ==============================================

Usage, with the library's hyperparameter names and defaults (a default that depends on ``mode``
resolved as the factory resolves it)::

    oracle = LoopAGD(params, learning_rate=1e-2)
    updates = oracle.step(grads, params)          # as the library's update: params + updates

(the root-free oracles take ``batch_size=`` in ``step`` too). Where the library's refresh schedule
or block layout is intricate, an oracle calls the small public helper that computes it
(:func:`precond_ref.blocking.block_bounds`, :func:`~precond_ref.blocking.merge_small_dims`,
:func:`~precond_ref.blocking.stable_hash`) and says so; every number is its own.
"""

from .agd import LoopAGD
from .asgo import LoopASGO, LoopDASGO
from .mbf import LoopMBF
from .root_free import LoopIFShampoo, LoopRFAdamW, LoopRFRMSProp
from .sketchy import LoopSAdaGrad, LoopSketchy

__all__ = [
    "LoopASGO", "LoopDASGO", "LoopSketchy", "LoopSAdaGrad", "LoopRFRMSProp", "LoopRFAdamW", "LoopIFShampoo",
    "LoopMBF", "LoopAGD",
]
