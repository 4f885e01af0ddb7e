"""The captured step of the torch optimizers: each refresh pattern's update as a CUDA graph.

On CUDA an eager step is host work: a matrix method launches hundreds to thousands of small
kernels, each costing the host more than the GPU. Here the core update of a set of parameters
stepped together (a param group, or the part of it that took part in the same number of steps) is
captured once per pattern of interval decisions (``Transform.due``: a method with one interval has
two patterns, refresh and reuse; a refresh spread over ``T`` phases ``T``) and replayed whenever
the pattern recurs, so that a step costs the host the adapter's bookkeeping, one
``torch._foreach_copy_`` of the gradients and one graph launch per set.

The mechanics follow torch's CUDA-graph recipe (``torch.cuda.graphs``):

* a pattern's first step runs uncaptured on a side stream, from the set's static gradient buffers
  (warm-up: lazy initialisations, the compiled kernels' compilation and autotuning); the step is
  then captured on that stream (recorded, not run); the next step of that pattern replays it;
* the gradients are copied into the static buffers before each replay, so ``.grad`` tensors may
  be new every step (``zero_grad(set_to_none=True)``);
* the learning rate is the param group's 0-D device tensor, written before the replay (a
  scheduler's new ``lr`` is a ``fill_`` on the device), the state and the parameters are written
  in place (every eager step of a capturing optimizer writes its state in place too, so that the
  graphs' addresses stay the state's), and nothing reads the device on the host;
* every other value the update depends on is baked into the graph: the transform (the group's
  other hyperparameters), the pattern, the step's keyword arguments (``batch_size=``), the
  parameters' and state tensors' addresses. A graph is replayed only while all of them are what
  it was captured with: a changed hyperparameter rebuilds the transform (a new pattern key); a
  state tensor replaced (``load_state_dict``, a user's assignment), a parameter's storage replaced
  (``p.data = ...``, a dtype or device change) or a new set of parameters (one missed its gradient)
  captures again; ``load_state_dict`` and ``add_param_group`` drop every graph.

Memory: the graphs of one optimizer share one private memory pool, which holds a step's
temporaries (the graphs replay one after another, so they reuse each other's); each set of
parameters keeps one copy of its gradients (the static buffers, shared by its patterns); the
state and parameters are the optimizer's own. At most :data:`MAX_GRAPHS` graphs are kept per
optimizer; a pattern beyond them runs eagerly.

A step that cannot be captured runs as it would otherwise (eagerly, or compiled): a method whose
step reads the device on the host (``not_capturable_because``: Sketchy's and S-AdaGrad's
decompositions, ASGO's ``eigh`` roots), parameters that are not CUDA tensors or are
sharded (DTensor), the distributed classes (their step exchanges blocks between ranks),
``compile`` with Inductor's own CUDA graphs, a step inside a capture the user
makes; a capture that raises refuses its pattern (the others stay captured), and
:data:`MAX_FAILED_CAPTURES` of them turn capturing off for the optimizer. With ``capture=True`` each
such fallback warns once; with the default (``None``) only an unexpected failure does.

The CUDA specifics are one object, :data:`GRAPHS`, which tests replace by a double that records
the captured callable and re-runs it on replay (``tests/adapters/fake_graphs.py``), so that the
bookkeeping is tested on a CPU.
"""

from __future__ import annotations

import contextlib
import numbers
import operator
import os
import sys
import warnings
from typing import Any, Callable, Optional

import torch

from ._torch_compile import transient_patterns

__all__ = ["ENVIRONMENT_VARIABLE", "BY_DEFAULT", "MAX_GRAPHS", "capture_setting", "Captures", "CudaGraphs", "Spoiled"]

#: ``PRECOND_REF_CAPTURE=0`` steps every torch optimizer without CUDA graphs (``1`` captures where
#: possible); the constructor's ``capture=`` argument wins over it.
ENVIRONMENT_VARIABLE = "PRECOND_REF_CAPTURE"

#: Whether ``capture=None`` captures CUDA steps (the one switch of the default).
BY_DEFAULT = True

#: The most graphs an optimizer keeps; a further pattern runs eagerly.
MAX_GRAPHS = 32

#: Failed captures (each refuses its own pattern) after which the optimizer stops capturing.
MAX_FAILED_CAPTURES = 8

#: Captures of one set of parameters after which its state is taken to change identity at every
#: step (a step that cannot write in place), and it steps without capture from then on.
MAX_CAPTURES_PER_SET = 4 * MAX_GRAPHS

