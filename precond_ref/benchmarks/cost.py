r"""A cost model of one optimizer step: predicted floating-point operations and bytes moved.

Each method has one function here whose docstring states its counts, derived from its code in
:mod:`precond_ref.methods` at the settings ``bench`` runs. A function takes the parameters as
``(name, shape)`` pairs (torch names: ``blocks.0.fc.weight``), the element size in bytes and the
method's keyword arguments (the factory's defaults filled in), and returns a :class:`Cost`: the
work of every kind of step, and its mean over the refresh interval (what a window of ``bench``
steps averages).

Units and conventions (the same for every method):

- **flops** count the dense linear algebra only: a product of an ``m x k`` by a ``k x n`` matrix
  is ``2 m n k``; a stack of ``b`` such products ``2 b m n k``. Decompositions use textbook
  counts (Golub & Van Loan, *Matrix Computations*, 4th ed.): a symmetric eigendecomposition with
  eigenvectors ``EIGH_FLOPS * k^3`` (9, the symmetric QR algorithm; §8.3), a thin SVD of an
  ``m x n`` matrix (``m >= n``) ``6 m n^2 + 20 n^3`` (R-SVD with both factors; §8.6), a Householder
  QR ``2 m n^2 - 2 n^3 / 3`` (§5.2), an inverse through LU ``2 n^3``.
- **bytes** count the element-wise traffic the step cannot avoid: every array the step reads or
  writes once, in the state's element size (a *pass* over an ``n``-element array is ``n`` elements
  read or written), plus one extra read where a reduction (a norm) must finish before the array
  it normalises can be scaled. A fused implementation moves at least this much; the matrix
  products' own operand traffic is left to the matmul rate.
- A part refreshed every ``T`` steps counts ``1/T`` of its work in the mean.

The predicted time of a step at a machine's matmul rate ``R`` (flop/s) and copy rate ``C``
(byte/s) is :func:`predicted_seconds`: ``flops / R + bytes / C``, **the sum**, not the roofline
maximum: a step's matrix products and its element-wise passes are separate kernels run one after
another (no backend here overlaps them), each bound by its own resource, so the time of the whole
is the sum of the parts' bounds. It is a lower bound for that sequence of kernels; ``bench``'s
``efficiency`` column is predicted / measured (1 = at the machine's limit).
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import inspect
import math
from typing import Any, Callable, Optional, Sequence

__all__ = [
    "Cost", "EIGH_FLOPS", "predicted_seconds", "method_cost", "adamw", "agd", "dasgo", "asgo", "sketchy",
    "s_adagrad", "rf_rmsprop", "rf_adamw", "if_shampoo", "mbf", "forward_backward", "COSTS",
]

#: flops of a symmetric ``k x k`` eigendecomposition with eigenvectors, in units of ``k^3``
#: (the symmetric QR algorithm, Golub & Van Loan §8.3; LAPACK's divide and conquer is in the same range).
EIGH_FLOPS = 9.0
#: flops of the inverse of an ``n x n`` matrix by LU, in units of ``n^3``.
INV_FLOPS = 2.0
#: matrix products of one Polar-Express / Newton-Schulz step of an inverse root (coupled iteration).
ROOT_ITERATION_PRODUCTS = 3

Params = Sequence[tuple[str, tuple[int, ...]]]


@dataclasses.dataclass(frozen=True)
class Cost:
    """Work of one step: ``parts`` maps a name to ``(every, flops, bytes)``, the work of that part on
    the steps it runs (every ``every`` steps). ``flops`` / ``bytes``: the mean over the interval."""

    parts: dict

    @property
    def flops(self) -> float:
        return sum(f / every for every, f, _ in self.parts.values())

    @property
    def bytes(self) -> float:
        return sum(b / every for every, _, b in self.parts.values())

    @property
    def period(self) -> int:
        return max([1, *(every for every, _, _ in self.parts.values())])

    @property
    def peak_flops(self) -> float:
        """Flops of a step on which every part runs (the refresh step)."""
        return sum(f for _, f, _ in self.parts.values())

    def as_dict(self) -> dict:
        return {"flops": self.flops, "bytes": self.bytes, "period": self.period, "peak_flops": self.peak_flops,
                "parts": {k: {"every": e, "flops": f, "bytes": b} for k, (e, f, b) in self.parts.items()}}


class _Tally:
    def __init__(self) -> None:
        self.parts: dict[str, tuple[int, float, float]] = {}

    def add(self, name: str, flops: float = 0.0, nbytes: float = 0.0, every: int = 1) -> None:
        e, f, b = self.parts.get(name, (every, 0.0, 0.0))
        if e != every:
            raise ValueError(f"part {name!r} counted with two intervals")
        self.parts[name] = (every, f + flops, b + nbytes)

    def cost(self) -> Cost:
        return Cost(dict(self.parts))


def predicted_seconds(cost_or_flops: Any, nbytes: Optional[float] = None, *, matmul_rate: float, copy_rate: float) -> float:
    """``flops / matmul_rate + bytes / copy_rate`` (module docstring: why the sum)."""
    if isinstance(cost_or_flops, Cost):
        flops, nbytes = cost_or_flops.flops, cost_or_flops.bytes
    else:
        flops = cost_or_flops
    return flops / matmul_rate + (nbytes or 0.0) / copy_rate


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _elementwise(tally: _Tally, params: Params, itemsize: int, passes: int, name: str = "element-wise") -> None:
    tally.add(name, nbytes=passes * itemsize * sum(_numel(s) for _, s in params))


# ---------------------------------------------------------------------------------------------
# Element-wise methods


def adamw(params: Params, itemsize: int = 4, **_: Any) -> Cost:
    """AdamW (the baseline): 7 passes per element (read g; read and write p, m, v); no flops."""
    t = _Tally()
    _elementwise(t, params, itemsize, 7)
    return t.cost()


def agd(params: Params, itemsize: int = 4, **_: Any) -> Cost:
    """AGD: 7 passes (read g; read and write p, m and the diagonal statistic v); no flops."""
    return adamw(params, itemsize)


def rf_rmsprop(params: Params, itemsize: int = 4, momentum: float = 0.0, **_: Any) -> Cost:
    """RF-RMSProp: read g, read/write p and s (5 passes), plus 2 for the momentum buffer when
    ``momentum != 0``; no flops."""
    t = _Tally()
    _elementwise(t, params, itemsize, 5 + (2 if momentum else 0))
    return t.cost()


def rf_adamw(params: Params, itemsize: int = 4, **_: Any) -> Cost:
    """RF-AdamW: 7 passes (read g; read and write p, m, s); no flops."""
    return adamw(params, itemsize)


def dasgo(params: Params, itemsize: int = 4, **_: Any) -> Cost:
    """DASGO: matrices (``ndim >= 2``) 7 passes: read g, read/write p and momentum (5), one read of
    the momentum for the one-sided diagonal statistic (a reduction over the long side) and one
    for the norm of the renormalisation; the ``k``-vector statistic is negligible. Other leaves:
    the fallback AdamW, 7 passes. No flops."""
    return adamw(params, itemsize)


# ---------------------------------------------------------------------------------------------
# Matrix methods


def _matrix_side(side: str, name: str, shape: tuple[int, ...]) -> tuple[int, int, bool]:
    """The matrix view of parameter ``name`` and whether ASGO's ``side`` is its left side, as the
    step takes them (:func:`~precond_ref.engine.blockdiag.matrix_side`)."""
    from ..engine.blockdiag import matrix_side

    return matrix_side(side, tuple(shape), tuple(name.split(".")))


def asgo(
    params: Params, itemsize: int = 4, *, precondition_every: Optional[int] = None, block_size: Optional[int] = None,
    root_method: Optional[str] = None, root_steps: int = 10, device: str = "cpu", side: str = "auto",
    mode: str = "principled", **_: Any,
) -> Cost:
    """ASGO (principled): a matrix leaf ``(m, n)`` is preconditioned on its shorter side ``k``
    (the other is ``n'``), in chunks of ``b = min(k, block_size)`` (``k // b`` full chunks and a
    tail):

    - every step: the statistic ``X X^T`` of each chunk (``2 b^2 n'`` flops) and the direction
      ``Z M`` (``2 b^2 n'``); element-wise 8 passes of ``m n`` (read g; read/write p and momentum;
      the direction written by the product, read for its norm, read to scale) and 5 passes of each
      ``b x b`` statistic (read/write, the new ``X X^T`` read, symmetrised: read and write);
    - every ``precondition_every`` steps: the inverse square root of every chunk, ``eigh``
      (``EIGH_FLOPS b^3``) on CPUs and for float64 (``root_method="auto"``), else
      ``root_steps`` Polar-Express steps of ``ROOT_ITERATION_PRODUCTS`` products (``2 b^3`` each);
      4 passes of ``b x b`` (trace normalisation, the finite check, the rescale).

    Leaves with ``ndim < 2`` go to the fallback AdamW (7 passes). ``root_method=None`` is the
    factory's default: ``"auto"``, or Polar-Express in faithful mode.
    """
    if root_method is None:
        root_method = "polar_express" if mode == "faithful" else "auto"
    if mode != "faithful":  # None: the factory's principled defaults
        from ..methods.asgo import PRINCIPLED_BLOCK_SIZE, PRINCIPLED_PRECONDITION_EVERY

        precondition_every = PRINCIPLED_PRECONDITION_EVERY if precondition_every is None else precondition_every
        block_size = PRINCIPLED_BLOCK_SIZE if block_size is None else block_size
    precondition_every = 1 if precondition_every is None else precondition_every
    t = _Tally()
    eigh = root_method == "eigh" or (root_method == "auto" and (device == "cpu" or itemsize == 8))
    for name, shape in params:
        if len(shape) < 2:
            _elementwise(t, [(name, shape)], itemsize, 7, "fallback AdamW")
            continue
        m, n, left = _matrix_side(side, name, shape)
        k, other = (m, n) if left else (n, m)
        b = k if block_size is None or block_size >= k else block_size
        chunks = [b] * (k // b) + ([k % b] if k % b else [])
        for c in chunks:
            t.add("statistic X X^T", flops=2.0 * c * c * other, nbytes=5.0 * c * c * itemsize)
            t.add("direction Z M", flops=2.0 * c * c * other)
            root = EIGH_FLOPS * c**3 if eigh else root_steps * ROOT_ITERATION_PRODUCTS * 2.0 * c**3
            t.add("root (eigh)" if eigh else "root (iteration)", flops=root, nbytes=4.0 * c * c * itemsize,
                  every=precondition_every)
        t.add("element-wise", nbytes=8.0 * m * n * itemsize)
    return t.cost()


def _thin_svd(rows: int, cols: int) -> float:
    big, small = max(rows, cols), min(rows, cols)
    return 6.0 * big * small**2 + 20.0 * small**3


def _qr(rows: int, cols: int) -> float:
    return max(0.0, 2.0 * rows * cols**2 - 2.0 * cols**3 / 3.0)


def fd_update_flops(d: int, k: int, m: int, decomposition: str) -> float:
    """Flops of one Frequent Directions update (:func:`precond_ref.sketch.fd_update`) of a ``d``-row
    sketch of rank ``k`` with ``m`` new columns, for the path ``decomposition`` resolves to:

    - ``incremental`` (``k + m < d``): four ``d x k x m`` products (projection and residual, twice),
      the QR of the ``d x m`` residual, the SVD of the ``(k+m)`` square core, one ``d x (k+m) x k``
      rotation: ``8 d k m + QR(d, m) + SVD(k+m, k+m) + 2 d (k+m) k``;
    - ``incremental_gram``: the same with the core's Gram (``2 (k+m)^3``) and its eigh in place of
      its SVD; either incremental path falls back to ``svd`` / ``gram`` where ``k + m >= d``;
    - ``gram``: the ``d x d`` statistic ``Z Z^T`` of ``Z = [U sigma, X]`` (``2 d^2 (k+m)``) and its eigh;
    - ``subspace`` (width ``w = k + max(4, k/8)``): ``x`` times a probe (``2 d m (w-k)``), the image
      ``U (U^T S) + X (X^T S)`` (``4 d k w + 4 d m w``), the QR of ``d x w``, the projections
      (``2 d k w + 2 d m w``), the ``w x w`` Gram (``2 w^2 (k+m)``), its eigh and the Ritz vectors
      (``2 d w k``);
    - ``incremental_secular`` (``m = 1``): the incremental path's products with the core's pairs
      from its secular equation, whose one dense product is the ``(k+1)``-square eigenvectors'
      reflection (``2 (k+1)^3``; its bisections are element-wise work);
    - ``svd`` / ``qr_svd``: the thin SVD of the ``d x (k+m)`` factor (``qr_svd``: plus its QR).
    """
    from ..sketch import resolve_decomposition, subspace_width

    path = resolve_decomposition(decomposition, d, k, m)
    if path in ("incremental", "incremental_gram") and k + m >= d:  # the fallbacks of sketch._fd_step
        path = "svd" if path == "incremental" else "gram"
    if path == "incremental_gram":
        core = k + m
        return 8.0 * d * k * m + _qr(d, m) + 2.0 * core**3 + EIGH_FLOPS * core**3 + 2.0 * d * core * k
    if path == "incremental":
        return 8.0 * d * k * m + _qr(d, m) + _thin_svd(k + m, k + m) + 2.0 * d * (k + m) * k
    if path == "incremental_secular":
        return 8.0 * d * k * m + 2.0 * (k + m) ** 3 + 2.0 * d * (k + m) * k
    if path == "gram":
        return 2.0 * d * d * (k + m) + EIGH_FLOPS * d**3
    if path == "subspace":
        w = subspace_width(d, k)
        return (2.0 * d * m * (w - k) + 4.0 * d * k * w + 4.0 * d * m * w + _qr(d, w) + 2.0 * d * k * w
                + 2.0 * d * m * w + 2.0 * w * w * (k + m) + EIGH_FLOPS * w**3 + 2.0 * d * w * k)
    flops = _thin_svd(d, k + m)
    return flops + (_qr(k + m, d) if path == "qr_svd" else 0.0)


def _sketch_axes(shape: tuple[int, ...], rank: int, block_size: Optional[int]) -> list[tuple[int, int, int, int]]:
    """``(count, d, k, m)`` per run of equal blocks of every axis of a merged shape."""
    numel = _numel(shape)
    out = []
    for axis_len in shape:
        from ..blocking import block_bounds

        m = numel // axis_len
        lengths: dict[int, int] = {}
        for start, stop in block_bounds(axis_len, block_size):
            lengths[stop - start] = lengths.get(stop - start, 0) + 1
        out.extend((count, d, min(rank, d), m) for d, count in lengths.items())
    return out


def sketchy(
    params: Params, itemsize: int = 4, *, rank: int = 128, precondition_every: int = 1, block_size: Optional[int] = None,
    merge_dims: int = 1024, max_precondition_dim: int = 4096, precondition_1d: bool = False,
    decomposition: Optional[str] = None, mode: str = "principled", momentum: float = 0.9, graft: str = "rmsprop",
    **_: Any,
) -> Cost:
    """Sketchy (FD-Shampoo): a leaf's shape is merged (``merge_dims``); each axis of length ``D`` is
    split into blocks of ``d = min(D, block_size)`` rows, each with a rank ``k = min(rank, d)``
    sketch of the ``d x m`` unfolding (``m = numel / D``):

    - every ``precondition_every`` steps: one FD update per block (:func:`fd_update_flops`, the
      path ``decomposition="auto"`` picks for ``(d, k, m)``);
    - every step: the sketch applied along every axis, ``U diag(w) U^T x + w_perp (x - U U^T x)``,
      two ``d x k x m`` products per block (``4 k numel`` per axis) and 3 passes per axis (the
      combination read, the complement term read and written); element-wise 11 passes (read g;
      read/write graft moment, momentum and p; the graft direction and the sketched direction
      each read once more for their norms, the scaled direction written once).

    Leaves not preconditioned (1-D without ``precondition_1d``, or an axis over
    ``max_precondition_dim``) take the graft alone: 7 passes.
    """
    from ..blocking import merge_small_dims
    from ..methods.sketchy import PRINCIPLED_BLOCK_SIZE, PRINCIPLED_PRECONDITION_EVERY

    if mode != "faithful":  # None: the principled defaults
        block_size = PRINCIPLED_BLOCK_SIZE if block_size is None else block_size
        precondition_every = PRINCIPLED_PRECONDITION_EVERY if precondition_every is None else precondition_every
    precondition_every = 1 if precondition_every is None else precondition_every
    t = _Tally()
    path = decomposition or ("qr_svd" if mode == "faithful" else "auto")
    for name, shape in params:
        blocked = [d if block_size is None else min(d, block_size) for d in shape]
        if (not precondition_1d and len(shape) <= 1) or any(d > max_precondition_dim for d in blocked):
            _elementwise(t, [(name, shape)], itemsize, 7, "graft only")
            continue
        merged = merge_small_dims(tuple(shape), merge_dims)
        numel = _numel(shape)
        for count, d, k, m in _sketch_axes(merged, rank, block_size):
            t.add("FD update", flops=count * fd_update_flops(d, k, m, path), every=precondition_every)
            t.add("sketch apply", flops=count * 4.0 * d * k * m)
        t.add("element-wise", nbytes=(11 + 3 * len(merged)) * numel * itemsize)
    return t.cost()


def s_adagrad(
    params: Params, itemsize: int = 4, *, rank: int = 128, block_size: Optional[int] = None, mode: str = "principled",
    momentum: float = 0.0, precondition_every: Optional[int] = None, decomposition: Optional[str] = None,
    device: str = "cpu", **_: Any,
) -> Cost:
    """S-AdaGrad: every leaf flattened to ``N`` entries, split into blocks of ``d = min(N,
    block_size)``, each a rank ``k`` sketch updated every ``precondition_every`` steps with one new
    column (``m = 1``, :func:`fd_update_flops`) and applied to it (two ``d x k`` matrix-vector
    products, ``4 d k``); element-wise 5 passes (read g, read/write p, the sketched direction
    written and read), 2 more with momentum.

    With one column every product is a matrix-vector product, bound by reading the ``d x k`` basis,
    not by its flops, so the passes over the basis count as bytes: the apply reads it twice
    (coordinates and combination, every step), and an update on the incremental path (principled,
    ``k + 1 < d``) seven more times: the projection and its re-orthogonalisation (four reads), the
    frame ``[U, q]`` written and read by the rotation, and the new basis written (9 passes on a
    refresh step in all). The faithful SVD path's passes are not counted. ``"auto"`` is the secular
    core for float32 on a torch GPU device (:func:`precond_ref.sketch.secular_by_default`), the
    core's SVD elsewhere."""
    t = _Tally()
    path = "svd" if mode == "faithful" else decomposition or "auto"
    if path == "auto" and device != "cpu" and itemsize == 4:
        path = "incremental_secular"
    every = precondition_every or 1
    for name, shape in params:
        n = max(1, _numel(shape))
        for count, d, k, m in _sketch_axes((n,), rank, block_size):
            incremental = mode != "faithful" and (k + m < d or path == "incremental_secular")
            passes = 7.0 if incremental else 0.0
            t.add("FD update", flops=count * fd_update_flops(d, k, m, path), nbytes=count * passes * d * k * itemsize, every=every)
            t.add("sketch apply", flops=count * 4.0 * d * k, nbytes=count * 2.0 * d * k * itemsize)
        _elementwise(t, [(name, shape)], itemsize, 5 + (2 if momentum else 0))
    return t.cost()


def if_shampoo(
    params: Params, itemsize: int = 4, *, precondition_every: Optional[int] = None, max_dense_dim: Optional[int] = None,
    structures: Any = "dense", mode: str = "principled", momentum: float = 0.9, preconditioner_momentum: float = 0.5,
    grouping: str = "per_parameter", kl_clip: Optional[float] = None, factor_itemsize: Optional[int] = None,
    block_size: Optional[int] = None, **_: Any,
) -> Cost:
    """IF-Shampoo: each leaf (``grouping="per_parameter"``) squeezed to its non-unit axes; an axis
    of length ``d`` has a diagonal factor if ``d > max_dense_dim`` (off by default) or ``structures``
    is diagonal, else dense factors; principled mode cuts every dense axis longer than
    ``block_size`` (default ``root_free._BLOCK_SIZE``) into blocks, each tile of the tensor having
    its own factors. With ``N`` a tile's size and ``d`` its length along the axis:

    - every step: ``G x_n K K^T`` along every dense axis, two mode products (``4 d N`` flops);
      a diagonal axis one pass; element-wise 11 passes (read g; read/write p and momentum; the
      preconditioned tensor written, read for the KL clip with g, read and written scaled,
      read into the momentum);
    - every ``precondition_every`` steps (principled default ``root_free._PRECONDITION_EVERY``;
      staggered tiles spread it, the mean is the same): per dense axis the projection
      ``G x_n K^T`` (``2 d N``), the factor Gram ``K^T K`` (``2 d^3``), the mode Gram of the
      projection (``2 d N``) and the move ``K m`` (``2 d^3``); 8 passes of ``d x d`` in the factor's
      element size (factor and factor momentum read and written, the direction written and read,
      the accept mask's read and write).
    """
    from ..blocking import block_bounds
    from ..methods.root_free import _BLOCK_SIZE, _PRECONDITION_EVERY

    if precondition_every is None:
        precondition_every = 1 if mode == "faithful" else _PRECONDITION_EVERY
    if block_size is None and mode != "faithful":
        block_size = _BLOCK_SIZE
    limit = max_dense_dim
    fsize = factor_itemsize or itemsize
    t = _Tally()
    for name, shape in params:
        dims = tuple(d for d in shape if d != 1) or (1,)
        numel = _numel(dims)
        dense = [structures != "diagonal" and (limit is None or d <= limit) for d in dims]
        for d, is_dense in zip(dims, dense):
            if not is_dense:
                t.add("precondition (diagonal)", nbytes=2.0 * numel * itemsize)
                t.add("factor step", nbytes=(2.0 * numel + 8.0 * d) * itemsize, every=precondition_every)
        bounds = [block_bounds(d, block_size) if is_dense else ((0, d),) for d, is_dense in zip(dims, dense)]
        for tile in itertools.product(*bounds):
            sizes = [stop - start for start, stop in tile]
            tile_numel = _numel(sizes)
            for d, is_dense in zip(sizes, dense):
                if is_dense:
                    t.add("precondition (dense)", flops=4.0 * d * tile_numel)
                    t.add("factor step", flops=4.0 * d * tile_numel + 4.0 * d**3, nbytes=8.0 * d * d * fsize,
                          every=precondition_every)
        _elementwise(t, [(name, shape)], itemsize, 11 if momentum else 9)
    return t.cost()


def mbf(
    params: Params, itemsize: int = 4, *, statistics_every: int = 10, precondition_every: int = 100,
    max_block_dim: Optional[int] = None, kl_clip: Optional[float] = None, mode: str = "principled",
    block_size: Optional[int] = None, **_: Any,
) -> Cost:
    """MBF: a 2-D weight ``(O, I)`` with its sibling bias is one FC block ``(O, I')``, ``I' = I + 1``
    (``I`` without a bias), whose output axis is cut into blocks of at most ``block_size`` rows
    (principled default ``precond_ref.methods.mbf._BLOCK_SIZE``; the counts below are per such
    block, ``O`` its rows); a conv weight ``(O, C, q)`` (``q`` = kernel size) has ``O C`` blocks
    ``q x q``; 1x1 convs and FC layers with ``O > max_block_dim`` are element-wise; other leaves
    (norms, conv biases) take the diagonal rule (7 passes).

    - FC: every step the direction ``F^{-1} M`` (``2 O^2 I'``); every ``statistics_every`` (T1)
      steps the statistic ``H H^T / I'`` (``2 O^2 I'``) and its EMA (3 passes of ``O^2``); every
      ``precondition_every`` (T2) steps the LU inverse of the damped statistic (``INV_FLOPS O^3``)
      and 6 passes of ``O^2`` (the damping, symmetrisation before and after, the finite check);
    - conv: every step ``O C`` matrix-vector products, counted as traffic (the ``q x q`` inverses
      read once: ``O C q^2``); every T1 the outer products' EMA (3 passes of ``O C q^2``); every T2
      ``O C`` inverses (``INV_FLOPS q^3`` each) and 6 passes of ``O C q^2``;
    - element-wise per weight and bias: 7 passes (read g; read/write p and momentum; the
      direction written and read for the KL clip; 5 without the clip, the faithful default).

    The mean counts the steady state (the inverse every T2 steps); the first T2 steps also invert
    on every statistics step (the authors' warm-up).
    """
    clip = kl_clip if kl_clip is not None else (0.0 if mode == "faithful" else 1e-4)
    if block_size is None and mode != "faithful":
        block_size = importlib.import_module("precond_ref.methods.mbf")._BLOCK_SIZE
    passes = 7 if clip else 5
    names = {name: tuple(shape) for name, shape in params}
    paired = set()
    for name, shape in params:
        if _leaf(name) == "weight" and len(shape) == 2:
            bias = name[: -len("weight")] + "bias"
            if bias in names and len(names[bias]) == 1 and names[bias][0] == shape[0]:
                paired.add(bias)
    t = _Tally()
    for name, shape in params:
        if name in paired:
            continue
        if len(shape) == 2:
            o, i = shape[0], shape[1] + (1 if name[: -len("weight")] + "bias" in paired else 0)
            if max_block_dim is not None and o > max_block_dim:
                _elementwise(t, [(name, (o, i))], itemsize, passes + 2, "element-wise blocks")
                continue
            rows = [min(block_size, o - r) for r in range(0, o, block_size)] if block_size else [o]
            for b in rows:
                t.add("direction F^-1 M", flops=2.0 * b * b * i)
                t.add("statistic", flops=2.0 * b * b * i, nbytes=3.0 * b * b * itemsize, every=statistics_every)
                t.add("inverse", flops=INV_FLOPS * b**3, nbytes=6.0 * b * b * itemsize, every=precondition_every)
            t.add("element-wise", nbytes=passes * o * i * itemsize)
        elif len(shape) >= 3 and _numel(shape[2:]) > 1:
            o, c, q = shape[0], shape[1], _numel(shape[2:])
            blocks = o * c
            t.add("direction (conv blocks)", nbytes=blocks * q * q * itemsize)
            t.add("statistic", nbytes=3.0 * blocks * q * q * itemsize, every=statistics_every)
            t.add("inverse", flops=blocks * INV_FLOPS * q**3, nbytes=6.0 * blocks * q * q * itemsize, every=precondition_every)
            t.add("element-wise", nbytes=passes * _numel(shape) * itemsize)
        elif len(shape) >= 3:
            _elementwise(t, [(name, shape)], itemsize, passes + 2, "element-wise blocks")
        else:
            _elementwise(t, [(name, shape)], itemsize, 7, "diagonal rule")
    return t.cost()


COSTS: dict[str, Callable[..., Cost]] = {
    "agd": agd, "asgo": asgo, "dasgo": dasgo, "sketchy": sketchy, "s_adagrad": s_adagrad, "rf_rmsprop": rf_rmsprop,
    "rf_adamw": rf_adamw, "if_shampoo": if_shampoo, "mbf": mbf,
}


def method_cost(entry: Any, params: Params, itemsize: int, device: str = "cpu") -> Optional[Cost]:
    """The cost of a method entry of :mod:`precond_ref.compare.methods` at its bench settings (the
    factory's defaults filled in), or None for a method without a model here."""
    import precond_ref

    function = COSTS.get(entry.name)
    if function is None:
        return None
    factory = getattr(precond_ref, entry.factory)
    defaults = {
        name: p.default for name, p in inspect.signature(factory).parameters.items() if p.default is not inspect.Parameter.empty
    }
    settings = {**defaults, **entry.bench_kwargs()}
    if isinstance(settings.get("factor_dtype"), str):
        settings["factor_itemsize"] = 2 if settings["factor_dtype"] in ("bfloat16", "float16") else None
    if not all(settings.get(k) is None or isinstance(settings.get(k), int) for k in ("precondition_every", "statistics_every")):
        return None  # a callable schedule: no fixed interval to average over
    return function(params, itemsize, device="cpu" if not device.startswith("cuda") else "cuda",
                    **{k: v for k, v in settings.items() if k != "device"})


# ---------------------------------------------------------------------------------------------
# The models' forward and backward


def forward_backward(model: str, size: dict, itemsize: int = 4) -> Cost:
    """Flops and activation traffic of one forward and backward pass of a ``bench`` model.

    Forward: ``2 x`` multiply-adds of every linear layer and convolution (GPT: ``2 P_lin`` per
    token for the linear weights incl. the head, attention ``4 T C`` per token per layer for
    ``Q K^T`` and ``A V`` over the full ``T x T`` (causal masking is not assumed to save work);
    ResNet: ``2 C_out C_in k_h k_w H_out W_out`` per image per convolution). Backward: twice the
    forward (gradients of the inputs and of the weights). Bytes: every layer's output activation
    written and read once forward and twice backward (6 passes), plus the parameters read and the
    gradients written; element-wise layers (norms, GELU, softmax) are not counted separately.
    """
    t = _Tally()
    if model == "gpt":
        layers, c, v, b, s = size["layers"], size["width"], size["vocab"], size["batch"], size["seq"]
        tokens = b * s
        linear = layers * (3 * c * c + c * c + 4 * c * c + 4 * c * c) + c * v
        fwd = 2.0 * linear * tokens + layers * 4.0 * s * c * tokens
        acts = tokens * (layers * (3 * c + c + 4 * c + c + 2 * c) + v)
        params = linear + v * c + s * c
    else:
        widths, blocks, classes, batch, image = size["widths"], size["blocks"], size["classes"], size["batch"], size["image"]
        fwd, acts, params = 0.0, 0, 0
        hw = image * image
        fwd += 2.0 * widths[0] * 3 * 9 * hw
        acts += widths[0] * hw
        params += widths[0] * 27
        cin = widths[0]
        for i, width in enumerate(widths):
            for j in range(blocks):
                if i > 0 and j == 0:
                    hw //= 4
                for conv_in in (cin if j == 0 else width, width):
                    fwd += 2.0 * width * conv_in * 9 * hw
                    acts += width * hw
                    params += width * conv_in * 9
                if j == 0 and (i > 0 or cin != width):
                    fwd += 2.0 * width * cin * hw
                    acts += width * hw
                    params += width * cin
            cin = width
        fwd += 2.0 * widths[-1] * classes
        params += widths[-1] * classes
        fwd, acts = fwd * batch, acts * batch
    t.add("forward", flops=fwd, nbytes=3.0 * acts * itemsize + params * itemsize)
    t.add("backward", flops=2.0 * fwd, nbytes=3.0 * acts * itemsize + params * itemsize)
    return t.cost()


# ---------------------------------------------------------------------------------------------
# The machine's rates, and the cost columns of bench's rows

#: the yardsticks' sizes: a float32 n x n matmul (2 n^3 flops) and a copy of this many bytes
MATMUL_N = 2048
COPY_BYTES = 256 * 2**20


def machine_rates(device: str = "cpu", dtype: str = "float32", *, quick: bool = False, repeats: int = 5) -> dict:
    """This machine's matmul rate (flop/s of a timed ``n x n`` torch matmul in ``dtype``) and copy
    rate (bytes read plus written per second by a timed ``Tensor.copy_`` of a large array), each
    the best of ``repeats`` timings after one untimed run: the rate the hardware allows, which a
    burst of load elsewhere can only lower."""
    import time

    import torch

    tdtype = getattr(torch, dtype)
    n = 256 if quick else MATMUL_N
    nbytes = 4 * 2**20 if quick else COPY_BYTES
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen, dtype=tdtype).to(device)
    b = torch.randn(n, n, generator=gen, dtype=tdtype).to(device)
    out = torch.empty(n, n, dtype=tdtype, device=device)
    src = torch.ones(nbytes // torch.tensor([], dtype=tdtype).element_size(), dtype=tdtype, device=device)
    dst = torch.empty_like(src)

    def best(fn: Callable[[], Any]) -> float:
        fn()
        sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return min(times)

    matmul_s = best(lambda: torch.matmul(a, b, out=out))
    copy_s = best(lambda: dst.copy_(src))
    return {
        "matmul_flops_per_s": 2.0 * n**3 / matmul_s, "copy_bytes_per_s": 2.0 * src.numel() * src.element_size() / copy_s,
        "matmul": f"{dtype} {n}x{n} matmul", "copy": f"{dtype} copy of {src.numel() * src.element_size() / 2**20:.0f} MiB",
        "device": device,
    }


def faster_rates(first: dict, second: dict) -> dict:
    """Of two :func:`machine_rates` measurements (bench's: at the start and at the end of a run),
    each rate's higher: load from elsewhere on the machine can only lower a rate, so the higher is
    nearer what the hardware allows. ``measured`` says how many measurements each rate is the best of."""
    out = dict(first)
    for key in ("matmul_flops_per_s", "copy_bytes_per_s"):
        out[key] = max(first[key], second[key])
    out["measured"] = first.get("measured", 1) + second.get("measured", 1)
    return out


def _baseline_cost(label: str, params: Params, itemsize: int) -> Optional[Cost]:
    return adamw(params, itemsize) if "adam" in label.lower() else None


def add_costs(rows: list[dict], params: Params, itemsize: int, rates: Optional[dict], device: str,
              model_cost: Optional[Cost] = None) -> None:
    """Every row's ``cost``: the optimizer step's predicted flops and bytes (mean over its interval),
    the forward and backward's (models), and with ``rates`` the predicted time of the timed step
    (``limit_ms``) and ``efficiency`` = limit / measured mean. Rows of other code (the authors',
    the peers') have no cost."""
    from ..compare.methods import entry_by_name

    for row in rows:
        if row["method"] == "baseline":
            c = _baseline_cost(row["label"], params, itemsize)
        elif row["method"] in COSTS and row.get("variant") is None:
            c = method_cost(entry_by_name(row["method"]), params, itemsize, device)
        else:
            c = None  # variants change settings the row does not carry; authors' and peers' code is not ours
        if c is None:
            continue
        entry: dict[str, Any] = {"flops": c.flops, "bytes": c.bytes, "period": c.period, "peak_flops": c.peak_flops}
        total_flops, total_bytes = c.flops, c.bytes
        if model_cost is not None:
            entry.update(fwd_bwd_flops=model_cost.flops, fwd_bwd_bytes=model_cost.bytes)
            total_flops, total_bytes = total_flops + model_cost.flops, total_bytes + model_cost.bytes
        if rates is not None:
            limit = predicted_seconds(total_flops, total_bytes, matmul_rate=rates["matmul_flops_per_s"],
                                      copy_rate=rates["copy_bytes_per_s"])
            entry["limit_ms"] = 1e3 * limit
            if row.get("mean_ms"):
                entry["efficiency"] = entry["limit_ms"] / row["mean_ms"]
        row["cost"] = entry
