"""Bytecode instructions dynamo traces (and its tracing seconds) for each torch class's compiled step,
backend "eager", 6 steps; model MLP (Linear 8-16, Tanh, Linear 16-4, float64) or SMALL=1 (Linear 3-2).
Usage: python records/compile-trace-2026-11-29/trace_instr.py [CLASS ...] [--top N]   (--top: hottest functions of each class)
Instruction counts are deterministic: compare before/after on them; seconds are noisy."""
import collections, os, sys, time, warnings
import torch
import precond_ref.adapters.torch as pt
from torch._dynamo import symbolic_convert as sc

torch.set_num_threads(1)
args = [a for a in sys.argv[1:] if not a.startswith("--")]
top = int(sys.argv[sys.argv.index("--top") + 1]) if "--top" in sys.argv else 0
if top:
    args = [a for a in args if a != str(top)]
NAMES = args or ["AGD", "ASGO", "DASGO", "Sketchy", "SAdaGrad", "RFRMSProp", "RFAdamW", "IFShampoo", "MBF"]
KW = {"RFRMSProp": dict(batch_size=16), "RFAdamW": dict(batch_size=16), "IFShampoo": dict(batch_size=16)}
cnt, calls = collections.Counter(), collections.Counter()
orig = sc.InstructionTranslatorBase.step


def step(self):
    code = self.f_code
    key = (code.co_filename.split("site-packages/")[-1].split("/work/")[-1], code.co_name, code.co_firstlineno)
    if getattr(self, "instruction_pointer", 1) == 0:
        calls[key] += 1
    cnt[key] += 1
    return orig(self)


sc.InstructionTranslatorBase.step = step
torch.compile(lambda a: a.sin() + 1, backend="eager")(torch.ones(2))
print(f"model: {'Linear(3,2)' if os.environ.get('SMALL') else 'MLP 8-16-4'}")
print("| class | graphs | traced instructions | inlined calls | dynamo s |")
print("|---|---:|---:|---:|---:|")
for name in NAMES:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cnt.clear(); calls.clear()
    torch.manual_seed(0)
    if os.environ.get("SMALL"):
        model = torch.nn.Linear(3, 2).double()
        x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    else:
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).double()
        x, y = torch.randn(16, 8, dtype=torch.float64), torch.randn(16, 4, dtype=torch.float64)
    opt = getattr(pt, name)(model.named_parameters(), compile={"backend": "eager"}, **KW.get(name, {}))
    torch._dynamo.utils.clear_compilation_metrics()
    for _ in range(6):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    ms = torch._dynamo.utils.get_compilation_metrics()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    dyn = sum((m.entire_frame_compile_time_s or 0) for m in ms)
    print(f"| {name} | {graphs} | {sum(cnt.values())} | {sum(calls.values())} | {dyn:.2f} |", flush=True)
    if top:
        for (f, n, line), c in cnt.most_common(top):
            print(f"    {c:6d} {calls[(f, n, line)]:5d} {f}:{line}:{n}")