_OFF = ("0", "false", "off", "no")
_ON = ("1", "true", "on", "yes")


def capture_setting(setting: Optional[bool], capturable: bool, owner: str) -> Optional[bool]:
    """The constructor's ``capture`` as the optimizer keeps it: ``False`` (never), ``None``
    (where possible, fallbacks quiet but for failures) or ``True`` (asked for: every fallback
    warns once). ``None`` follows :data:`ENVIRONMENT_VARIABLE`, then :data:`BY_DEFAULT`."""
    if setting is not None and not isinstance(setting, bool):
        raise TypeError(f"{owner}: capture must be None, True or False, got {setting!r}")
    if capturable:
        if setting:
            raise ValueError(
                f"{owner}: capture=True and capturable=True exclude each other: capturable=True is for capturing "
                "step() in a CUDA graph yourself; capture=True makes the optimizer capture its own steps"
            )
        return False
    if setting is None:
        env = os.environ.get(ENVIRONMENT_VARIABLE, "").strip().lower()
        if env in _OFF or (env not in _ON and not BY_DEFAULT):
            return False
    return setting


class CudaGraphs:
    """CUDA graphs through torch's own API (``torch.cuda.CUDAGraph``, as ``torch.cuda.graph``)."""

    @staticmethod
    def accepts(device: torch.device) -> bool:
        return device.type == "cuda"

    @staticmethod
    def capturing() -> bool:
        """Whether the current stream is already capturing (a user's capture of the step)."""
        return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()

    @staticmethod
    def stream(device: torch.device) -> Any:
        return torch.cuda.Stream(device=device)

    @staticmethod
    def pool(device: torch.device) -> Any:
        with torch.cuda.device(device):
            return torch.cuda.graph_pool_handle()

    @staticmethod
    @contextlib.contextmanager
    def side(stream: Any) -> Any:
        """Work on ``stream``, ordered after the current stream's and before its later work."""
        current = torch.cuda.current_stream(stream.device)
        stream.wait_stream(current)
        try:
            with torch.cuda.stream(stream):
                yield
        finally:
            current.wait_stream(stream)

    @staticmethod
    def capture(fn: Callable[[], Any], *, pool: Any, stream: Any, writes: list) -> tuple:
        """``(graph, fn())`` with ``fn``'s kernels recorded on ``stream`` into ``pool``, not run.

        As ``torch.cuda.graph``, but without its host synchronisation, and the capture ends (and
        the stream is restored) whatever ``fn`` raises. Nothing runs during a capture, so a failed
        one leaves ``writes`` (the tensors the step writes) as they were.
        """
        graph = torch.cuda.CUDAGraph()
        # No synchronisation first (torch.cuda.graph's is to free memory for the graph): work
        # already on the stream (the warm-up's) runs, and is not part of the graph.
        with torch.cuda.stream(stream):
            graph.capture_begin(pool, capture_error_mode="thread_local")
            try:
                out = fn()
            except BaseException:
                with contextlib.suppress(Exception):
                    graph.capture_end()
                raise
            graph.capture_end()
        return graph, out


#: The graph backend: tests replace it by a double (see the module's docstring).
GRAPHS: Any = CudaGraphs()


class Spoiled(Exception):
    """A capture recorded something other than the warmed-up step (the compiled step fell back to
    eager inside it): the graph is dropped and the pattern warmed up again at its next step."""


def _leaves(state: Any) -> list:
    """The state's tensors, in the order the step builds its ``groups`` (the graphs' inputs)."""
    return [state.count, state.nonfinite_count, *(v for entries in state.groups.values() for v in entries.values())]


def _same(a: list, b: list) -> bool:
    """Whether ``a`` holds the very tensors of ``b``, in its order."""
    return len(a) == len(b) and all(map(operator.is_, a, b))


def _same_set(a: list, b: list) -> bool:
    """Whether ``a`` holds the very tensors of ``b``, in any order (a step's new state lists its
    entries in the transform's order, the state loaded from a checkpoint in the checkpoint's)."""
    return len(a) == len(b) and set(map(id, a)) == set(map(id, b))


def _inductor_graphs(options: Any) -> bool:
    """Whether ``compile`` options make Inductor capture CUDA graphs of its own (which cannot run
    inside a capture)."""
    if not isinstance(options, dict):
        return False
    mode = options.get("mode") or ""
    return mode in ("reduce-overhead", "max-autotune") or bool(options.get("options", {}).get("triton.cudagraphs"))


