"""``precond_ref.benchmarks.operations``: the operations a torch optimizer step issues as a GPU would
get them (bench's ``ops / step`` column), checked against counts made by hand; the column in a
bench run: tests/test_benchmarks.py."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from precond_ref import _backend, blocking  # noqa: E402
from precond_ref.benchmarks import operations, report  # noqa: E402


def _two_tensors():
    params = [torch.nn.Parameter(torch.ones(3, 2, dtype=torch.float32)), torch.nn.Parameter(torch.ones(4, dtype=torch.float32))]
    for p in params:
        p.grad = torch.full_like(p, 0.5)
    return params


class _HandCounted(torch.optim.Optimizer):
    """Per tensor: one view (no kernel), one ``add_`` (a kernel); then one ``_foreach_mul_`` over all
    the gradients (one kernel for the list) and one empty buffer (an allocation, no kernel)."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.1})

    @torch.no_grad()
    def step(self):
        params = [p for group in self.param_groups for p in group["params"]]
        for p in params:
            p.view(-1).add_(p.grad.view(-1), alpha=-0.1)
        torch._foreach_mul_([p.grad for p in params], 0.5)
        torch.empty(8, dtype=torch.float32)


def test_a_step_counts_the_kernels_it_launches_as_counted_by_hand():
    """Two tensors: 2 ``add_`` + 1 ``_foreach_mul_`` = 3 operations; the 4 views, the allocation and
    the record_function pair ``torch.optim`` wraps a step in launch nothing (NOT_LAUNCHED). torch's
    own SGD without momentum (θ ← θ − lr g): one ``add_`` per tensor in a loop, one
    ``_foreach_add_`` for the list with ``foreach=True``."""
    params = _two_tensors()
    counted = operations.count_step(_HandCounted(params).step)
    assert counted["operations"] == 3, counted
    assert counted["by_name"]["add_"] == 2 and counted["by_name"]["_foreach_mul_"] == 1 and counted["by_name"]["view"] == 4
    assert counted["by_name"]["empty"] == 1 and counted["not_launched"] >= 4 + 1  # and the annotation's operations
    assert counted["compiled_calls"] == 0 and counted["graph_replays"] == 0
    for foreach, expected in ((False, 2), (True, 1)):
        sgd = torch.optim.SGD(_two_tensors(), lr=0.1, foreach=foreach)
        assert operations.count_step(sgd.step)["operations"] == expected, foreach


def test_bench_counts_each_step_of_a_period_within_the_budget():
    """``count_after`` counts each step of the period on its own (gradients set outside the
    count) and summarises them; a budget spent after the first step stops it there, and says so."""
    params = _two_tensors()
    optimizer, seen = _HandCounted(params), []
    full = operations.count_after(optimizer, seen.append, {}, "cpu", first=5, steps=3)
    assert seen == [5, 6, 7] and full["steps"] == [3, 3, 3] and full["mean"] == 3 and full["covers_period"]
    assert full["fewest"] == full["most"] == 3 and full["by_name"] == {"_foreach_mul_": 1, "add_": 2} and full["grouping"] == "gpu"
    cut = operations.count_after(optimizer, seen.append, {}, "cpu", first=8, steps=3, budget_s=0.0)
    assert cut["steps"] == [3] and cut["counted"] == 1 and not cut["covers_period"]
    assert report.operations_cell({"operations": cut}) == "3, 1 < period 3"


def test_a_compiled_function_runs_compiled_while_counted():
    """The counting mode is an observer that ``torch.compile`` accepts: a ``fullgraph`` function
    (dynamo's eager backend: its graph's two operations reach the dispatcher) runs as compiled
    under it, and is counted; a mode dynamo refuses makes such a function raise instead. Through
    TorchInductor the same two element-wise operations become one generated kernel, which the
    dispatcher never sees: the graph's call counts one."""
    x, y = torch.ones(4, dtype=torch.float32), torch.ones(4, dtype=torch.float32)
    compiled = torch.compile(lambda a, b: a.mul_(2.0).add_(b), backend="eager", fullgraph=True)
    compiled(x, y)
    counted = operations.count_step(lambda: compiled(x, y))
    assert counted["operations"] == 2 and counted["by_name"] == {"add_": 1, "mul_": 1}
    assert torch.equal(x, torch.full((4,), 7.0))
    inductor = torch.compile(lambda a, b: a.mul_(2.0).add_(b), fullgraph=True)
    inductor(x, y)
    counted = operations.count_step(lambda: inductor(x, y))
    assert counted["operations"] == 1 and counted["compiled_calls"] == 1 and counted["by_name"] == {}, counted
    assert torch.equal(x, torch.full((4,), 31.0))


