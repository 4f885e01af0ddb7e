"""Tables of the documentation that the code produces: the dtype of every state entry of every torch
class, which class replays its step as a captured CUDA graph, and which method's step CuPy's
captured wrapper captures.

Each table sits in its pages between ``<!-- NAME: begin ... -->`` and ``<!-- NAME: end -->``; the
tests render it from the code and require the pages to hold exactly that, so a change of the code
that changes a row fails here until the pages say it. ``python tests/test_docs_tables.py`` rewrites
the blocks in the pages.
"""

from __future__ import annotations

import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: torch class -> the method's name in the documentation.
CLASSES = {
    "AGD": "AGD", "ASGO": "ASGO", "DASGO": "DASGO", "Sketchy": "Sketchy", "SAdaGrad": "S-AdaGrad",
    "RFRMSProp": "RF-RMSProp", "RFAdamW": "RF-AdamW", "IFShampoo": "IF-Shampoo", "MBF": "MBF",
}
#: What each table's pages are.
PAGES = {
    "state-dtypes": ("README.md", "docs/adapters/torch.md"),
    "capture": ("docs/adapters/torch.md", "docs/performance.md"),
    "cupy-capture": ("docs/backends.md",),
}
#: The tables that ask the torch adapter.
TORCH_TABLES = ("state-dtypes", "capture")
#: Each method's factory (its transform's name) -> the method's name in the documentation.
FACTORIES = {
    "agd": "AGD", "asgo": "ASGO", "dasgo": "DASGO", "sketchy": "Sketchy", "s_adagrad": "S-AdaGrad",
    "rf_rmsprop": "RF-RMSProp", "rf_adamw": "RF-AdamW", "if_shampoo": "IF-Shampoo", "mbf": "MBF",
}
DTYPES = ("float32", "bfloat16", "float16", "float64")


def _entry(path: str) -> str:
    """A state entry's name without the indices of its stacks, blocks and leaves
    (``stacks/0/factor/1`` -> ``stacks/factor``)."""
    return "/".join(part for part in path.split("/") if not part.isdigit())


def _built(cls: type, model) -> object:
    """The class at its defaults on the model's parameters (and the model, where the class counts
    the batch size from its forward passes)."""
    import inspect

    takes_model = "model" in inspect.signature(cls).parameters
    return cls(model.named_parameters(), **({"model": model} if takes_model else {}))


def _state_dtypes(name: str, dtype: str) -> dict[str, str]:
    """Every state entry of the torch class ``name`` at its defaults after one step on a small MLP
    (two linear layers, weights and biases) of parameters of ``dtype``: entry -> its dtype's name."""
    import torch
    import precond_ref.adapters.torch as pt

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).to(getattr(torch, dtype))
    opt = _built(getattr(pt, name), model)
    model(torch.randn(8, 12, dtype=getattr(torch, dtype))).square().mean().backward()
    opt.step()
    found: dict[str, set[str]] = {}
    for state in opt.state_dict()["state"].values():
        for path, value in state.items():
            if torch.is_tensor(value):
                found.setdefault(_entry(path), set()).add(str(value.dtype).removeprefix("torch."))
    return {entry: " or ".join(sorted(dtypes)) for entry, dtypes in found.items()}  # an entry stored two ways says so


def state_dtype_table() -> str:
    """One row per way of storing (the dtypes for each kind of parameters), naming every method's
    entries stored that way (the counters, int32 throughout, last and by name alone); bfloat16 and
    float16 parameters share a column while they agree."""
    rows: dict[tuple, dict[str, list[str]]] = {}
    for name, label in CLASSES.items():
        found = {d: _state_dtypes(name, d) for d in DTYPES}
        for entry in found["float32"]:
            rows.setdefault(tuple(found[d][entry] for d in DTYPES), {}).setdefault(label, []).append(entry)
    columns, keep = list(DTYPES), list(range(len(DTYPES)))
    if all(stored[1] == stored[2] for stored in rows):
        columns, keep = ["float32", "bfloat16 / float16", "float64"], [0, 1, 3]
    lines = ["| state entries | " + " | ".join(f"{c} parameters" for c in columns) + " |", "|---|" + "---|" * len(columns)]
    for stored, methods in sorted(rows.items(), key=lambda row: set(row[0]) == {"int32"}):  # the counters last
        if set(stored) == {"int32"}:
            names = "every method's counters: " + ", ".join(f"`{e}`" for e in sorted({e for es in methods.values() for e in es}))
        else:
            names = "; ".join(f"{label}: " + ", ".join(f"`{e}`" for e in sorted(entries)) for label, entries in methods.items())
        lines.append(f"| {names} | " + " | ".join(stored[k] for k in keep) + " |")
    return "\n".join(lines)