class _Set:
    """One set of parameters stepped together: its static gradient buffers and its graphs."""

    def __init__(self, plan: Any, refusal: Optional[str]) -> None:
        self.plan = plan
        self.ids = frozenset(map(id, plan.tensors))
        self.refusal = refusal  # why this set steps without capture, or None
        self.buffers: Optional[list] = None
        self.graphs: dict = {}  # pattern -> graph
        self.inputs: list = []  # the state tensors the graphs read and write
        self.pointers: tuple = ()  # the parameters' storage addresses they were captured with
        self.transform: Any = None
        self.transient: frozenset = frozenset()
        self.refused_patterns: set = set()
        self.captures = 0


class Captures:
    """An optimizer's captured steps: its sets of parameters, the memory pool and side stream."""

    def __init__(self, owner: str, asked: bool) -> None:
        self.owner = owner
        self.asked = asked  # capture=True: every fallback warns
        self.sets: dict = {}  # id(plan) -> _Set
        self.devices: dict = {}  # device -> (pool, stream)
        self.off: Optional[str] = None  # why capturing stopped for good
        self.failed = 0  # captures that raised
        self.warned = False

    def clear(self) -> None:
        """Drop every graph (a checkpoint loaded, a param group added)."""
        self.sets.clear()

    def graphs(self) -> int:
        return sum(len(s.graphs) for s in self.sets.values())

    def _warn(self, reason: str, failure: bool = False) -> None:
        if (self.asked or failure) and not self.warned:
            self.warned = True
            warnings.warn(
                f"{self.owner}: the step is not captured in a CUDA graph ({reason}); it runs as without capture "
                f"(pass capture=False or set {ENVIRONMENT_VARIABLE}=0 to skip the attempt)",
                RuntimeWarning,
                stacklevel=_caller_level(),
            )

    def _set(self, opt: Any, plan: Any) -> _Set:
        s = self.sets.get(id(plan))
        if s is not None and s.plan is plan:
            return s
        tensors = plan.tensors
        refusal = None
        if getattr(opt, "_accepts_dtensor", False):  # torch_distributed's classes
            refusal = "the distributed classes exchange blocks between ranks within the step"
        elif any(hasattr(p, "device_mesh") for p in tensors):
            refusal = "sharded (DTensor) parameters"
        elif not all(GRAPHS.accepts(p.device) for p in tensors):
            device = next(p.device for p in tensors if not GRAPHS.accepts(p.device))
            refusal = f"a parameter on {device}, not on a CUDA device"
        elif _inductor_graphs(opt._compile_options):
            refusal = "compile's mode captures CUDA graphs of its own"
        s = _Set(plan, refusal)
        # A parameter is in one set at a time: a set that shares one is gone (its members split).
        for key in [k for k, old in self.sets.items() if old.ids & s.ids]:
            del self.sets[key]
        self.sets[id(plan)] = s
        if refusal is not None:
            self._warn(refusal)
        return s

    def step(self, opt: Any, plan: Any, transform: Any, state: Any, calls: int, extra: dict, update: Callable,
             grads: list) -> Any:
        """The new state of ``plan``'s parameters after this step, ``None`` where the step is not
        the captured path's (the caller then runs it as without capture). ``grads``: the gradient
        leaves of the step, in the plan's order.

        ``update(grads, capturing, in_place=True)`` runs the core update from the gradient leaves
        ``grads`` (in the plan's order), writing the parameters and (``in_place``) the state in
        place, and returns the new state; with ``capturing`` it raises :class:`Spoiled` if what it
        ran is not what the warm-up ran.
        """
        if self.off is not None or GRAPHS.capturing():
            return None
        s = self._set(opt, plan)
        if s.refusal is not None:
            return None
        if s.transform is not transform:
            refusal = opt.not_capturable_because
            if refusal is not None:
                s.refusal = refusal
                self._warn(refusal)
                return None
            s.graphs.clear()
            s.transform, s.transient = transform, transient_patterns(transform)
        if calls == 0 or opt._restack:
            # The first step makes the state, and the first after a load remakes it (its tensors as
            # the step lays them out, views of its stacks): never captured.
            return update(grads, False, in_place=False)
        pointers = tuple(p.data_ptr() for p in plan.tensors)
        if s.pointers and pointers != s.pointers:
            # A parameter's storage replaced (a dtype or device move, p.data = ...): a set made
            # anew, its device checked and its gradient buffers made again.
            del self.sets[id(plan)]
            return self.step(opt, plan, transform, state, calls, extra, update, grads)
        pattern = _pattern(transform, calls, extra)
        inputs = _leaves(state)
        if s.graphs and not _same(inputs, s.inputs):
            s.graphs.clear()  # the state the graphs read and write is gone
        graph = s.graphs.get(pattern)
        if graph is not None:
            torch._foreach_copy_(s.buffers, grads)
            graph.replay()
            return state
        if pattern is None or pattern[0] in s.transient or pattern in s.refused_patterns or self.graphs() >= MAX_GRAPHS:
            return update(grads, False)
        return self._warm_up_and_capture(s, pattern, inputs, pointers, grads, update)

    def _warm_up_and_capture(
        self, s: _Set, pattern: tuple, inputs: list, pointers: tuple, grads: list, update: Callable
    ) -> Any:
        """The pattern's first step, uncaptured from the static buffers on the side stream, then its capture."""
        device = s.plan.tensors[0].device
        if not all(GRAPHS.accepts(t.device) for t in inputs):
            s.refusal = f"a state tensor on {next(t.device for t in inputs if not GRAPHS.accepts(t.device))}"
            self._warn(s.refusal)
            return update(grads, False)
        if device not in self.devices:
            self.devices[device] = (GRAPHS.pool(device), GRAPHS.stream(device))
        pool, stream = self.devices[device]
        if s.buffers is None:
            s.buffers = [torch.empty_like(g) for g in grads]
        torch._foreach_copy_(s.buffers, grads)
        with GRAPHS.side(stream):
            new_state = update(s.buffers, False)
        if not _same_set(_leaves(new_state), inputs):
            s.refused_patterns.add(pattern)  # a step that does not write its state in place
            return new_state
        s.captures += 1
        if s.captures > MAX_CAPTURES_PER_SET:
            s.refusal = "its state tensors are replaced between steps"
            self._warn(s.refusal, failure=True)
            return new_state
        writes = [*s.plan.tensors, *inputs]
        try:
            graph, out = GRAPHS.capture(lambda: update(s.buffers, True), pool=pool, stream=stream, writes=writes)
        except Spoiled:
            return new_state
        except Exception as error:  # noqa: BLE001 - any failure of a capture falls back
            # The pattern's steps run without capture from now on (a routine that cannot be
            # captured, e.g. a batched LU of cuSOLVER's, is usually one phase's); a step failing
            # in every pattern stops capturing altogether.
            reason = f"capturing raised {type(error).__name__}: {str(error).strip()[:200]}"
            s.refused_patterns.add(pattern)
            self.failed += 1
            if self.failed >= MAX_FAILED_CAPTURES:
                self.off = reason
                self.sets.clear()
            self._warn(f"{reason}; the steps of that pattern of periodic work run without it", failure=True)
            return new_state
        if _same_set(_leaves(out), inputs):
            s.graphs[pattern] = graph
            s.inputs, s.pointers = inputs, pointers
        else:
            s.refused_patterns.add(pattern)
        return new_state


