"""The graphs dynamo captures for every torch test case and their trajectories, to compare the code
before and after a change to what runs while the step is traced: ``python graphs.py OUT.json``
records, ``python graphs.py --compare A.json B.json`` reports per case whether the graphs and the
parameters after the steps are the same. ``GRAPHS_CASES=a,b`` records only the cases whose id
contains one of the words.

Each case of ``tests/adapters/cases.py``'s ``TORCH_CASES`` steps a two-layer MLP 6 times in float64
and float32 with ``compile={"backend": recording}``: AOTAutograd's functionalised forward graph (the
ATen operations the step runs, what Inductor compiles), its code kept and run as captured, so that
equal code is equal arithmetic; dynamo's own graph is kept beside it (its Python-level calls: a
no-op ``.to`` of a tensor to its own dtype is a node there and none in the ATen graph). The
parameters are kept as their bytes' hex digest (bitwise).
"""

import hashlib
import json
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "adapters"))


def record(path):
    from cases import TORCH_CASES
    from torch._dynamo.backends.common import aot_autograd

    out = {}
    only = [w for w in os.environ.get("GRAPHS_CASES", "").split(",") if w]
    for case in TORCH_CASES:
        if only and not any(w in case.id for w in only):
            continue
        for dtype in (torch.float64, torch.float32):
            graphs, dynamo_graphs = [], []

            def forward(gm, example_inputs):
                graphs.append(gm.code)
                return gm.forward

            aot = aot_autograd(fw_compiler=forward)

            def recording(gm, example_inputs):
                dynamo_graphs.append(gm.code)
                return aot(gm, example_inputs)

            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).to(dtype)
            gen = torch.Generator().manual_seed(1)
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would warn
                try:
                    opt = case.make(model.named_parameters(), compile={"backend": recording})
                    for _ in range(6):
                        x, y = torch.randn(16, 5, generator=gen).to(dtype), torch.randn(16, 2, generator=gen).to(dtype)
                        opt.zero_grad()
                        ((model(x) - y) ** 2).mean().backward()
                        opt.step(**case.step_kwargs)
                    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
                except Exception as err:  # recorded: a case that fails before must fail after
                    digest = "ERROR " + repr(err)[:300]
            key = f"{case.id}|{dtype}"
            out[key] = {"graphs": graphs, "dynamo_graphs": dynamo_graphs, "params": digest}
            print(key, len(graphs), "graphs", digest[:16], flush=True)
            torch._dynamo.reset()
    with open(path, "w") as f:
        json.dump(out, f)


def compare(a_path, b_path):
    a, b = json.load(open(a_path)), json.load(open(b_path))
    bad = 0
    for key in sorted(set(a) | set(b)):
        if key not in a or key not in b:
            print("MISSING", key)
            bad += 1
            continue
        x, y = a[key], b[key]
        notes = []
        if x["params"] != y["params"]:
            notes.append("parameters differ")
        if len(x["graphs"]) != len(y["graphs"]):
            notes.append(f"graphs {len(x['graphs'])} -> {len(y['graphs'])}")
        elif x["graphs"] != y["graphs"]:
            notes.append("ATen graph code differs in " + ", ".join(str(i) for i, (g, h) in enumerate(zip(x["graphs"], y["graphs"])) if g != h))
        if x["dynamo_graphs"] != y["dynamo_graphs"]:
            notes.append("dynamo graph code differs (same ATen graphs: a note)")
        if [n for n in notes if "a note" not in n]:
            bad += 1
        if notes:
            print(key, "; ".join(notes))
    print(f"{len(a)} cases; {bad} differ")


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        compare(sys.argv[2], sys.argv[3])
    else:
        record(sys.argv[1])
