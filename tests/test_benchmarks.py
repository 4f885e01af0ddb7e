"""``python -m precond_ref bench``: small layer cases only; the numbers are checked, not the speed."""

from __future__ import annotations

import json
import types

import pytest

pytest.importorskip("torch")

from precond_ref import benchmarks, cli
from precond_ref.method_table import MethodEntry, entry_by_name


def test_quick_bench_writes_ratios_to_both_baselines(tmp_path, capsys):
    pytest.importorskip("optax")
    argv = ["bench", "--quick", "--methods", "agd", "--frameworks", "torch,jax,numpy", "--cases", "24x16",
            "--out", str(tmp_path), "--no-progress"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "torch.optim.Adam(foreach=True)" in printed and "optax.adam (jit)" in printed and "| 24x16 | jax | AGD |" in printed
    report = json.loads((tmp_path / "bench.json").read_text())
    rows = report["results"]["24x16"]
    by = {(r["framework"], r["method"]): r for r in rows}
    assert set(by) == {(f, m) for f in ("torch", "jax", "numpy") for m in ("baseline", "agd")}
    for framework in ("torch", "jax", "numpy"):
        row = by[framework, "agd"]
        baseline = by[framework if framework != "numpy" else "numpy", "baseline"]
        assert row["time_ratio"] == pytest.approx(row["median_ms"] / baseline["median_ms"])
        assert row["repeats"] == 3 and len(row["times_ms"]) == 3
        # AGD keeps two moments per parameter, as Adam does: the same state up to step counters.
        assert row["state_ratio"] == pytest.approx(1.0, abs=0.02)
    assert by["jax", "agd"]["first_call_s"] > 0
    assert report["settings"]["hyperparameters"]["agd"] == entry_by_name("agd").bench_kwargs()


def test_default_cases_include_the_issue_shapes():
    assert benchmarks.CASES["1024x1024"] == (1024, 1024)
    assert benchmarks.CASES["4096x1024"] == (4096, 1024)
    assert benchmarks.CASES["conv64-64-3x3"] == (64, 64, 3, 3)


def test_timing_uses_the_median_and_respects_the_budget(monkeypatch):
    """With a fake clock: the first step is warm-up, the median of the timed steps is reported, and a
    slow first step cuts the number of steps to fit the budget."""
    clock = {"now": 0.0}
    monkeypatch.setattr(benchmarks, "time", types.SimpleNamespace(perf_counter=lambda: clock["now"]))

    def stepper(durations):
        def step(i):
            clock["now"] += durations[i]

        return step

    result = benchmarks._timed(stepper([0.5, 0.5, 0.030, 0.001, 0.002]), lambda: None, warmup=2, repeats=3)
    assert result["repeats"] == 3 and result["times_ms"] == pytest.approx([30.0, 1.0, 2.0])
    assert result["median_ms"] == pytest.approx(2.0) and result["mean_ms"] == pytest.approx(11.0)
    assert result["first_step_ms"] == pytest.approx(500.0)

    monkeypatch.setattr(benchmarks, "_BUDGET_S", 1.0)
    slow = benchmarks._timed(stepper([0.4] * 10), lambda: None, warmup=2, repeats=7)
    assert slow["repeats"] == 1 and len(slow["times_ms"]) == 1


def test_entries_over_their_size_limit_are_skipped():
    entry = MethodEntry(
        name="agd", factory="agd", label="AGD", hyperparameters={"*": {"learning_rate": 1e-3}}, reference="-", bench_max_size=100
    )
    rows = benchmarks.bench_case([entry], (16, 8), ["numpy"], warmup=1, repeats=1)
    assert rows[0]["method"] == "baseline"
    assert "bench_max_size 100" in rows[1]["skipped"]


def test_authors_package_side_by_side_or_skipped():
    rows, skipped = benchmarks._authors_rows((16, 8), "float32", 1, 2, "cpu")
    try:
        import sirfshampoo  # noqa: F401
    except ImportError:
        assert rows == [] and "sirfshampoo" in skipped[0]
    else:
        assert rows[0]["label"] == "SIRFShampoo (authors)" and rows[0]["median_ms"] > 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--frameworks", "tensorflow"], "unknown framework(s) 'tensorflow'"),
        (["--cases", "12by4"], "unknown layer case '12by4'"),
        (["--methods", "nope"], "unknown method(s) 'nope'"),
        (["--methods", "adam"], "no method to benchmark"),
    ],
)
def test_bench_user_errors(argv, message, tmp_path, capsys):
    assert cli.main(["bench", "--quick", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bench_unwritable_output_and_bad_flags(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli.main(["bench", "--quick", "--methods", "agd", "--out", str(blocker / "x")]) == 2
    assert "cannot write to output directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "--repeats", "0"])
    assert info.value.code == 2
