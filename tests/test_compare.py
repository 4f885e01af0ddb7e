"""``python -m precond_ref compare``: the hand-written models, determinism, backends and the CLI.

Small settings only (a few hundred examples, one or two epochs): the whole file runs in well under
a minute on two cores.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

pytest.importorskip("sklearn")

import precond_ref
from precond_ref import cli, compare, method_table
from precond_ref.compare import digits
from precond_ref.method_table import METHODS, MethodEntry, entry_by_name


@pytest.fixture(scope="module")
def data():
    x_train, y_train, x_test, y_test = digits.load_digits_split()
    return x_train[:320], y_train[:320], x_test[:120], y_test[:120]


def _available() -> list[MethodEntry]:
    return [e for e in METHODS if e.factory is None or hasattr(precond_ref, e.factory)]


# ------------------------------------------------------------------------------------------
# The models' hand-written backward


@pytest.mark.parametrize("model", digits.MODELS)
def test_gradients_match_finite_differences(model, data):
    """Every gradient entry checked by central differences in float64 (5 random coordinates per leaf)."""
    x, y = data[0][:8], data[1][:8]
    params = digits.init_params(model, 3)
    _, grads = digits.loss_and_grads(np, model, params, x, y)
    rng = np.random.default_rng(0)
    h = 1e-6
    for layer, leaves in params.items():
        for name, leaf in leaves.items():
            for _ in range(5):
                index = tuple(int(rng.integers(n)) for n in leaf.shape)
                original = leaf[index]
                leaf[index] = original + h
                plus, _ = digits.loss_and_grads(np, model, params, x, y)
                leaf[index] = original - h
                minus, _ = digits.loss_and_grads(np, model, params, x, y)
                leaf[index] = original
                numeric = (plus - minus) / (2 * h)
                assert grads[layer][name][index] == pytest.approx(numeric, rel=1e-5, abs=1e-8), (layer, name, index)


@pytest.mark.parametrize("model", digits.MODELS)
def test_gradients_match_torch_and_jax_autodiff(model, data):
    """The NumPy backward equals torch autograd and jax.grad of the same functions (float64)."""
    torch = pytest.importorskip("torch")
    x, y = data[0][:16], data[1][:16]
    params = digits.init_params(model, 1)
    loss, grads = digits.loss_and_grads(np, model, params, x, y)

    named = {f"{k}.{kk}": torch.tensor(v, requires_grad=True) for k, layer in params.items() for kk, v in layer.items()}
    torch_loss = digits.torch_loss(model, named, torch.tensor(x), torch.tensor(y))
    torch_loss.backward()
    assert float(loss) == pytest.approx(torch_loss.item(), rel=1e-12)
    for k, layer in grads.items():
        for kk, g in layer.items():
            np.testing.assert_allclose(g, named[f"{k}.{kk}"].grad.numpy(), rtol=1e-10, atol=1e-14)

    jax = pytest.importorskip("jax")  # x64 is enabled by conftest
    jax_params = jax.tree_util.tree_map(jax.numpy.asarray, params)
    assert jax_params["fc2" if model == "mlp" else "fc"]["weight"].dtype == jax.numpy.float64
    value_and_grad = jax.jit(jax.value_and_grad(lambda p, a, b: digits.jax_loss(model, p, a, b)))
    value, jax_grads = value_and_grad(jax_params, jax.numpy.asarray(x), jax.numpy.asarray(y))
    assert float(value) == pytest.approx(float(loss), rel=1e-12)
    for k, layer in grads.items():
        for kk, g in layer.items():
            np.testing.assert_allclose(g, np.asarray(jax_grads[k][kk]), rtol=1e-10, atol=1e-14)


def test_init_is_seeded_and_out_first():
    a, b, c = digits.init_params("cnn", 0), digits.init_params("cnn", 0), digits.init_params("cnn", 1)
    assert a["conv2"]["weight"].shape == (16, 8, 3, 3) and a["fc"]["weight"].shape == (10, 64)
    assert all(np.array_equal(a[k][kk], b[k][kk]) for k in a for kk in a[k])
    assert not np.array_equal(a["fc"]["weight"], c["fc"]["weight"])


# ------------------------------------------------------------------------------------------
# Training


def test_fixed_seed_reproduces_every_number(data):
    """Two runs with the same seed give identical losses and accuracies; another seed does not."""
    entry = entry_by_name("agd")

    def numbers(seed):
        r = compare.train_one(entry, "cnn", data, epochs=1, batch_size=32, seed=seed)
        return r["step_loss"], r["final_train_loss"], r["test_accuracy"], r["epoch_train_loss"]

    first, second, other = numbers(5), numbers(5), numbers(6)
    assert first == second
    assert first[0] != other[0]


@pytest.mark.parametrize("entry", _available(), ids=lambda e: e.name)
def test_every_available_method_trains_the_mlp(entry, data):
    """Each method (paper hyperparameters) lowers the training loss below the first batch's within 30 steps.

    (IF-Shampoo at its default lr 1e-3 is the slowest: about 2.27 -> 2.24.)
    """
    r = compare.train_one(entry, "mlp", data, epochs=3, batch_size=32, seed=0)
    assert r["steps"] == 3 * (320 // 32)
    assert r["final_train_loss"] is not None and r["final_train_loss"] < r["step_loss"][0] - 0.02
    assert r["state_bytes"] > 0 and r["step_ms"] > 0
    assert r["hyperparameters"] == entry.kwargs_for("mlp")


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_adapters_backends_match_numpy(backend, data):
    """The same run through the torch / optax adapters follows the NumPy core run (float32)."""
    pytest.importorskip(backend)
    for name in ("agd", "adam"):
        entry = entry_by_name(name)
        ref = compare.train_one(entry, "mlp", data, epochs=1, batch_size=32, seed=2)
        got = compare.train_one(entry, "mlp", data, epochs=1, batch_size=32, seed=2, backend=backend)
        np.testing.assert_allclose(got["step_loss"], ref["step_loss"], rtol=2e-4)
        assert got["notes"] == []
        assert got["state_bytes"] == pytest.approx(ref["state_bytes"], rel=0.01, abs=64)


def test_torch_classes_map_back_to_the_table():
    """Each entry's torch adapter class (when it exists) reproduces exactly the table's core arguments."""
    torch = pytest.importorskip("torch")
    adapters = pytest.importorskip("precond_ref.adapters.torch")
    for entry in _available():
        if entry.is_baseline or not hasattr(adapters, entry.torch_class or ""):
            continue
        for model in digits.MODELS:
            named = [("fc.weight", torch.zeros(3, 2, requires_grad=True)), ("fc.bias", torch.zeros(3, requires_grad=True))]
            _, notes = compare.make_torch_optimizer(entry, named, entry.kwargs_for(model))
            assert notes == [], (entry.name, notes)


def test_missing_factory_is_skipped_with_a_note(monkeypatch):
    ghost = MethodEntry(name="ghost", factory="not_a_method", label="Ghost", hyperparameters={}, reference="-")
    monkeypatch.setattr(compare, "METHODS", METHODS + (ghost,))
    entries, skipped = compare.resolve_methods("all")
    assert ghost not in entries and skipped[-1]["method"] == "ghost"
    assert "not in this version" in skipped[-1]["reason"]
    entries, skipped = compare.resolve_methods("adam,ghost")
    assert [e.name for e in entries] == ["adam"] and [s["method"] for s in skipped] == ["ghost"]


def test_table_entries_are_well_formed():
    names = [e.name for e in METHODS]
    assert len(names) == len(set(names))
    for entry in METHODS:
        assert entry.reference
        assert set(entry.update_kwargs) <= {"batch_size"}
        for model in digits.MODELS:
            assert "learning_rate" in entry.kwargs_for(model)
    assert method_table.entry_by_name("mbf").kwargs_for("cnn")["precondition_every"] == 100


# ------------------------------------------------------------------------------------------
# The command line


def test_cli_end_to_end_writes_table_json_and_plot(tmp_path, capsys, monkeypatch):
    full = digits.load_digits_split
    small = lambda: tuple(a[:256] if i < 2 else a[:64] for i, a in enumerate(full()))  # noqa: E731
    monkeypatch.setattr(digits, "load_digits_split", small)
    out = tmp_path / "out"
    argv = ["compare", "--methods", "sgd_momentum,agd", "--epochs", "1", "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| mlp | AGD |" in printed and "| cnn | SGD-momentum |" in printed
    assert "test accuracy" in printed and "source:" in printed
    report = json.loads((out / "compare.json").read_text())
    assert {(r["method"], r["model"]) for r in report["runs"]} == {
        (m, d) for m in ("sgd_momentum", "agd") for d in ("mlp", "cnn")
    }
    png = (out / "loss_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    # A re-run with the same seed writes the same numbers (times aside).
    assert cli.main(argv + ["--no-plot"]) == 0
    again = json.loads((out / "compare.json").read_text())
    strip = lambda runs: [{k: v for k, v in r.items() if not k.endswith(("_ms", "_s"))} for r in runs]  # noqa: E731
    assert strip(again["runs"]) == strip(report["runs"])
    assert all(math.isfinite(r["final_train_loss"]) for r in report["runs"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "adam,nope"], "unknown method(s) 'nope'"),
        (["--methods", ","], "--methods is empty"),
        (["--models", "resnet"], "unknown model(s) 'resnet'"),
    ],
)
def test_cli_user_errors(argv, message, tmp_path, capsys):
    assert cli.main(["compare", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [["--epochs", "0"], ["--epochs", "x"], ["--seed", "-1"], ["--backend", "tpu"], ["--bogus"]])
def test_cli_bad_flags_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["compare", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


def test_cli_unwritable_output_directory(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert cli.main(["compare", "--methods", "adam", "--epochs", "1", "--out", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err
    assert "cannot write to output directory" in err and "Traceback" not in err


def test_cli_cupy_without_gpu_is_a_clear_error(tmp_path, capsys):
    try:
        import cupy

        if cupy.is_available():
            pytest.skip("a CUDA device is present")
    except ImportError:
        pass
    assert cli.main(["compare", "--backend", "cupy", "--methods", "adam", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--backend cupy needs" in err and "Traceback" not in err


def test_cli_list_describes_every_entry(capsys):
    assert cli.main(["compare", "--list"]) == 0
    printed = capsys.readouterr().out
    for entry in METHODS:
        assert entry.label in printed
