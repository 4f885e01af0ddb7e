"""Bytes a compiled torch step reads and writes, over the parameters' bytes, on the reference GPT's shapes
(`python compiled.py METHOD,... [size] [--whole]`): TorchInductor's own count of its kernels after fusion
(`GraphLowering.count_bytes`: each scheduled kernel's buffers read and written once), plus the bytes of the
operations the step runs eagerly around its compiled calls (inputs and outputs of each operation that
launches a kernel, as records/traffic-2026-11-28/traffic.py counts them, with the arrays an in-place
operation writes). The script's own gradient making is not counted.

The step is the one `compile=True` runs: the per-leaf kernels of the element-wise methods and DASGO's
per-leaf calls in a group of 64 tensors or more (a kernel compiled for every length: its count at the
length it was compiled for, over the largest array it touches, gives passes per element, applied to each
call's length), one graph of the whole group per pattern of refresh decisions for the others; `--whole`
makes every method one graph per pattern; `--eager` counts the eager step (`compile=False`, every operation
counted as above) for comparison. Each pattern's bytes are weighted by how often the steady
schedule makes it (steps 512-1023): the mean over the refresh period, as bench's mean step.
AdamW(fused) is counted by its definition: parameter, gradient and both moments read, three written."""
import collections
import contextlib
import sys

import torch
import torch._inductor.config as inductor_config
from torch._inductor import graph as inductor_graph
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import precond_ref.adapters.torch as T
from precond_ref.adapters import _torch_compile as C
from precond_ref.benchmarks.counting import NOT_LAUNCHED, VIEWS, gpu_grouping
from precond_ref.benchmarks.models import SIZES, build_torch

inductor_config.fx_graph_cache = False  # a cached graph is not lowered again, so not counted
torch.set_num_threads(1)
args = [a for a in sys.argv[1:] if not a.startswith("--")]
if "--whole" in sys.argv:
    C.PER_LEAF_MIN_TENSORS = 10**9

LOWERED = {}  # key of the compiled call -> (bytes, bytes of the largest array a kernel touches)
CURRENT = [None]
_count_bytes = inductor_graph.GraphLowering.count_bytes


def count_bytes(self):
    total, per_node, runtimes = _count_bytes(self)
    largest = 1
    extern = sum(n4 * 4 for node, n4 in per_node if type(node).__name__ == "ExternKernelSchedulerNode")
    for node, _ in per_node:
        for dep in list(node.read_writes.reads) + list(node.read_writes.writes):
            with contextlib.suppress(Exception):
                largest = max(largest, int(dep.numbytes_hint()))
    old = LOWERED.get(CURRENT[0], (0, 1, 0))
    LOWERED[CURRENT[0]] = (old[0] + total, max(old[1], largest), old[2] + extern)
    return total, per_node, runtimes


inductor_graph.GraphLowering.count_bytes = count_bytes
import torch._inductor.compile_fx as compile_fx  # noqa: E402

compile_fx.inductor_metrics_log.isEnabledFor = lambda level: True  # count_bytes runs where this log is on
compile_fx.inductor_metrics_log.info = lambda *a, **k: None

COUNTED = collections.Counter()  # per step: "eager" and each compiled key's bytes


def nbytes(x):
    return x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0


def flat(v):
    if isinstance(v, (list, tuple)):
        for a in v:
            yield from flat(a)
    elif isinstance(v, dict):
        for a in v.values():
            yield from flat(a)
    else:
        yield v


def compiled_call(key, scale_bytes, call):
    """Run a compiled call outside the eager count; add its kernels' bytes (scaled to this call's
    largest operand for a kernel compiled for every length)."""
    CURRENT[0] = key
    with _disable_current_modes():
        out = call()
    total, largest, extern = LOWERED.get(key, (0, 1, 0))
    scale = 1 if scale_bytes is None else scale_bytes / largest
    COUNTED[key] += total * scale
    COUNTED["extern"] += extern * scale
    CURRENT[0] = None
    return out


