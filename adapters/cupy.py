"""The captured step on CuPy: each refresh pattern's update as a CUDA graph (CuPy's stream capture).

The core runs on CuPy arrays as it is, but an eager step is host work: a matrix method launches
hundreds to thousands of small kernels a step, each costing the host more than the GPU.
:func:`captured` wraps a transform so that each pattern of its interval decisions
(:meth:`~precond_ref.transform.Transform.due`: a method with one interval has two patterns, refresh
and reuse; a refresh spread over ``T`` phases ``T``) is captured once as a CUDA graph and replayed
whenever the pattern recurs::

    import precond_ref
    from precond_ref.adapters.cupy import captured

    opt = captured(precond_ref.asgo(learning_rate=1e-3))
    state = opt.init(params)                       # CuPy arrays
    for batch in batches:
        grads = grad_fn(params, batch)
        updates, state = opt.update(grads, state, params)
        params = precond_ref.apply_updates(params, updates)

A step then costs the host one copy per gradient leaf (and per parameter leaf, for methods that
read the parameters) into the wrapper's buffers and one graph launch; the numbers are those of
``transform.update`` (the same kernels, replayed).

How it works, and what it asks of the caller:

* **Buffers.** The wrapper keeps one set of buffers per tree structure of the gradients: the
  gradients, the parameters, the state and the updates. The graph reads the first three and writes
  the state and the updates in place. ``update`` returns these buffers: the returned ``updates``
  and ``state`` are overwritten by the next call. Pass the returned state back as it is (no copy is
  made); to keep a state (a checkpoint, a comparison), copy it. A state the wrapper did not return
  (a fresh ``init``, a restored checkpoint, an older state) is copied into its buffers first, and
  its call count is read on the host once (``count + nonfinite_count``; pass ``step=`` to avoid that
  read).
* **Patterns.** The host counts the calls and passes ``due=transform.due(calls)`` to the update,
  so the periodic work is decided on the host and the graph of a pattern holds no branch. A
  pattern's first step runs eagerly on the wrapper's stream (it is that step: lazy kernel
  compilation, cuBLAS and cuSOLVER workspaces happen there); it is then captured (recorded, not
  run) and replayed from its next occurrence.
* **Hyperparameters** are the transform's: a schedule is evaluated from the state's counter on the
  device (inside the graph); a learning rate to change by hand is a 0-D CuPy array given to the
  factory and written with ``fill`` (the graph reads its address). Keyword arguments of ``update``
  (``batch_size=``) are part of the pattern: a new value captures again.
* **Streams and memory.** Warm-up, capture and replays run on one side stream per device, ordered
  after the work already queued on the current stream and before the work queued after the call
  (events, no host wait). Their temporaries live in a private memory pool that nothing else uses,
  so a replay never writes into memory the caller holds.

**Which methods capture.** CuPy's stream capture refuses every cuBLAS call (``NotImplementedError:
calling cuBLAS API during stream capture is currently unsupported``, CuPy 14.2), and CuPy runs every
matrix product through cuBLAS (``matmul``, ``einsum``; ``eigh`` calls it too). The methods whose
step multiplies matrices (ASGO, Sketchy, S-AdaGrad, IF-Shampoo, MBF: :data:`MATRIX_PRODUCTS`)
therefore step eagerly through ``transform.update`` from the first call, with no capture tried and
no warning; the wrapper says why in :attr:`CapturedTransform.refusal`, ``None`` for AGD, DASGO,
RF-RMSProp and RF-AdamW (element-wise lines and reductions), which capture. Setting
``refusal = None`` makes a wrapper try.

A pattern whose capture fails unexpectedly (a transform not in the table that calls a routine CuPy
refuses, or one that reads the device on the host, e.g. a linear algebra call under
``cupyx.errstate(linalg='raise')``) runs eagerly on the buffers from then on,
with one :class:`CaptureWarning`; after :data:`MAX_FAILED_CAPTURES` failures the wrapper stops
capturing. Arrays that are not CuPy arrays, or a call inside a capture the caller makes, run eagerly
through ``transform.update``. ``PRECOND_REF_CAPTURE=0`` turns capturing off (``enabled=`` wins).

The CUDA specifics are one object (:class:`CupyGraphs`), which tests replace by a double that
re-runs the recorded callable on replay and refuses host reads and, when asked, matrix products
(``tests/adapters/fake_cupy_graphs.py``).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Optional

from .._backend import owned_state
from ..transform import PrecondState, Transform
from ..tree import tree_flatten, tree_unflatten

__all__ = [
    "captured", "CapturedTransform", "CupyGraphs", "CaptureWarning", "MAX_GRAPHS", "MAX_FAILED_CAPTURES", "MATRIX_PRODUCTS",
    "refusal_of",
]

#: The most graphs a wrapper keeps (over all its buffer sets); a further pattern runs eagerly.
MAX_GRAPHS = 32

#: Failed captures (each refuses its own pattern) after which the wrapper stops capturing.
MAX_FAILED_CAPTURES = 8

#: ``PRECOND_REF_CAPTURE=0`` turns capturing off (shared with the torch optimizers' captured step).
ENVIRONMENT_VARIABLE = "PRECOND_REF_CAPTURE"
_OFF = ("0", "false", "no", "off")

#: The methods whose step multiplies matrices, by the name their factory gives the transform
#: (``transform.update.method``), and what multiplies them. CuPy's stream capture refuses the
#: cuBLAS calls these products make, so these methods step eagerly (:func:`refusal_of`); a method
#: missing here whose capture fails warns (:class:`CaptureWarning`). Two configurations of them
#: multiply no matrices and would capture, yet are listed with their method: ASGO on a tree
#: without matrix leaves (every leaf stepped by the fallback Adam) and IF-Shampoo whose factors are
#: all diagonal (``structures="diagonal"``, or every axis longer than ``max_dense_dim``).
MATRIX_PRODUCTS = {
    "asgo": "ASGO's statistics X Xᵀ and roots",
    "sketchy": "Sketchy's Frequent Directions sketches",
    "scale_by_sketchy": "Sketchy's Frequent Directions sketches",
    "s_adagrad": "S-AdaGrad's Frequent Directions sketches",
    "if_shampoo": "IF-Shampoo's dense Kronecker factors",
    "mbf": "MBF's mini-block statistics and inverses",
}


def refusal_of(transform: Transform) -> Optional[str]:
    """Why CuPy's stream capture cannot capture ``transform``'s step (a sentence), or ``None``
    where it can be tried: the methods of :data:`MATRIX_PRODUCTS`."""
    what = MATRIX_PRODUCTS.get(getattr(transform.update, "method", None))
    if what is None:
        return None
    return f"the step multiplies matrices ({what}) through cuBLAS, which CuPy's stream capture refuses"


class CaptureWarning(UserWarning):
    """A pattern could not be captured and runs eagerly (the numbers are the same)."""


class CupyGraphs:
    """CuPy's stream capture, the one place this module calls CUDA through CuPy."""

    def __init__(self) -> None:
        import cupy

        self.cupy = cupy
        self.streams: dict[int, Any] = {}
        self.pools: dict[int, Any] = {}

    def accepts(self, leaves: list) -> bool:
        """Whether the arrays are CuPy arrays of one device (and capturing is possible there)."""
        cupy = self.cupy
        if not leaves or not all(isinstance(x, cupy.ndarray) for x in leaves):
            return False
        return len({x.device.id for x in leaves}) == 1

    def capturing(self) -> bool:
        """Whether the current stream is capturing (a capture the caller makes)."""
        stream = self.cupy.cuda.get_current_stream()
        return stream.ptr not in (0, 1) and bool(stream.is_capturing())

    def _side(self, device: int) -> tuple[Any, Any]:
        cupy = self.cupy
        if device not in self.streams:
            with cupy.cuda.Device(device):
                self.streams[device] = cupy.cuda.Stream(non_blocking=True)
                self.pools[device] = cupy.cuda.MemoryPool()
        return self.streams[device], self.pools[device]

    def empty_like(self, x: Any) -> Any:
        return self.cupy.empty_like(x)

    def copy(self, dst: Any, src: Any) -> None:
        """``dst[...] = src`` on the current stream."""
        self.cupy.copyto(dst, src)

    def _ordered(self, device: int, work: Callable[[Any], Any]) -> Any:
        """``work(side_stream)`` after the current stream's queued work, before its later work."""
        cupy = self.cupy
        side, pool = self._side(device)
        current = cupy.cuda.get_current_stream()
        side.wait_event(current.record())
        with cupy.cuda.using_allocator(pool.malloc), side:
            result = work(side)
        current.wait_event(side.record())
        return result

    def run(self, device: int, fn: Callable[[], None]) -> None:
        """``fn()`` eagerly on the side stream, temporaries in the private pool."""
        self._ordered(device, lambda side: fn())

    def capture(self, device: int, fn: Callable[[], None]) -> Any:
        """``fn`` recorded (not run) as a graph on the side stream; raises if the capture fails."""

        def record(side: Any) -> Any:
            side.begin_capture()
            try:
                fn()
            except BaseException:
                try:
                    side.end_capture()
                except Exception:  # an invalidated capture also fails to end; the first error tells why
                    pass
                raise
            graph = side.end_capture()
            if hasattr(graph, "upload"):  # instantiate on the device now, not at the first replay
                graph.upload(side)
            return graph

        return self._ordered(device, record)

    def launch(self, device: int, graph: Any) -> None:
        """Replay ``graph`` on the side stream, ordered as :meth:`run`."""
        self._ordered(device, lambda side: graph.launch(side))

    def release(self, device: int) -> None:
        """Wait for the side stream before buffers it uses are dropped."""
        if device in self.streams:
            self.streams[device].synchronize()


