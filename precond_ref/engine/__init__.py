"""The engine: what runs every method's rule.

A method (:mod:`precond_ref.methods`) states its update for one group of leaves; the engine does
everything around it, the same way for every method:

* **trees and layout**: flattens the parameter tree, groups leaves into the blocks a method treats
  as one (:func:`~precond_ref.engine.layout.weight_bias_groups`: a layer's weight with its bias),
  and checks, naming the leaf, that every gradient is an array of one library and real floating
  dtype and fits the state (:mod:`~precond_ref.engine.checks`);
* **the non-finite rule** (specs README §4.6): one test of the whole gradient tree
  (:func:`~precond_ref.engine.skip.gradient_ok`); a skipped step returns zero updates and keeps the
  state, selected element-wise without a host read (:meth:`~precond_ref.engine.context.StepContext.unless_skipped`),
  or ``FloatingPointError`` naming the leaf with ``on_nonfinite="raise"``;
* **the failure counter**: a group whose preconditioner update can fail holds ``failures``, 0-D
  int32: how many of this entry's preconditioner updates were discarded because their result was
  not usable (not finite, or an iterative root that did not converge); the previous
  preconditioner was kept. One name and meaning for every method; a state saved with the
  counter under an earlier name is renamed (:func:`~precond_ref.engine.checks.renamed_failures`);
* **phases**: the host decisions of periodic work (``step=``, ``due=``) or their device form, one
  interval predicate per refresh phase (:class:`~precond_ref.engine.context.StepContext`);
* **stacking and joining**: the leaves of one layout joined end to end for element-wise work
  (:func:`~precond_ref.engine.joined.leafwise`), an element-wise method's small leaves packed into
  one flat leaf for its whole step (:func:`~precond_ref.engine.joined.pack`), equal blocks of all
  leaves stacked into one batched call (:func:`precond_ref.blocking.on_stacks`);
* **dtypes and operands**: updates cast back to the parameters' dtypes, per-step values computed
  once for all groups (:meth:`~precond_ref.engine.context.StepContext.once`), the float32 matmul
  precision of the step, a rule's batch size and state dtype (:mod:`~precond_ref.engine.options`);
* **migration**: a group's state saved under older entry names renamed where it does not fit its
  layout (``legacy_names``), with a hint for a state saved under another layout (``layout_hint``);
* **the state's invariants**: a step never changes an entry's shape or dtype, never aliases two
  entries, never writes a NaN or Inf into the parameters.

:func:`~precond_ref.engine.run.build_transform` assembles these into a
:class:`~precond_ref.transform.Transform`. Each kind of rule has its layout: element-wise rules
(:mod:`~precond_ref.engine.elementwise`), one-sided block-diagonal preconditioners of matrices
(:mod:`~precond_ref.engine.blockdiag`, with :mod:`~precond_ref.engine.matrices` for the matrix
views and stacks and the joined forms of the RMS renormalisations), per-axis runs of blocks (:mod:`~precond_ref.engine.axes`), tiles
of Kronecker factors (:mod:`~precond_ref.engine.tiles`, :mod:`~precond_ref.engine.factors`) and
mini-blocks in parts (:mod:`~precond_ref.engine.parts`).
"""

from .context import StepContext, settle_pieces
from .joined import FLAT_MAX_ELEMENTS, FLAT_MAX_TRACED_ELEMENTS, leafwise, pack
from .layout import weight_bias_groups
from .run import build_transform
from .skip import OVERFLOW_MARGIN, gradient_ok

__all__ = [
    "StepContext", "settle_pieces", "leafwise", "pack", "FLAT_MAX_ELEMENTS", "FLAT_MAX_TRACED_ELEMENTS",
    "weight_bias_groups", "build_transform", "OVERFLOW_MARGIN", "gradient_ok",
]
