"""The first compiled steps of one torch optimizer on a small MLP, split by where their time goes:
``python first_step.py CLASS [BACKEND]``, one class per process (BACKEND: ``inductor``, the
default, ``aot_eager`` or ``eager``; ``compile=True`` at the class's defaults otherwise, the
root-free classes with ``batch_size=8``); ``STEPS`` steps (3 unless set; a method whose schedule
starts with a pattern that never recurs runs its first step eagerly and compiles at the second).

Prints one tab-separated line: class, backend, each step's CPU seconds (this process and its
children: the C++ compiler's runs) and wall seconds, dynamo's split over the steps
(``torch._dynamo.utils.compile_times``, wall seconds: the whole ``_compile.compile_inner``;
``OutputGraph.call_user_compiler``, the backend's share, AOT functionalisation and Inductor;
``compile_file``, Inductor's runs of the C++ compiler, part of the backend's), the graphs compiled,
the Python calls dynamo inlined while tracing (all traces: a restarted analysis traces again), the
library's share of them, the number of traces (``bytecode_tracing``), and the calls by module
(``precond_ref._backend`` ...) as ``module:count`` pairs. ``SHOW_FUNCTIONS=N``: the N functions
inlined most often; ``SHOW_INCLUSIVE=N``: the N functions whose calls inline the most calls, their
own included; ``SHOW_TIMES=1``: every timer of ``compile_times``.
``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1`` for a cold first run.
"""

import collections
import contextlib
import os
import resource
import sys
import time

import torch
import torch._dynamo.symbolic_convert as symbolic_convert

import precond_ref.adapters.torch as pt

name = sys.argv[1]
backend = sys.argv[2] if len(sys.argv) > 2 else "inductor"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(pt.__file__)))
inlined = collections.Counter()
functions = collections.Counter()  # (module, function name): inlined calls
inclusive = collections.Counter()  # (module, function name): inlined calls within its calls, its own included
stack = []
real_profile = symbolic_convert.profile_inline_call


def module_of(filename):
    """A code object's file as a dotted module name (the library's, array_api_compat's, torch's);
    ``<string>`` for code made by ``exec`` (a NamedTuple's ``__new__``)."""
    if filename.startswith("<"):
        return filename
    path = os.path.abspath(filename)
    for root, prefix in ((os.path.join(ROOT, "adapters"), "precond_ref.adapters"), (ROOT, "")):
        if path.startswith(root + os.sep):
            rest = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
            return f"{prefix}.{rest}" if prefix else rest
    parts = path.split(os.sep)
    for top in ("array_api_compat", "torch"):
        if top in parts:
            return top
    return "other"


@contextlib.contextmanager
def counting(output, code, depth):
    inlined[module_of(code.co_filename)] += 1
    key = (module_of(code.co_filename), code.co_name, code.co_firstlineno)
    functions[key[:2]] += 1
    stack.append(key)
    for frame in set(stack):
        inclusive[frame] += 1
    try:
        with real_profile(output, code, depth):
            yield
    finally:
        stack.pop()


symbolic_convert.profile_inline_call = counting

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
extra = {"batch_size": 8} if name in ("RFRMSProp", "RFAdamW", "IFShampoo") else {}
setting = True if backend == "inductor" else {"backend": backend}
opt = getattr(pt, name)(model.named_parameters(), compile=setting, **extra)
STEPS = int(os.environ.get("STEPS", "3"))


def cpu():
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


steps = []
for _ in range(STEPS):
    x, y = torch.randn(8, 8), torch.randn(8, 4)
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    c0, w0 = cpu(), time.perf_counter()
    opt.step()
    steps.append((cpu() - c0, time.perf_counter() - w0))

raw = torch._dynamo.utils.compilation_time_metrics


def total(key):
    return sum(raw.get(key, []))


cpp = total("compile_file")  # the C++ compiler's runs (Inductor's cpp_builder)
graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
library = sum(v for k, v in inlined.items() if k.startswith("precond_ref"))
by_module = " ".join(f"{k}:{v}" for k, v in inlined.most_common())
print(
    f"{name}\t{backend}\tcpu {' '.join(f'{c:.2f}' for c, _ in steps)}\twall {' '.join(f'{w:.2f}' for _, w in steps)}\tdynamo {total('_compile.compile_inner'):.2f}"
    f"\tbackend {total('OutputGraph.call_user_compiler'):.2f}\tcpp {cpp:.2f}\tgraphs {graphs}"
    f"\tinlined {sum(inlined.values())}\tlibrary {library}\ttraces {len(raw.get('bytecode_tracing', []))}\t{by_module}",
    flush=True,
)
if os.environ.get("SHOW_FUNCTIONS"):  # the most inlined functions
    for (module, function), count in functions.most_common(int(os.environ["SHOW_FUNCTIONS"])):
        print(f"  {count}\t{module}.{function}")
if os.environ.get("SHOW_INCLUSIVE"):  # the functions whose calls inline the most
    for (module, function, line), count in inclusive.most_common(int(os.environ["SHOW_INCLUSIVE"])):
        print(f"  {count}\t{module}.{function}:{line}")
if os.environ.get("SHOW_TIMES"):
    for k, v in sorted(raw.items(), key=lambda kv: -sum(kv[1])):
        print(f"  {k}\t{sum(v):.3f}\t{len(v)}")