def _device_of(x: Any) -> int:
    return getattr(getattr(x, "device", None), "id", 0)


class _Buffers:
    """The arrays one tree structure of gradients is stepped through, and its graphs."""

    def __init__(self, graphs: Any, device: int, grads: list, params: Optional[list], state: PrecondState) -> None:
        self.device = device
        self.grads = [graphs.empty_like(g) for g in grads]
        self.params = None if params is None else [graphs.empty_like(p) for p in params]
        leaves, self.state_def = tree_flatten(state)
        self.state_leaves = [graphs.empty_like(x) for x in leaves]
        self.state = tree_unflatten(self.state_def, self.state_leaves)
        self.updates: Optional[list] = None
        self.graphs: dict[tuple, Any] = {}
        self.refused: set[tuple] = set()
        self.calls = 0


class CapturedTransform:
    """``init`` and ``update`` of a transform, the update captured per pattern (module docstring)."""

    def __init__(self, transform: Transform, *, enabled: Optional[bool] = None, graphs: Any = None) -> None:
        if not isinstance(transform, Transform):
            raise TypeError(f"captured() takes a precond_ref Transform, got {type(transform).__name__}")
        if enabled is not None and not isinstance(enabled, bool):
            raise TypeError(f"captured(): enabled must be None, True or False, got {enabled!r}")
        if enabled is None:
            enabled = os.environ.get(ENVIRONMENT_VARIABLE, "").strip().lower() not in _OFF
        self.transform = transform
        self.enabled = bool(enabled)
        #: Why this transform's step is not captured (:func:`refusal_of`; every call is then
        #: ``transform.update``), or ``None`` where it is. Set to ``None`` to make the wrapper try.
        self.refusal = refusal_of(transform)
        self.capturing = self.enabled  # off after MAX_FAILED_CAPTURES failures (the buffers stay)
        self._graphs = graphs
        self._sets: dict[tuple, _Buffers] = {}
        self.failed_captures = 0
        self._warned: set[str] = set()

    # ----------------------------------------------------------------------------------------
    def init(self, params: Any) -> PrecondState:
        return self.transform.init(params)

    @property
    def graph_count(self) -> int:
        """The graphs captured so far (over all buffer sets)."""
        return sum(len(s.graphs) for s in self._sets.values())

    def _cuda(self) -> Any:
        if self._graphs is None:
            try:
                self._graphs = CupyGraphs()
            except ImportError:  # no CuPy: nothing to capture, every call is transform.update
                self.enabled = self.capturing = False
                return None
        return self._graphs

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, CaptureWarning, stacklevel=3)

    def update(self, grads: Any, state: Any, params: Any = None, **extra: Any) -> tuple[Any, Any]:
        """``transform.update(grads, state, params, **extra)``, replayed from a graph (module docstring)."""
        if "due" in extra:
            raise TypeError("captured(...).update decides due= itself; pass step= (the call's index) if anything")
        step = extra.pop("step", None)
        g_leaves, g_def = tree_flatten(grads)
        graphs = self._cuda() if self.enabled and self.refusal is None else None
        if graphs is None or not graphs.accepts(g_leaves) or graphs.capturing() or not _hashable(extra):
            if graphs is not None and g_leaves and not _hashable(extra):
                self._warn("extra", "captured step: array keyword arguments of update are not captured; stepping eagerly")
            return self.transform.update(grads, state, params, step=step, **extra)
        p_leaves = None if params is None else tree_flatten(params)[0]
        key = (g_def.paths, tuple((tuple(g.shape), str(g.dtype)) for g in g_leaves), params is None, tuple(sorted(extra.items())))
        s = self._sets.get(key)
        if s is None or state is not s.state:
            if s is not None and tree_flatten(state)[1].paths != s.state_def.paths:
                s = None
            if s is None:
                s = self._sets[key] = _Buffers(graphs, _device_of(g_leaves[0]), g_leaves, p_leaves, state)
            for dst, src in zip(s.state_leaves, tree_flatten(state)[0]):
                graphs.copy(dst, src)
            s.calls = step if step is not None else int(state.count) + int(state.nonfinite_count)
        elif step is not None:
            s.calls = step
        for dst, src in zip(s.grads, g_leaves):
            if dst is not src:
                graphs.copy(dst, src)
        if s.params is not None:
            for dst, src in zip(s.params, p_leaves):
                if dst is not src:
                    graphs.copy(dst, src)
        self._step(graphs, s, g_def, params, extra)
        s.calls += 1
        return tree_unflatten(g_def, s.updates), s.state

    def _step(self, graphs: Any, s: _Buffers, g_def: Any, params: Any, extra: dict) -> None:
        pattern = tuple(self.transform.due(s.calls))
        params_tree = None if params is None else tree_unflatten(tree_flatten(params)[1], s.params)

        def body() -> None:
            with owned_state():  # the buffers are this wrapper's: a step may write over them
                updates, new = self.transform.update(tree_unflatten(g_def, s.grads), s.state, params_tree, due=pattern, **extra)
            new_leaves, new_def = tree_flatten(new)
            if new_def.paths != s.state_def.paths:
                raise RuntimeError("captured step: the state's structure changed in a step")
            # The updates first: one may be an entry of the old state, which the state's copies overwrite.
            u_leaves = tree_flatten(updates)[0]
            if s.updates is None:  # the first step's outputs give the updates' shapes and dtypes
                s.updates = [graphs.empty_like(u) for u in u_leaves]
            for dst, src in zip(s.updates, u_leaves):
                graphs.copy(dst, src)
            # A new entry that is another entry's old buffer is copied aside before that buffer is written.
            position = {id(b): i for i, b in enumerate(s.state_leaves)}
            for i, src in enumerate(new_leaves):
                if position.get(id(src), i) != i:
                    aside = graphs.empty_like(src)
                    graphs.copy(aside, src)
                    new_leaves[i] = aside
            for dst, src in zip(s.state_leaves, new_leaves):
                if dst is not src:
                    graphs.copy(dst, src)

        graph = s.graphs.get(pattern)
        if graph is not None:
            graphs.launch(s.device, graph)
            return
        graphs.run(s.device, body)  # this step, eagerly; and the warm-up of a capture
        if pattern in s.refused or not self.capturing or self.graph_count >= MAX_GRAPHS:
            return
        try:
            s.graphs[pattern] = graphs.capture(s.device, body)
        except Exception as err:  # noqa: BLE001 - any failure of a capture refuses its pattern
            s.refused.add(pattern)
            self.failed_captures += 1
            self._warn(
                repr(pattern), f"captured step: a pattern could not be captured and steps eagerly ({type(err).__name__}: {err})"
            )
            if self.failed_captures >= MAX_FAILED_CAPTURES:
                self.capturing = False
                self._warn("off", f"captured step: {MAX_FAILED_CAPTURES} captures failed; capturing is off for this optimizer")


def _hashable(extra: dict) -> bool:
    try:
        hash(tuple(sorted(extra.items())))
    except TypeError:
        return False
    return not any(hasattr(v, "shape") for v in extra.values())


def captured(transform: Transform, *, enabled: Optional[bool] = None) -> CapturedTransform:
    """``transform`` with its update captured as CUDA graphs on CuPy arrays (module docstring).

    Parameters
    ----------
    transform:
        Any precond_ref transform (a method's factory's result).
    enabled:
        Capture (``True``) or step eagerly through ``transform.update`` (``False``); by default the
        environment variable ``PRECOND_REF_CAPTURE`` decides (``0`` turns it off), else on. A
        method that multiplies matrices steps eagerly either way (``refusal``, module docstring).
    """
    return CapturedTransform(transform, enabled=enabled)
