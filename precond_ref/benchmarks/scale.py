"""One torch optimizer at GPT-2-small's parameter shapes: first-step time, state and peak memory.

``python -m precond_ref.benchmarks.scale [METHOD[:key=value,...] ...]`` runs each method
(default: the nine and torch's AdamW; e.g. ``SAdaGrad:rank=4`` sets arguments) in a fresh process, so that each peak resident set is that method's alone: the
124,439,808 float32 parameters of GPT-2 small in its 148 tensors (transformers' names and
``Conv1D`` layout, inputs x outputs), random gradients, ``lr=1e-3`` and the class's defaults
otherwise (the root-free methods are told ``batch_size=8``). One JSON line per method: the first
``step``'s seconds, state bytes (every tensor in ``optimizer.state``) over parameter bytes, and
the process's peak resident set (``VmHWM``) less its resident set before the optimizer was made
(parameters and gradients). A method refused at construction (its state alone would not fit) is
reported with the refusal's message. ``--estimate [gpt2-small] [reference-gpt]`` prints every
method's state size at those shapes from meta-device parameters instead (seconds, no memory).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

from .measure import _status_bytes

METHODS = ("AdamW", "AGD", "ASGO", "DASGO", "MBF", "RFRMSProp", "RFAdamW", "IFShampoo", "Sketchy", "SAdaGrad")
_ROOT_FREE = ("RFRMSProp", "RFAdamW", "IFShampoo")


def gpt2_small_shapes(vocab: int = 50257, positions: int = 1024, width: int = 768, layers: int = 12) -> list:
    """``(name, shape)`` of GPT-2 small's 148 parameter tensors (transformers' ``GPT2LMHeadModel``
    with the tied output embedding counted once)."""
    shapes = [("transformer.wte.weight", (vocab, width)), ("transformer.wpe.weight", (positions, width))]
    for i in range(layers):
        h = f"transformer.h.{i}"
        shapes += [
            (f"{h}.ln_1.weight", (width,)), (f"{h}.ln_1.bias", (width,)),
            (f"{h}.attn.c_attn.weight", (width, 3 * width)), (f"{h}.attn.c_attn.bias", (3 * width,)),
            (f"{h}.attn.c_proj.weight", (width, width)), (f"{h}.attn.c_proj.bias", (width,)),
            (f"{h}.ln_2.weight", (width,)), (f"{h}.ln_2.bias", (width,)),
            (f"{h}.mlp.c_fc.weight", (width, 4 * width)), (f"{h}.mlp.c_fc.bias", (4 * width,)),
            (f"{h}.mlp.c_proj.weight", (4 * width, width)), (f"{h}.mlp.c_proj.bias", (width,)),
        ]
    return shapes + [("transformer.ln_f.weight", (width,)), ("transformer.ln_f.bias", (width,))]


def _spec(text: str) -> tuple[str, dict]:
    """``"SAdaGrad:rank=4"`` as ``("SAdaGrad", {"rank": 4})`` (numbers parsed, other values strings)."""
    name, _, options = text.partition(":")
    kwargs = {}
    for item in filter(None, options.split(",")):
        key, _, value = item.partition("=")
        try:
            kwargs[key] = int(value)
        except ValueError:
            try:
                kwargs[key] = float(value)
            except ValueError:
                kwargs[key] = value
    return name, kwargs


def measure(spec: str) -> dict:
    """The row of one method (``Name`` or ``Name:key=value,...``), in this process."""
    import torch

    import precond_ref.adapters.torch as pt

    torch.manual_seed(0)
    named = [(n, torch.nn.Parameter(torch.randn(s, dtype=torch.float32) * 0.02)) for n, s in gpt2_small_shapes()]
    for _, p in named:
        p.grad = torch.randn_like(p) * 1e-3
    param_bytes = sum(p.numel() * p.element_size() for _, p in named)
    before = _status_bytes("VmRSS")
    method, options = _spec(spec)
    row: dict[str, Any] = {"method": spec, "tensors": len(named), "parameters": sum(p.numel() for _, p in named)}
    try:
        if method == "AdamW":
            opt = torch.optim.AdamW([p for _, p in named], lr=1e-3)
        else:
            opt = getattr(pt, method)(named, lr=1e-3, **({"batch_size": 8} if method in _ROOT_FREE else {}), **options)
    except MemoryError as error:
        row["refused"] = str(error)
        return row
    start = time.perf_counter()
    opt.step()
    row["first_step_s"] = round(time.perf_counter() - start, 2)
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    row["state_bytes"] = state
    row["state_over_params"] = round(state / param_bytes, 3)
    row["peak_rss_gib"] = round(_status_bytes("VmHWM") / 2**30, 2)
    row["peak_over_start_gib"] = round((_status_bytes("VmHWM") - before) / 2**30, 2)
    return row


def estimates(model: str) -> list[dict]:
    """State bytes over parameter bytes of every method's defaults (as :func:`measure` makes them),
    from the core's ``init`` on meta-device parameters: no memory, no step. ``model``:
    ``"gpt2-small"`` or ``"reference-gpt"`` (``bench``'s reference GPT, :mod:`.models`)."""
    import torch

    import precond_ref.adapters.torch as pt
    from precond_ref.adapters._torch_memory import state_bytes

    from .models import SIZES, build_torch

    with torch.device("meta"):
        if model == "gpt2-small":
            named = [(n, torch.nn.Parameter(torch.empty(s, dtype=torch.float32))) for n, s in gpt2_small_shapes()]
        else:
            named = list(build_torch("gpt", SIZES["gpt"]["reference"], torch.float32, "meta").named_parameters())
    param_bytes = sum(p.numel() * p.element_size() for _, p in named)
    rows = []
    for method in METHODS[1:]:
        opt = getattr(pt, method)(named, lr=1e-3, **({"batch_size": 8} if method in _ROOT_FREE else {}))
        nbytes = sum(
            state_bytes(opt._transform(group), opt._tree(paths, [p.detach() for p in group["params"]]))
            for group, paths in zip(opt.param_groups, opt._group_paths())
        )
        rows.append({"model": model, "method": method, "parameters": sum(p.numel() for _, p in named),
                     "state_bytes": nbytes, "state_over_params": round(nbytes / param_bytes, 3)})
    return rows


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    if argv[:1] == ["--estimate"]:
        models = argv[1:] or ["gpt2-small", "reference-gpt"]
        unknown = [m for m in models if m not in ("gpt2-small", "reference-gpt")]
        if unknown:
            print(f"unknown model(s) {', '.join(unknown)}; --estimate takes gpt2-small, reference-gpt", file=sys.stderr)
            return 2
        for model in models:
            for row in estimates(model):
                print(json.dumps(row), flush=True)
        return 0
    if argv[:1] == ["--one"]:
        print(json.dumps(measure(argv[1])), flush=True)
        return 0
    unknown = [spec for spec in argv if _spec(spec)[0] not in METHODS]
    if unknown:
        print(f"unknown method(s) {', '.join(unknown)}; methods: {', '.join(METHODS)} (NAME or NAME:key=value,...), "
              "or --estimate [gpt2-small] [reference-gpt], or --help", file=sys.stderr)
        return 2
    for method in argv or METHODS:
        done = subprocess.run([sys.executable, "-m", "precond_ref.benchmarks.scale", "--one", method], capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        print(lines[-1] if lines else json.dumps({"method": method, "exit": done.returncode, "error": done.stderr[-400:]}),
              flush=True)
    return 0

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