def test_gpu_grouping_reads_nothing_on_the_host_and_restores_the_cpu_rules():
    """Inside ``gpu_grouping`` the core reads no device value (``host_bool`` and
    ``host_all_finite`` answer None in the modules that imported them, so no
    ``_local_scalar_dense``, the read behind ``bool()``), and stacks every equal block; outside,
    the CPU's rules are back."""
    import precond_ref

    def agd_step_names(grouping):
        params = {"w": torch.ones(4, 3, dtype=torch.float32), "b": torch.ones(4, dtype=torch.float32)}
        grads = {k: torch.full_like(v, 0.25) for k, v in params.items()}
        transform = precond_ref.agd(learning_rate=0.1)
        state = transform.init(params)
        with grouping():
            transform.update(grads, state, params)
            return operations.count_step(lambda: transform.update(grads, state, params))["by_name"]

    assert "_local_scalar_dense" in agd_step_names(contextlib.nullcontext)
    assert "_local_scalar_dense" not in agd_step_names(operations.gpu_grouping)
    threshold, reads = blocking.CPU_BATCHED_ENOUGH, (_backend.host_bool, _backend.host_all_finite)
    with operations.gpu_grouping():
        assert blocking.CPU_BATCHED_ENOUGH > 2**60
        assert _backend.host_bool(None, torch.ones(())) is None
    assert blocking.CPU_BATCHED_ENOUGH == threshold and (_backend.host_bool, _backend.host_all_finite) == reads


def test_readme_and_detail_tables_show_the_count_where_the_report_has_it():
    """The README block gains one ``ops / step`` column per machine whose report counted, and no
    line (the README's sections stay a screen long); docs/performance.md's model table gains the
    column and its legend; a report without counts renders as before."""
    stored = json.loads((Path(__file__).parents[1] / "records" / "bench.json").read_text())
    reports = {key: stored[key] for key in ("gpt", "gpt on a GPU") if key in stored}
    assert reports, "records/bench.json holds a GPT report"
    for stored_report in reports.values():  # the stored reports as if none had counted
        for rows in stored_report["results"].values():
            for row in rows:
                row.pop("operations", None)
    before = report.readme_section(reports)
    counted = json.loads(json.dumps(reports))
    first = next(iter(counted))
    rows = counted[first]["results"]["gpt"]
    for row in rows:
        if "error" not in row and "skipped" not in row:
            row["operations"] = {"mean": 137.0, "fewest": 98, "most": 216, "compiled_calls": 0.0}
    rows.append({"framework": "torch", "method": "x", "variant": None, "label": "Failed", "error": "ValueError: no"})
    after = report.readme_section(counted)
    assert len(after.splitlines()) == len(before.splitlines()) + 1  # the failed row
    assert "| Failed | error | error | error |" in after
    header = after.splitlines()[2]
    assert header.count("ops / step") == 1 and header.count("|") == before.splitlines()[2].count("|") + 1
    assert "| 137 (98-216) |" in after and "kernel launches" in after
    detail = report.detail_section(counted)
    assert "torch ops / step" in detail and "ops / step: the operations one optimizer step issues" in detail
    assert "ops / step" not in before and "ops / step" not in report.detail_section(reports)
    row = {"framework": "torch", "label": "X", "times_ms": [1.0], "operations": {"mean": 2.0, "steps": [2], "by_name": {"mul": 2}}}
    assert report.compact({"results": {"gpt": [row]}})["results"]["gpt"] == [{"framework": "torch", "label": "X", "operations": {"mean": 2.0}}]


def test_the_command_line_prints_a_count_per_method_and_refuses_unknown_names(capsys):
    """``python -m precond_ref.benchmarks.operations`` (records/rules-engine/ops.py): one
    ``method count`` line per name; an unknown grouping or method is a usage error naming it."""
    assert operations.main(["gpu", "adamw_fused"]) == 0
    name, count = capsys.readouterr().out.split()
    assert name == "adamw_fused" and float(count) >= 1
    assert operations.main(["tpu"]) == 2 and "'tpu'" in capsys.readouterr().err
    assert operations.main(["cpu", "agd,nope"]) == 2 and "nope" in capsys.readouterr().err
