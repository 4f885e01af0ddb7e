"""Reference trajectories, the method registry, user-optimizer runners and trace files."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest

import precond_ref as pr
import precond_ref.testing as prt
from precond_ref.cli import main
from precond_ref.tree import tree_flatten


def test_registry_finds_the_factories_of_precond_ref():
    methods = prt.available_methods()
    assert "agd" in methods
    assert all(callable(getattr(pr, m)) and "learning_rate" in inspect.signature(getattr(pr, m)).parameters for m in methods)


def test_reference_trajectory_is_the_core_run():
    problem = prt.get_problem("least_squares")
    traj = prt.reference_trajectory("agd", problem, 6, {"learning_rate": 0.05, "b1": 0.5})
    assert traj.steps == 6 and len(traj.losses) == 7 and len(traj.grads) == 6
    assert traj.config["b1"] == 0.5 and traj.config["b2"] == 0.999 and traj.config["mode"] == "principled"
    assert traj.version == pr.__version__
    # replay by hand
    opt = pr.agd(learning_rate=0.05, b1=0.5)
    params = problem.init_params()
    state = opt.init(params)
    for t in range(6):
        updates, state = opt.update(problem.grad(params, t), state, params)
        params = pr.apply_updates(params, updates)
    for a, b in zip(tree_flatten(params)[0], tree_flatten(traj.params[-1])[0]):
        np.testing.assert_array_equal(a, b)
    assert traj.losses[-1] < traj.losses[0]


@pytest.mark.parametrize("name", prt.available_problems())
def test_every_backend_reproduces_the_numpy_reference(name, backend):
    ref = prt.reference_trajectory("agd", name, 3)
    traj = prt.reference_trajectory("agd", name, 3, xp=backend.xp)
    assert traj.backend == backend.name
    prt.assert_trajectories_close(ref, traj, rtol=1e-9, atol=1e-12)


def test_unknown_method_and_key_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown method 'adam'; available methods: .*agd"):
        prt.reference_trajectory("adam", "quadratic", 1)
    with pytest.raises(ValueError, match=r"unknown configuration key 'lr' for method 'agd'; valid keys: learning_rate, b1"):
        prt.reference_trajectory("agd", "quadratic", 1, {"lr": 1.0})
    with pytest.raises(ValueError, match="b1 must be in"):
        prt.reference_trajectory("agd", "quadratic", 1, {"b1": 1.5})
    with pytest.raises(ValueError, match="unknown backend 'tensorflow'"):
        prt.reference_trajectory("agd", "quadratic", 1, xp="tensorflow")


def test_new_methods_need_no_registration(monkeypatch):
    """A factory exported by precond_ref is found by name; a required learning rate and a
    ``batch_size`` argument are filled in from the problem and recorded in the exact config."""
    seen = {}

    def toy(learning_rate, batch_size=None, scale=1.0):
        seen.update(batch_size=batch_size, learning_rate=learning_rate)
        inner = pr.agd(learning_rate=learning_rate)
        return inner

    monkeypatch.setattr(pr, "toy", toy, raising=False)
    monkeypatch.setattr(pr, "__all__", [*pr.__all__, "toy"])
    assert "toy" in prt.available_methods()
    traj = prt.reference_trajectory("toy", "mlp", 2)
    assert seen == {"batch_size": 64, "learning_rate": prt.MLP.default_learning_rate}
    assert traj.config == {"learning_rate": 0.01, "batch_size": 64, "scale": 1.0}


def test_torch_optimizer_runner_matches_the_adapter_and_reference():
    pt = pytest.importorskip("precond_ref.adapters.torch")
    ref = prt.reference_trajectory("agd", "mlp", 5, {"learning_rate": 1e-2, "weight_decay": 1e-3})
    traj = prt.torch_trajectory(lambda p: pt.AGD(p, lr=1e-2, weight_decay=1e-3), "mlp", 5, named=True)
    assert traj.backend == "torch" and traj.steps == 5
    comparison = prt.assert_trajectories_close(ref, traj)
    assert comparison.max_rel_error[-1] < 1e-12
    np.testing.assert_allclose(traj.losses, ref.losses, rtol=1e-12)


def test_torch_runner_records_the_dtype_name_for_a_torch_dtype(tmp_path):
    """A trajectory records its dtype's name whatever form the dtype was given in, so that a torch
    dtype gets float64 tolerances (a candidate 1e-6 off fails) and the trajectory saves and loads."""
    torch = pytest.importorskip("torch")
    pt = pytest.importorskip("precond_ref.adapters.torch")
    ref = prt.reference_trajectory("agd", "mlp", 3, {"learning_rate": 1e-2})
    off = prt.torch_trajectory(lambda p: pt.AGD(p, lr=1e-2 * (1 + 1e-6)), "mlp", 3, dtype=torch.float64)
    assert off.dtype == "float64"
    comparison = prt.compare_trajectories(ref, off)
    assert comparison.rtol == 1e-10 and not comparison.ok
    prt.save_trajectory(off, str(tmp_path / "t.npz"))
    loaded = prt.load_trajectory(str(tmp_path / "t.npz"))
    assert loaded.dtype == "float64"
    prt.assert_trajectories_close(off, loaded, rtol=0, atol=0)
    # Made by hand with a dtype object, a trajectory keeps the name as well.
    assert prt.Trajectory("m", "mlp", {}, ref.params, ref.losses, ref.grads, np.dtype("float32"), "numpy").dtype == "float32"


def test_optax_runner_matches_the_reference():
    pj = pytest.importorskip("precond_ref.adapters.jax")
    ref = prt.reference_trajectory("agd", "cnn", 4, {"learning_rate": 1e-2})
    traj = prt.transform_trajectory(pj.agd(learning_rate=1e-2), "cnn", 4, xp="jax")
    prt.assert_trajectories_close(ref, traj, rtol=1e-9)


def test_float32_reference_is_float32(backend):
    traj = prt.reference_trajectory("agd", "logistic", 2, dtype="float32", xp=backend.xp)
    assert traj.dtype == "float32"
    assert all(leaf.dtype == backend.xp.float32 for leaf in tree_flatten(traj.params[-1])[0])


def test_save_and_load_round_trip(tmp_path):
    traj = prt.reference_trajectory("agd", "online", 7, {"mode": "faithful"})
    path = tmp_path / "t.npz"
    prt.save_trajectory(traj, str(path))
    loaded = prt.load_trajectory(str(path))
    assert loaded.config == traj.config and loaded.steps == 7 and loaded.problem == "online"
    prt.assert_trajectories_close(traj, loaded, rtol=0, atol=0)
    assert loaded.losses == traj.losses
    with np.load(path) as archive:
        meta = json.loads(str(archive["meta"]))
        assert meta["format"] == prt.TRACE_FORMAT and meta["format_version"] == prt.TRACE_FORMAT_VERSION
        assert archive["params/w"].shape == (8, 8) and archive["grads/w"].shape == (7, 8)
        np.testing.assert_array_equal(archive["init/w"], archive["params/w"][0])
        np.testing.assert_array_equal(archive["data/X"], prt.get_problem("online").data()["X"])


def test_trace_command_writes_the_documented_file(tmp_path, capsys):
    out = tmp_path / "agd.npz"
    status = main(
        ["trace", "agd", "--problem", "mlp", "--steps", "4", "--out", str(out), "--config", "b1=0.8",
         "--config", '{"mode": "faithful", "clip": 5}', "--dtype", "float32", "--seed", "3"]
    )
    assert status == 0 and "wrote" in capsys.readouterr().out
    with np.load(out) as archive:
        meta = json.loads(str(archive["meta"]))
        assert meta["config"]["b1"] == 0.8 and meta["config"]["mode"] == "faithful" and meta["config"]["clip"] == 5
        assert meta["config"]["b2"] == 0.999 and meta["version"] == pr.__version__
        assert meta["problem_options"] == {"seed": 3} and meta["dtype"] == "float32"
        assert archive["params/fc1/weight"].shape == (5, 16, 4) and archive["params/fc1/weight"].dtype == np.float32
        assert archive["loss"].shape == (5,)
        assert sorted(meta["data_keys"]) == ["X", "Y"]
    ref = prt.reference_trajectory("agd", prt.get_problem("mlp", seed=3), 4, {"b1": 0.8, "mode": "faithful", "clip": 5}, dtype="float32")
    prt.assert_trajectories_close(ref, prt.load_trajectory(str(out)), rtol=0, atol=0)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["trace", "adamw", "--out", "X"], "unknown method 'adamw'; available methods: "),
        (["trace", "agd", "--problem", "resnet", "--out", "X"], "unknown problem 'resnet'; available problems: quadratic"),
        (["trace", "agd", "--config", "beta1=0.9", "--out", "X"], "unknown configuration key 'beta1' for method 'agd'; valid keys: learning_rate"),
        (["trace", "agd", "--config", "b1", "--out", "X"], "must be KEY=VALUE"),
        (["trace", "agd", "--config", "{bad", "--out", "X"], "not valid JSON"),
        (["trace", "agd", "--config", "delta=0", "--out", "X"], "delta must be"),
        (["trace", "--out", "X"], "a METHOD is required"),
        (["trace", "agd", "--out", "/nonexistent/dir/x.npz"], "does not exist"),
        (["trace", "nope"], "unknown method 'nope'; available methods: "),
    ],
)
def test_trace_command_bad_input(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("steps", ["0", "-1", "x"])
def test_trace_command_needs_at_least_one_step(steps, capsys):
    with pytest.raises(SystemExit) as info:
        main(["trace", "agd", "--steps", steps, "--out", "x.npz"])
    assert info.value.code == 2 and "expected a positive integer" in capsys.readouterr().err


def test_trace_format_page_states_the_out_default(tmp_path, capsys, monkeypatch):
    """docs/trace-format.md states ``--out`` as the command has it: optional, defaulting to
    METHOD-PROBLEM.npz in the current directory, which a run without it writes."""
    import argparse
    import pathlib

    from precond_ref.testing import trace

    parser = argparse.ArgumentParser()
    trace.add_arguments(parser)
    out = next(action for action in parser._actions if "--out" in action.option_strings)
    page = (pathlib.Path(__file__).parents[2] / "docs" / "trace-format.md").read_text()
    options = page.split("Options: ", 1)[1].split("\n\n", 1)[0]
    stated = options.split("`--out` (", 1)[1].split(")", 1)[0]
    assert not out.required and "required" not in stated
    assert "default `METHOD-PROBLEM.npz` in the current directory" in stated
    monkeypatch.chdir(tmp_path)
    assert main(["trace", "agd", "--problem", "online", "--steps", "1"]) == 0
    assert (tmp_path / "agd-online.npz").is_file() and "agd-online.npz" in capsys.readouterr().out


def test_trace_list(capsys):
    assert main(["trace", "--list"]) == 0
    out = capsys.readouterr().out
    assert "methods: " in out and "agd" in out and "problems: quadratic, least_squares, logistic, online, mlp, cnn" in out


@pytest.mark.parametrize("name", ["mbf", "agd", "sketchy"])
def test_reference_runs_at_the_problems_learning_rate(name):
    """A reference trajectory without a learning rate runs at the problem's (chosen for the problem),
    not at the factory's default, whether or not the factory has one (every factory now does)."""
    problem = prt.get_problem("least_squares")
    trajectory = prt.reference_trajectory(name, problem, steps=1)
    assert trajectory.config["learning_rate"] == problem.default_learning_rate
    assert inspect.signature(getattr(pr, name)).parameters["learning_rate"].default != problem.default_learning_rate