_call = C.CompiledStep._call
C.CompiledStep._call = lambda self, grads, state, params, due, extra: compiled_call(
    ("step", id(self), due), None, lambda: _call(self, grads, state, params, due, extra))
_kernel = C.KernelWrites.kernel


def kernel(self, key, fn, operands):
    largest = max(nbytes(o) for o in operands)
    return compiled_call(("kernel", key), largest, lambda: _kernel(self, key, fn, operands))


C.KernelWrites.kernel = kernel
_leaf_init = C.LeafCalls.__init__


def leaf_init(self, transform, options):
    _leaf_init(self, transform, options)
    for name in ("_any_size", "_per_shape"):
        fn = getattr(self, name)

        def wrapped(transform, ok, g, state, w, due, extra, fn=fn, name=name):
            shape = tuple(g.shape) if name == "_per_shape" else g.ndim
            largest = max(nbytes(x) for x in flat([g, w, list(state.groups["."].values())]))
            return compiled_call(("leaf", name, shape, due), largest if name == "_any_size" else None,
                                 lambda: fn(transform, ok, g, state, w, due, extra))

        setattr(self, name, wrapped)


C.LeafCalls.__init__ = leaf_init


class Eager(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        op = func.__name__.split(".")[0]
        if op not in VIEWS and op not in NOT_LAUNCHED:
            b = sum(nbytes(a) for a in flat(list(args) + list((kwargs or {}).values()))) + sum(nbytes(o) for o in flat(out))
            if op.endswith("_") and out is None and args:  # a foreach in-place: it writes its first list
                b += sum(nbytes(a) for a in flat(args[0]))
            COUNTED["eager"] += b
        return out


size = args[1] if len(args) > 1 else "reference"
for name in args[0].split(","):
    torch.manual_seed(0)
    model = build_torch("gpt", SIZES["gpt"][size], torch.float32, "cpu")
    named = list(model.named_parameters())
    pbytes = sum(nbytes(p) for _, p in named)
    kw = {"batch_size": 512} if name in ("RFRMSProp", "RFAdamW", "IFShampoo") else {}
    opt = getattr(T, name)(named, lr=1e-3, compile="--eager" not in sys.argv, **kw)
    LOWERED.clear()
    per_pattern = {}
    seen = collections.Counter()
    with gpu_grouping():
        transform = None
        step = 0
        while True:
            for _, p in named:
                p.grad = torch.randn_like(p) * 1e-2
            due = () if transform is None else tuple(transform.due(step))
            COUNTED.clear()
            with Eager():
                opt.step()
            if transform is None:
                (transform,) = [entry[1] for entry in opt._transforms.values()]
                late = collections.Counter(tuple(transform.due(s)) for s in range(512, 1024))
                first = C.due_pattern_steps(transform)
                last_needed = max(first[p] for p in late) + 1  # the step after which every late pattern ran twice
                due = tuple(transform.due(0))
            seen[due] += 1
            if due in late and seen[due] == 2:  # its second run: compiled, the state made
                per_pattern[due] = sum(v for k, v in COUNTED.items() if k != "extern"), COUNTED["eager"], COUNTED["extern"]
            step += 1
            if all(p in per_pattern for p in late) or step > 2 * last_needed + 4:
                break
    mean = sum(per_pattern[p][0] * n for p, n in late.items() if p in per_pattern) / sum(late.values())
    eager = sum(per_pattern[p][1] * n for p, n in late.items() if p in per_pattern) / sum(late.values())
    extern = sum(per_pattern[p][2] * n for p, n in late.items() if p in per_pattern) / sum(late.values())
    print(f"{name:10s} {mean / pbytes:6.2f}x params a step ({eager / pbytes:.2f}x of it eager, "
          f"{extern / pbytes:.2f}x Inductor's extern kernels: products, decompositions, copies), "
          f"{mean / pbytes / 7:.2f}x AdamW(fused)'s 7x; {len(per_pattern)} of {len(late)} patterns, {step} steps; "
          f"per pattern: " + ", ".join(f"{per_pattern[p][0] / pbytes:.2f}x ({n}/512)" for p, n in late.items() if p in per_pattern),
          flush=True)
