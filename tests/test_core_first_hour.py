"""What a user meets in the first hour with the validation toolkit and the command line: the
trace command takes names as the other commands do, refuses what it cannot write with the reason,
the comparison report never calls trajectories of different lengths agreeing, and the commands
that rewrite committed results (``bench --readme``, ``reproduce --docs``) refuse a ``--quick``
smoke run."""

from __future__ import annotations

import json

import numpy as np
import pytest

import precond_ref.testing as prt
from precond_ref import cli


def test_trace_takes_method_and_problem_names_in_any_case(tmp_path, capsys):
    """compare, bench and reproduce take a method by its name or its table label in any case
    (tests/test_cli_first_hour.py); trace does too, and a problem with - for _: the file is the
    one ``trace rf_rmsprop --problem least_squares`` writes."""
    out = tmp_path / "t.npz"
    assert cli.main(["trace", "RF-RMSProp", "--problem", "Least-Squares", "--steps", "1", "--out", str(out)]) == 0
    assert "rf_rmsprop on least_squares" in capsys.readouterr().out
    loaded = prt.load_trajectory(str(out))
    assert (loaded.method, loaded.problem, loaded.steps) == ("rf_rmsprop", "least_squares", 1)


def test_trace_out_below_a_file_names_the_file(tmp_path, capsys):
    """``--out FILE/x.npz`` where FILE is a regular file: exit 2 with one line saying FILE is a
    file (it said the directory does not exist, which the user can see it does)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for out in (blocker / "x.npz", blocker / "sub" / "x.npz"):
        assert cli.main(["trace", "agd", "--steps", "1", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"{blocker} is a file, not a directory" in err and len(err.strip().splitlines()) == 1
    assert cli.main(["trace", "agd", "--steps", "1", "--out", str(tmp_path / "none" / "x.npz")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.fixture(scope="module")
def short():
    return prt.reference_trajectory("agd", "quadratic", steps=2)


def test_report_of_different_lengths_does_not_say_they_agree(short):
    """compare_trajectories is not ok when the lengths differ (docs/validating.md): the first line
    of the report, the AssertionError's message, must not read as agreement on its own."""
    longer = prt.reference_trajectory("agd", "quadratic", steps=3)
    comparison = prt.compare_trajectories(short, longer)
    assert not comparison.ok
    first = str(comparison).splitlines()[0]
    assert first.startswith("trajectories agree on the 3 parameter sets both have")
    with pytest.raises(AssertionError, match="lengths differ: reference has 3 parameter sets, candidate 4"):
        prt.assert_trajectories_close(short, longer)
    assert str(prt.compare_trajectories(short, short)).startswith("trajectories agree on 3 parameter sets (")


@pytest.mark.parametrize("tolerance", [{"rtol": -1e-3}, {"atol": -1.0}, {"rtol": float("nan")}])
def test_negative_or_nan_tolerance_is_refused(short, tolerance):
    """The allclose rule |c - r| <= atol + rtol |r| with a negative or NaN tolerance flags
    identical trajectories: a ValueError naming the argument, not a report of divergence."""
    name = next(iter(tolerance))
    with pytest.raises(ValueError, match=f"{name} must be a number >= 0"):
        prt.compare_trajectories(short, short, **tolerance)


def test_leaf_of_an_unknown_path_lists_the_paths(short):
    """Trajectory.leaf takes the '/'-joined path; another spelling names the paths there are
    (it raised list.index's "'linear.bias' is not in list")."""
    assert short.leaf("linear/bias").shape == (3, 3)
    with pytest.raises(ValueError, match=r"no parameter 'linear\.bias' in this trajectory; its parameters: linear/bias, linear/weight"):
        short.leaf("linear.bias")


def test_bench_readme_refuses_a_quick_run(tmp_path, monkeypatch, capsys):
    """``bench --readme`` stores the run in records/bench.json and the README's performance
    block; a ``--quick`` run's timings are a smoke test's (QUICK_NOTE), so the two together are a
    usage error before anything is measured or written, and ``--readme-from`` refuses a report a
    quick run wrote."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "README.md").write_text("readme\n")
    argv = ["bench", "--quick", "--readme", "--methods", "agd", "--frameworks", "numpy", "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "--readme" in err and "run without --quick" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "records").exists()
    report = {"argv": ["--quick"], "complete": True, "machine": {}, "results": {},
              "settings": {"kind": "layers", "quick": True}}
    for name, data in (("flag.json", report), ("argv.json", {**report, "settings": {"kind": "layers"}})):
        (tmp_path / name).write_text(json.dumps(data))
        assert cli.main(["bench", "--readme-from", name]) == 2
        assert f"--readme-from {name!r}: a bench --quick run" in capsys.readouterr().err
    assert (tmp_path / "README.md").read_text() == "readme\n" and not (tmp_path / "records").exists()


def test_reproduce_docs_refuses_a_quick_run(tmp_path, monkeypatch, capsys):
    """``reproduce --docs`` rewrites docs/reproduce.md and records/reproduce.json; a ``--quick``
    run's verdicts mean nothing (its first printed line says so), so ``--quick --docs`` and
    ``--merge`` of quick runs with ``--docs`` are usage errors that write nothing."""
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs").mkdir()
    assert cli.main(["reproduce", "--quick", "--docs", "--out", "out"]) == 2
    assert "a --quick run's verdicts mean nothing" in capsys.readouterr().err
    shard = {"command_line": "python -m precond_ref reproduce --quick", "settings": {"size": "quick"}, "versions": {},
             "machine": {}, "wall_s": 1.0, "cpu_s": 1.0, "papers": {}, "fingerprints": []}
    (tmp_path / "shard").mkdir()
    (tmp_path / "shard" / "reproduce.json").write_text(json.dumps(shard))
    assert cli.main(["reproduce", "--merge", "shard", "--docs", "--out", "out"]) == 2
    assert "a --quick run's verdicts mean nothing" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and list((tmp_path / "docs").iterdir()) == []
    assert not (tmp_path / "records").exists()


@pytest.mark.parametrize("oracle", ["LoopAGD", "LoopASGO", "LoopDASGO", "LoopSketchy", "LoopSAdaGrad", "LoopRFRMSProp",
                                    "LoopRFAdamW", "LoopIFShampoo", "LoopMBF"])
def test_loop_oracle_refuses_a_misspelt_mode(oracle):
    """The oracles take the factories' ``mode`` (docs/validating.md, the loop oracles); a value
    other than "principled" or "faithful" is the factory's ValueError: it ran the principled rule,
    so a check of a faithful transcription against ``mode="Faithful"`` compared the wrong rule."""
    from precond_ref.testing import loops

    params = {"w": np.ones((3, 4))}
    with pytest.raises(ValueError, match="mode must be one of 'principled', 'faithful', got 'Faithful'"):
        getattr(loops, oracle)(params, mode="Faithful")
    getattr(loops, oracle)(params, mode="faithful")