def capture_table() -> str:
    """Whether each torch class replays its step as a captured CUDA graph (``capture=None``, the
    default), from the classes' own refusal (``not_capturable_because``), for float32 and float64
    parameters on a GPU. A class that answers per instance (ASGO: the root its ``root_method``
    picks; S-AdaGrad: the core its ``decomposition`` picks) is asked about an instance whose
    parameters the core sees as on an accelerator."""
    import importlib

    import torch
    import precond_ref.adapters.torch as pt

    # where ASGO's root_method="auto" and S-AdaGrad's decomposition="auto" ask on_cpu
    asking = [importlib.import_module(name) for name in ("precond_ref.linalg", "precond_ref.sketch")]

    def refusal(name: str, dtype: torch.dtype) -> str | None:
        cls = getattr(pt, name)
        if not isinstance(cls.__dict__.get("not_capturable_because", cls.not_capturable_because), property):
            return cls.not_capturable_because
        model = torch.nn.Linear(6, 4).to(dtype)
        opt = _built(cls, model)
        on_cpu = [module.on_cpu for module in asking]
        for module in asking:
            module.on_cpu = lambda xp, x: False  # as on CUDA: the choice the core makes for an accelerator
        try:
            return opt.not_capturable_because
        finally:
            for module, original in zip(asking, on_cpu):
                module.on_cpu = original

    lines = ["| torch class | float32 parameters | float64 parameters |", "|---|---|---|"]
    for name, label in CLASSES.items():
        cells = []
        for dtype in (torch.float32, torch.float64):
            why = refusal(name, dtype)
            cells.append("captured" if why is None else f"eager: {why}")
        lines.append(f"| {label} (`{name}`) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cupy_capture_table() -> str:
    """Whether CuPy's captured wrapper (``precond_ref.adapters.cupy.captured``) captures each method's
    step at its factory's defaults, from the wrapper's own refusal (``refusal``)."""
    import precond_ref
    from precond_ref.adapters.cupy import captured

    lines = ["| method | CuPy's captured wrapper |", "|---|---|"]
    for factory, label in FACTORIES.items():
        why = captured(getattr(precond_ref, factory)(), enabled=True).refusal
        lines.append(f"| {label} (`{factory}`) | " + ("captured" if why is None else f"eager: {why}") + " |")
    return "\n".join(lines)


TABLES = {"state-dtypes": state_dtype_table, "capture": capture_table, "cupy-capture": cupy_capture_table}


def _markers(name: str) -> tuple[str, str]:
    return (f"<!-- {name}: begin (generated by `python tests/test_docs_tables.py`; do not edit) -->",
            f"<!-- {name}: end -->")


def _block(name: str, table: str) -> str:
    begin, end = _markers(name)
    return f"{begin}\n\n{table}\n\n{end}"


def _shown(name: str, page: str) -> str:
    text = (ROOT / page).read_text()
    begin, end = _markers(name)
    assert begin in text and end in text, f"{page} has no {name} table ({begin} ... {end})"
    return text[text.index(begin): text.index(end) + len(end)]


@pytest.mark.parametrize("name", sorted(TABLES))
def test_pages_show_the_table_the_code_produces(name):
    """Each page's block is the table rendered from the code now: a claim about state dtypes or
    captured steps that the code does not make cannot stand in the documentation."""
    if name in TORCH_TABLES:
        pytest.importorskip("torch")
    expected = _block(name, TABLES[name]())
    for page in PAGES[name]:
        assert _shown(name, page) == expected, f"{page}: the {name} table is not the code's; it is\n{expected}"


def test_the_state_dtype_table_says_what_the_question_was():
    """The rows the question turned on: IF-Shampoo's factors are bf16 for float32 parameters, and
    AGD's state is float32 for bf16 parameters and float64 for float64 ones."""
    pytest.importorskip("torch")
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in state_dtype_table().splitlines()[2:]]
    factors = next(row for row in rows if "IF-Shampoo: `stacks/factor`" in row[0])
    assert factors[1] == "bfloat16" and factors[-1] == "float64"
    agd = next(row for row in rows if "AGD: `b`, `m`" in row[0])
    assert agd[1:] == ["float32"] * (len(agd) - 2) + ["float64"]


if __name__ == "__main__":
    for name, make in TABLES.items():
        block = _block(name, make())
        for page in PAGES[name]:
            text = (ROOT / page).read_text()
            begin, end = _markers(name)
            if begin not in text:
                print(f"{page}: no {name} markers; add them where the table goes", file=sys.stderr)
                continue
            (ROOT / page).write_text(text[: text.index(begin)] + block + text[text.index(end) + len(end):])
            print(f"{page}: {name} table written")