_INSIDE = tuple(os.path.dirname(os.path.abspath(f)) + os.sep for f in (__file__, torch.__file__))


def _caller_level() -> int:
    """``warnings.warn``'s ``stacklevel`` of the first frame outside this package and torch (the
    user's ``opt.step()``, whichever class and torch wrappers stand between)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INSIDE):
        frame, level = frame.f_back, level + 1
    return level


def _pattern(transform: Any, calls: int, extra: dict) -> Optional[tuple]:
    """What a graph of this step bakes in besides the transform: the interval decisions and the
    step's keyword arguments; ``None`` when an argument is not a plain value (a tensor)."""
    due = getattr(transform, "due", None)
    decisions = tuple(due(calls)) if due is not None else ()
    if not extra:
        return (decisions,)
    items = tuple(sorted(extra.items()))
    if not all(v is None or isinstance(v, (numbers.Number, str)) for _, v in items):
        return None
    return (decisions, items)


def book(opt: Any) -> Optional[Captures]:
    """``opt``'s :class:`Captures` (made on first use, and again after a copy or unpickling, which
    start without graphs), or ``None`` where ``capture`` is off."""
    setting = getattr(opt, "_capture", None)
    if setting is False:
        return None
    captures = opt._captures
    if not isinstance(captures, Captures):
        captures = opt._captures = Captures(type(opt).__name__, bool(setting))
    return captures
