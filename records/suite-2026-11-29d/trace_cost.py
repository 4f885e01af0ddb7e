"""Dynamo's tracing cost of each torch class's compiled step (backend "eager": tracing only, no codegen),
on a 2-layer MLP (4 leaves): graphs compiled in 6 steps and seconds of dynamo per graph."""
import time, warnings, torch
import precond_ref.adapters.torch as pt
torch.set_num_threads(1)
torch.manual_seed(0)
KW = {"RFRMSProp": dict(batch_size=16), "RFAdamW": dict(batch_size=16), "IFShampoo": dict(batch_size=16)}
torch.compile(lambda a: a.sin() + 1, backend="eager")(torch.ones(2))  # dynamo's own first-use cost, outside the rows
print("| class | graphs | dynamo s total | s a graph |")
print("|---|---:|---:|---:|")
for name in ["AGD", "ASGO", "DASGO", "Sketchy", "SAdaGrad", "RFRMSProp", "RFAdamW", "IFShampoo", "MBF"]:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).double()
    opt = getattr(pt, name)(model.named_parameters(), compile={"backend": "eager"}, **KW.get(name, {}))
    x, y = torch.randn(16, 8, dtype=torch.float64), torch.randn(16, 4, dtype=torch.float64)
    torch._dynamo.utils.clear_compilation_metrics()
    t = time.perf_counter()
    for _ in range(6):
        opt.zero_grad(); torch.nn.functional.mse_loss(model(x), y).backward(); opt.step()
    wall = time.perf_counter() - t
    ms = torch._dynamo.utils.get_compilation_metrics()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    dyn = sum((m.entire_frame_compile_time_s or 0) for m in ms)
    print(f"| {name} | {graphs} | {dyn:.2f} | {dyn / max(graphs, 1):.2f} |")
