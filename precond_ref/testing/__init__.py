"""Validate an optimizer implementation against ``precond_ref``.

* standard small problems with their loss and gradient, on every array backend
  (:func:`get_problem`: ``quadratic``, ``least_squares``, ``logistic``, ``online``, ``mlp``,
  ``cnn``);
* reference trajectories of any method and configuration (:func:`reference_trajectory`), and
  trajectories of your own optimizer (:func:`torch_trajectory`, :func:`transform_trajectory` for
  optax, or a plain list of parameter trees);
* comparison helpers that report the first step and parameter where two trajectories diverge
  (:func:`compare_trajectories`, :func:`assert_trajectories_close`);
* trace files for implementations in other languages (:func:`save_trajectory`,
  :func:`load_trajectory`, and the ``python -m precond_ref trace`` command);
* the loop oracles (:mod:`precond_ref.testing.loops`), what to read first: each of the nine methods
  stated in plain float64 NumPy, one block and one step at a time, each tested equal to the
  library: :class:`LoopASGO` (principled, ``eigh`` root), :class:`LoopDASGO`, :class:`LoopSketchy`,
  :class:`LoopSAdaGrad`, :class:`LoopRFRMSProp`, :class:`LoopRFAdamW`, :class:`LoopIFShampoo`,
  :class:`LoopMBF`, :class:`LoopAGD`. ``oracle = LoopAGD(params, learning_rate=1e-2)``, then
  ``updates = oracle.step(grads, params)`` per step, as the library's ``update``.
"""

from typing import Any

from . import compare, problems, trajectory
from .compare import Comparison, Divergence, assert_trajectories_close, compare_trajectories, default_tolerances
from .problems import (
    CNN,
    MLP,
    PROBLEMS,
    LeastSquares,
    Logistic,
    OnlineLogistic,
    Problem,
    Quadratic,
    available_problems,
    get_problem,
)
from .trace import add_arguments, run
from .trajectory import (
    TRACE_FORMAT,
    TRACE_FORMAT_VERSION,
    Trajectory,
    available_methods,
    load_trajectory,
    make_method,
    reference_trajectory,
    resolve_dtype,
    resolve_namespace,
    save_trajectory,
    to_numpy,
    torch_trajectory,
    transform_trajectory,
)

# The public names are those of the submodules, listed once there.
# The loop oracles are NumPy statements: imported on first use (``import precond_ref.testing`` needs
# no NumPy), as ``precond_ref.testing.LoopAGD`` or from ``precond_ref.testing.loops``.
_LOOPS = (
    "LoopASGO", "LoopDASGO", "LoopSketchy", "LoopSAdaGrad", "LoopRFRMSProp", "LoopRFAdamW", "LoopIFShampoo",
    "LoopMBF", "LoopAGD",
)


def __getattr__(name: str) -> Any:
    if name in _LOOPS:
        from . import loops

        return getattr(loops, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [*problems.__all__, *trajectory.__all__, *compare.__all__, *_LOOPS]
