"""``python -m precond_ref compare``: the hand-written models, determinism, tuning, backends and the CLI.

Small settings only (a few hundred examples, one or two epochs): the whole file runs in well under
a minute on two cores.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("sklearn")

import precond_ref
from precond_ref import cli, compare
from precond_ref.compare import digits, report, training
from precond_ref.compare.methods import METHODS, MethodEntry, entry_by_name


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
    assert all(leaf.dtype == jax.numpy.float64 for leaf in jax.tree_util.tree_leaves(jax_params))
    value_and_grad = jax.jit(jax.value_and_grad(lambda p, a, b: digits.jax_loss(model, p, a, b)))
    value, jax_grads = value_and_grad(jax_params, jax.numpy.asarray(x), jax.numpy.asarray(y))
    assert float(value) == pytest.approx(float(loss), rel=1e-12)
    for k, layer in grads.items():
        for kk, g in layer.items():
            np.testing.assert_allclose(g, np.asarray(jax_grads[k][kk]), rtol=1e-10, atol=1e-14)


def test_autoencoder_reconstructs_through_an_eight_unit_code():
    """The deep autoencoder maps 64 pixels through 64-32-8-32-64 back to 64 values in (0, 1), and its
    loss is the squared error summed over pixels, averaged over the batch (labels ignored)."""
    params = digits.init_params("autoencoder", 0)
    assert [params[k]["weight"].shape for k in params] == [(64, 64), (32, 64), (8, 32), (32, 8), (64, 32), (64, 64)]
    x = digits.load_digits_split()[0][:5]
    out = digits.predict(np, "autoencoder", params, x)
    assert out.shape == x.shape and ((out > 0) & (out < 1)).all()
    loss, _ = digits.loss_and_grads(np, "autoencoder", params, x, np.zeros(5, dtype=np.int64))
    assert loss == pytest.approx(((out - x) ** 2).sum() / 5, rel=1e-12)
    assert digits.evaluate(np, "autoencoder", params, x, None) == (pytest.approx(float(loss), rel=1e-12), None)


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

    (IF-Shampoo at its default lr 1e-3 is the slowest of the papers' settings: about 2.27 -> 2.24.
    RF-AdamW has no published values; at RF-RMSProp's lr, without bias correction, it moves less
    still, 2.273 -> 2.260: a drop of 0.01 is asked of it, and the sweep moves its rate.)
    """
    r = compare.train_one(entry, "mlp", data, epochs=3, batch_size=32, seed=0)
    assert r["steps"] == 3 * (320 // 32)
    drop = 0.01 if entry.name == "rf_adamw" else 0.02
    assert r["final_train_loss"] is not None and r["final_train_loss"] < r["step_loss"][0] - drop
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


# ------------------------------------------------------------------------------------------
# Tuning


def test_defaults_are_the_tuned_protocol():
    """The protocol is the default: tuning on, a 5-7 point grid centred on the paper's value,
    3 seeds, a validation split of the training set."""
    import argparse

    parser = argparse.ArgumentParser()
    compare.add_arguments(parser)
    args = parser.parse_args([])
    assert not args.no_tune and 5 <= args.grid <= 7 and args.grid % 2 == 1 and args.seeds == 3
    assert compare.grid_factors(args.grid)[args.grid // 2] == 1.0
    assert args.methods == "all" and args.models.split(",") == list(digits.MODELS)
    assert 0 < compare.VALIDATION_FRACTION < 0.5


def test_validation_split_partitions_the_training_set():
    """The sweep trains and scores inside the training set: the two parts are disjoint, cover it
    and keep every class; the test set is not touched."""
    x, y, x_test, _ = digits.load_digits_split()
    x_fit, y_fit, x_val, y_val = digits.validation_split(x, y, compare.VALIDATION_FRACTION)
    assert len(x_fit) + len(x_val) == len(x) and len(x_val) == math.ceil(compare.VALIDATION_FRACTION * len(x))
    rows = lambda a: {r.tobytes() for r in a}  # noqa: E731
    assert rows(x_fit) | rows(x_val) == rows(x) and not rows(x_fit) & rows(x_val) and not rows(x_val) & rows(x_test)
    assert set(y_val) == set(y_fit) == set(range(10))


def test_grid_is_centred_on_the_paper_value_in_half_decades():
    assert compare.grid_factors(1) == [1.0]
    five = compare.grid_factors(5)
    assert five[2] == 1.0 and len(five) == 5
    np.testing.assert_allclose(np.diff(np.log10(five)), 0.5, rtol=1e-12)
    assert compare.grid_factors(4)[1] == 1.0  # even counts lean up


def _sweep_jobs(entry, factors, seeds=(0,)):
    return [
        {"entry": entry, "model": "mlp", "learning_rate": 1e-3 * f, "seed": seed} for f in factors for seed in seeds
    ]


def test_sweep_keeps_the_lowest_validation_loss_and_flags_edges_and_divergence():
    entry = entry_by_name("adam")
    factors = compare.grid_factors(3)
    jobs = _sweep_jobs(entry, factors)
    ok = lambda loss: {"test_loss": loss, "final_train_loss": loss}  # noqa: E731
    results = [ok(0.5), ok(0.2), {"test_loss": None, "diverged": True}]
    (sweep,) = compare._choose(jobs, results)
    assert sweep["learning_rate"] == pytest.approx(1e-3) and not sweep["at_grid_edge"]
    assert sweep["validation_loss"] == [0.5, 0.2, None]
    results = [ok(0.1), ok(0.2), ok(0.3)]
    (sweep,) = compare._choose(jobs, results)
    assert sweep["learning_rate"] == pytest.approx(1e-3 * factors[0]) and sweep["at_grid_edge"]
    # Nothing finite: fall back to the paper's value rather than a diverged one.
    results = [{"test_loss": None, "diverged": True}, {"error": "boom"}, {"test_loss": None, "diverged": True}]
    (sweep,) = compare._choose(jobs, results)
    assert sweep["learning_rate"] == 1e-3 and sweep["errors"] == ["boom"] and sweep["none_trained"]
    row = {"learning_rate": 1e-3, "paper_learning_rate": 1e-3, "none_trained": True}
    assert report._lr(row) == "0.001 (no swept rate trained: the paper's)"  # said in the table


def test_sweep_chooses_by_the_median_over_seeds_so_a_rate_failing_one_seed_loses():
    """A rate that trains best for seed 0 but collapses for seed 1 (ends at its
    initial loss) must not win over one that trains for both; the score is the median over the
    sweep's seeds, a failed run scoring +inf."""
    entry = entry_by_name("adam")
    jobs = _sweep_jobs(entry, compare.grid_factors(3), seeds=(0, 1))
    ok = lambda loss: {"test_loss": loss, "initial_train_loss": 2.3, "final_train_loss": loss}  # noqa: E731
    collapsed = {"test_loss": 2.31, "initial_train_loss": 2.3, "final_train_loss": 2.31}
    results = [ok(0.9), ok(0.8), ok(0.3), ok(0.35), ok(0.1), collapsed]
    (sweep,) = compare._choose(jobs, results)
    assert sweep["learning_rate"] == pytest.approx(1e-3)
    assert sweep["validation_losses"] == [[0.9, 0.8], [0.3, 0.35], [0.1, None]]
    assert sweep["validation_loss"] == [pytest.approx(0.85), pytest.approx(0.325), None]


def test_default_sweep_uses_two_seeds_and_a_budget_of_extra_rates():
    import argparse

    parser = argparse.ArgumentParser()
    compare.add_arguments(parser)
    args = parser.parse_args([])
    assert args.tune_seeds >= 2 and args.max_extra_rates >= 1


def _fake_sweep_job(best_exponent, diverge_above=None):
    """A stand-in for a training run: validation loss (log10 lr - best)^2 + 0.1, or diverged."""

    real = compare._run_job

    def run(job):
        if job["dataset"] == "final":
            return real({**job, "epochs": 1})
        exponent = 2 * math.log10(job["learning_rate"] / job["entry"].kwargs_for(job["model"])["learning_rate"])
        if diverge_above is not None and exponent > diverge_above + 1e-9:
            return {"test_loss": None, "diverged": True, "final_train_loss": None}
        loss = 0.1 + (exponent - best_exponent) ** 2
        return {"test_loss": loss, "final_train_loss": loss, "initial_train_loss": 100.0}

    return run


@pytest.mark.parametrize(
    "best, diverge_above, extra, grid_exponents, edge",
    [
        (3, None, 3, [-1, 0, 1, 2, 3, 4], False),  # best two steps past the top: found, one more confirms
        (-3, None, 3, [-4, -3, -2, -1, 0, 1], False),  # the same downwards
        (2, 2, 3, [-1, 0, 1, 2, 3], False),  # the next rate diverges: the best is inside
        (6, None, 2, [-1, 0, 1, 2, 3], True),  # the budget runs out: still at the edge, and said so
        (0, None, 3, [-1, 0, 1], False),  # interior from the start: no extra rate
    ],
)
def test_sweep_extends_the_grid_past_a_winning_edge(best, diverge_above, extra, grid_exponents, edge, tmp_path, capsys, monkeypatch):
    """A winner at an end of the grid sends the sweep one sqrt(10) step further
    that way, round after round, until the winner is inside the grid or the next rate diverges, at
    most --max-extra-rates times; a rate still at an edge then is marked so in the table."""
    full = digits.load_digits_split
    monkeypatch.setattr(digits, "load_digits_split", lambda: tuple(a[:128] if i < 2 else a[:32] for i, a in enumerate(full())))
    monkeypatch.setattr(compare, "_run_job", _fake_sweep_job(best, diverge_above))
    argv = [
        "compare", "--methods", "adam", "--models", "mlp", "--grid", "3", "--seeds", "1", "--epochs", "1", "--jobs", "1",
        "--max-extra-rates", str(extra), "--out", str(tmp_path), "--no-plot",
    ]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    printed = captured.out
    (sweep,) = json.loads((tmp_path / "compare.json").read_text())["sweeps"]
    np.testing.assert_allclose(sweep["grid"], [1e-3 * 10 ** (k / 2) for k in grid_exponents], rtol=1e-12)
    assert sweep["at_grid_edge"] == edge and sweep["extra_rates"] == len(grid_exponents) - 3
    row = next(line for line in printed.splitlines() if line.startswith("| mlp | Adam |"))
    assert ("edge (after 2 extra rates of 2)" in row) == edge
    assert "final: 1 of 1 runs done" in captured.err  # stderr is no terminal here: the final runs say they progress


def test_a_collapsed_run_is_flagged_and_never_averaged():
    """A run that ends at or above its initial loss, or at chance accuracy, or
    diverged, is a failure: counted, its cells saying "k of 3 seeds failed", the mean taken over
    nothing it produced. The chance line is 1/10 plus 3 binomial standard deviations on the
    evaluation set (a guesser stays below it with probability 0.999)."""
    base = {"model": "cnn", "method": "agd", "label": "AGD", "hyperparameters": {"learning_rate": 0.03},
            "step_ms": 1.0, "optimizer_ms": 0.5, "state_bytes": 10, "eval_examples": 360, "initial_train_loss": 2.30}
    good = [{**base, "seed": s, "final_train_loss": v, "test_loss": 2 * v, "test_accuracy": 0.95 + 0.01 * s} for s, v in ((0, 0.1), (1, 0.2))]
    collapsed = {**base, "seed": 2, "final_train_loss": 2.312, "test_loss": 2.31, "test_accuracy": 0.103}
    assert report.failure(good[0]) is None and "initial" in report.failure(collapsed)
    at_chance = {**good[0], "final_train_loss": 2.2, "test_accuracy": 0.12}  # below its initial loss, yet at chance
    assert "chance" in report.failure(at_chance)
    assert report.chance_threshold(360) == pytest.approx(0.1 + 3 * math.sqrt(0.09 / 360))
    assert report.failure({**good[0], "test_accuracy": 0.15}) is None  # above the chance line
    assert report.failure({**good[0], "diverged": True, "final_train_loss": None}) == "diverged"
    assert report.failure({**base, "seed": 0, "final_train_loss": 0.5, "test_loss": 0.6, "test_accuracy": None}) is None

    (row,) = report.summarize(good + [collapsed], [])
    assert row["failed"] == 1 and row["failures"][0]["seed"] == 2
    assert row["final_train_loss_mean"] == pytest.approx(0.15) and row["test_accuracy_values"] == [0.95, 0.96]
    table = report.format_table([row])
    assert "1 of 3 seeds failed (others: 95.0%, 96.0%)" in table and " ± " not in table
    assert report.format_failures([row]).startswith("Failed runs: 1 of 3 (cnn / AGD seed 2: train loss 2.312 at or above")
    (clean,) = report.summarize(good, [])
    assert " ± " in report.format_table([clean]) and report.format_failures([clean]) == "Failed runs: none of 2."


def test_runs_record_their_initial_training_loss(data):
    """The failure rule needs the loss of the initial weights on the training set: recorded by every run."""
    r = compare.train_one(entry_by_name("adam"), "mlp", data, epochs=1, batch_size=32, seed=4, dtype="float64")
    initial, _ = digits.evaluate(np, "mlp", digits.init_params("mlp", 4), data[0], data[1])
    assert r["initial_train_loss"] == initial and r["eval_examples"] == len(data[3])
    assert r["final_train_loss"] < r["initial_train_loss"] and report.failure(r) is None


def test_divergence_ends_the_run_and_is_reported(data):
    """A learning rate far too large overflows the ReLU CNN within an epoch; the run stops and says so."""
    r = compare.train_one(entry_by_name("sgd_momentum"), "cnn", data, epochs=3, batch_size=32, seed=0, learning_rate=1e20)
    assert r["diverged"] and r["steps"] < 3 * (320 // 32) and r["final_train_loss"] is None


def test_summary_is_mean_and_sample_std_over_seeds():
    runs = [
        {"model": "mlp", "method": "adam", "label": "Adam", "hyperparameters": {"learning_rate": 0.01}, "final_train_loss": v,
         "test_loss": 2 * v, "test_accuracy": 0.9, "step_ms": 1.0, "optimizer_ms": 0.5, "state_bytes": 10}
        for v in (1.0, 2.0, 3.0)
    ]
    sweeps = [{"model": "mlp", "method": "adam", "paper_learning_rate": 0.001, "at_grid_edge": True}]
    (row,) = report.summarize(runs, sweeps)
    assert row["final_train_loss_mean"] == 2.0 and row["final_train_loss_std"] == 1.0
    assert row["test_accuracy_std"] == 0.0 and row["paper_learning_rate"] == 0.001
    assert "0.01 (10× paper) edge" in report.format_table([row])
    assert row["failed"] == 0


# ------------------------------------------------------------------------------------------
# The command line


def test_cli_end_to_end_writes_table_json_and_plot(tmp_path, capsys, monkeypatch):
    full = digits.load_digits_split
    small = lambda: tuple(a[:256] if i < 2 else a[:64] for i, a in enumerate(full()))  # noqa: E731
    monkeypatch.setattr(digits, "load_digits_split", small)
    out = tmp_path / "out"
    argv = [
        "compare", "--methods", "sgd_momentum,agd", "--models", "mlp,autoencoder", "--epochs", "1", "--tune-epochs", "1",
        "--grid", "2", "--max-extra-rates", "0", "--tune-seeds", "1", "--seeds", "2", "--jobs", "1", "--out", str(out),
    ]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| mlp | AGD |" in printed and "| autoencoder | SGD-momentum |" in printed
    result = json.loads((out / "compare.json").read_text())
    # The README's table (compare --readme renders it from the saved JSON) is the first thing printed.
    assert printed.startswith(report.format_short_table(result["summary"]) + "\n")
    assert "Tuned: for every method and model, the learning rate alone was swept" in printed
    assert "source:" in printed and " ± " in printed
    result = json.loads((out / "compare.json").read_text())
    assert {(r["method"], r["model"], r["seed"]) for r in result["runs"]} == {
        (m, d, s) for m in ("sgd_momentum", "agd") for d in ("mlp", "autoencoder") for s in (0, 1)
    }
    assert len(result["sweeps"]) == 4 and all(len(s["grid"]) == 2 for s in result["sweeps"])
    for row in result["summary"]:
        sweep = next(s for s in result["sweeps"] if (s["model"], s["method"]) == (row["model"], row["method"]))
        assert row["learning_rate"] == sweep["learning_rate"]
        assert (row["test_accuracy_mean"] is None) == (row["model"] == "autoencoder")
    png = (out / "loss_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    # A re-run with the same seed, spread over two worker processes, writes the same numbers (times aside).
    assert cli.main(argv[:-4] + ["--jobs", "2", "--out", str(out), "--no-plot"]) == 0
    again = json.loads((out / "compare.json").read_text())
    strip = lambda runs: [{k: v for k, v in r.items() if not k.endswith(("_ms", "_s"))} for r in runs]  # noqa: E731
    assert strip(again["runs"]) == strip(result["runs"]) and again["sweeps"] == result["sweeps"]
    assert all(math.isfinite(r["final_train_loss"]) for r in result["runs"])


def test_cli_no_tune_runs_the_paper_values(tmp_path, capsys, monkeypatch):
    full = digits.load_digits_split
    monkeypatch.setattr(digits, "load_digits_split", lambda: tuple(a[:128] if i < 2 else a[:32] for i, a in enumerate(full())))
    argv = ["compare", "--no-tune", "--methods", "mbf", "--models", "cnn", "--epochs", "1", "--seeds", "1", "--out", str(tmp_path), "--no-plot"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| cnn | MBF | 3e-05 |" in printed and "Paper values (--no-tune)" in printed
    assert json.loads((tmp_path / "compare.json").read_text())["sweeps"] == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "adam,nope"], "unknown method(s) 'nope'"),
        (["--methods", ","], "--methods is empty"),
        (["--models", "resnet"], "unknown model(s) 'resnet'"),
        (["--models", ","], "--models is empty"),
        (["--no-tune", "--grid", "3"], "--no-tune runs no learning-rate sweep, so --grid would have no effect"),
        (["--tune-ep", "2", "--no-tune"], "so --tune-epochs would have no effect"),
    ],
)
def test_cli_user_errors(argv, message, tmp_path, capsys):
    assert cli.main(["compare", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_methods_are_named_by_name_or_label_in_any_case_and_rf_adamw_is_compared():
    """--methods takes the table's own labels (AGD, RF-RMSProp) in any case, and
    compare runs RF-AdamW like bench and trace do."""
    entries, skipped = compare.resolve_methods("AGD, rf_adamw,RF-RMSProp,Sgd-Momentum,agd")
    assert [e.name for e in entries] == ["agd", "rf_adamw", "rf_rmsprop", "sgd_momentum"] and skipped == []
    assert "rf_adamw" in [e.name for e in METHODS]
    with pytest.raises(cli.UserError, match="unknown method"):
        compare.resolve_methods("AdamX")


@pytest.mark.parametrize(
    "argv", [["--epochs", "0"], ["--epochs", "x"], ["--seed", "-1"], ["--backend", "tpu"], ["--bogus"], ["--grid", "0"], ["--seeds", "0"],
             ["--tune-seeds", "0"], ["--max-extra-rates", "-1"]]
)
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


def test_cli_cupy_table_equals_the_numpy_one(tmp_path, capsys, monkeypatch):
    """The main job on CuPy arrays (``compare --backend cupy``) is the NumPy job on a GPU: every method
    at its paper's values, float64 on both, prints the same table but for the timing column, and each
    step's loss agrees to the rounding of different summation orders and LAPACK/cuSOLVER routines:
    float64 eps times the longest reduction (< 2^12 terms) times the steps (4) times a growth of at
    most 100 through the preconditioners, under 1e-9 relative."""
    cupy = pytest.importorskip("cupy")
    if not cupy.is_available():
        pytest.skip("no CUDA device for CuPy")
    full = digits.load_digits_split
    monkeypatch.setattr(digits, "load_digits_split", lambda: tuple(a[:128] if i < 2 else a[:32] for i, a in enumerate(full())))
    tables, runs = [], []
    for backend in ("numpy", "cupy"):
        out = tmp_path / backend
        argv = ["compare", "--backend", backend, "--no-tune", "--models", "mlp", "--epochs", "1", "--seeds", "1", "--out", str(out), "--no-plot"]
        assert cli.main(argv) == 0
        rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| mlp |")]
        tables.append([row[:7] + row[8:] for row in rows])  # all but ms / step
        runs.append(json.loads((out / "compare.json").read_text())["runs"])
    assert len(tables[0]) == len(METHODS) and tables[0] == tables[1]
    for ours, theirs in zip(*runs):
        assert (ours["method"], ours["steps"]) == (theirs["method"], theirs["steps"])
        np.testing.assert_allclose(theirs["step_loss"], ours["step_loss"], rtol=1e-9, err_msg=ours["method"])


def test_cli_list_describes_every_entry(capsys):
    assert cli.main(["compare", "--list"]) == 0
    printed = capsys.readouterr().out
    for entry in METHODS:
        assert entry.label in printed


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--device", "cuda"], "--device is not supported with --backend numpy"),
        (["--backend", "jax", "--device", "gpu"], "JAX_PLATFORMS"),
        (["--backend", "torch", "--device", "nonsense"], "is not a torch device"),
    ],
)
def test_cli_device_errors(argv, message, tmp_path, capsys):
    if "torch" in argv:
        pytest.importorskip("torch")
    if "jax" in argv:
        pytest.importorskip("jax")
    assert cli.main(["compare", "--methods", "adam", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_torch_runs_on_cpu_unless_a_device_is_named():
    """--backend torch never moves to a GPU by itself (it used to pick CUDA whenever present)."""
    torch = pytest.importorskip("torch")
    assert training.resolve_device("torch", None) == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(cli.UserError, match="needs CUDA"):
            training.resolve_device("torch", "cuda")
    else:
        assert training.resolve_device("torch", "cuda:0") == "cuda:0"


def test_progress_bar_is_off_when_stderr_is_not_a_terminal(capsys):
    """Under pytest (like a CI log) stderr is not a TTY: no bar, whatever the flag says."""
    assert not sys.stderr.isatty()
    progress = compare._Progress(100, enabled=True)
    assert progress.bar is None
    progress.update(10)
    progress.close()
    assert capsys.readouterr().err == ""


def test_progress_lines_in_every_phase_when_stderr_is_not_a_terminal(capsys):
    """In a log (stderr not a TTY) each phase, the final runs included, prints a
    line at every tenth of its runs; --no-progress prints nothing."""
    progress = compare._Progress(100, enabled=True)
    for phase, jobs in (("sweep", 30), ("final", 20)):
        progress.phase(phase, jobs)
        for _ in range(jobs):
            progress.job_done()
    progress.close()
    lines = capsys.readouterr().err.splitlines()
    final = [line for line in lines if line.startswith("final: ")]
    assert len(final) == 10 and final[0].startswith("final: 2 of 20 runs done") and final[-1].startswith("final: 20 of 20")
    assert len(lines) == 20
    quiet = compare._Progress(100, enabled=False)
    quiet.phase("final", 5)
    for _ in range(5):
        quiet.job_done()
    assert capsys.readouterr().err == ""


def test_progress_bar_shows_on_a_terminal(monkeypatch):
    """On a terminal the run shows one bar over every step, with its phase."""
    pytest.importorskip("tqdm")
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    progress = compare._Progress(100, enabled=True)
    progress.phase("sweep")
    progress.update(40)
    progress.close()
    assert "sweep" in terminal.getvalue() and "40/100" in terminal.getvalue()
    off = compare._Progress(100, enabled=False)  # --no-progress
    assert off.bar is None


def _fake_report(models=("mlp", "autoencoder"), seeds=3, epochs=6):
    rng = np.random.default_rng(0)
    runs = [
        {
            "model": model, "method": method, "label": label, "seed": seed,
            "hyperparameters": {"learning_rate": lr},
            "epoch_train_loss": list(np.exp(-np.linspace(0, 2, epochs)) * (1 + 0.1 * rng.random())),
            "epoch_test_loss": list(np.exp(-np.linspace(0, 1, epochs)) * (1 + 0.1 * rng.random())),
            "epoch_test_accuracy": list(np.linspace(0.5, 0.9, epochs) + 0.01 * rng.random()),
            "initial_train_loss": 2.3, "final_train_loss": 0.1, "test_accuracy": 0.9, "eval_examples": 360,
        }
        for model in models
        for method, label, lr in (("adam", "Adam", 0.0031), ("agd", "AGD", 0.01), ("mbf", "MBF", 3.2e-05))
        for seed in range(seeds)
    ]
    return {"runs": runs, "settings": {"tune": True, "seeds": list(range(seeds))}, "machine": {"processor": "test CPU"}}


def test_plot_shows_seed_bands_chosen_rates_and_a_legend_off_the_curves():
    """Mean curves with a band for the seeds, each method's chosen learning rate in the
    legend, and legends that cover no curve (drawn outside every panel)."""
    pytest.importorskip("matplotlib")
    from matplotlib.collections import PolyCollection

    fig = report.figure(_fake_report())
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        panels = [ax.get_window_extent(renderer) for ax in fig.axes]
        legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
        assert len(legends) == 2  # one per model column
        for legend in legends:
            box = legend.get_window_extent(renderer)
            assert not any(box.overlaps(panel) for panel in panels)
            texts = [t.get_text() for t in legend.get_texts()]
            assert texts == ["Adam (lr 0.0031)", "AGD (lr 0.01)", "MBF (lr 3.2e-05)"]
        for ax in fig.axes:
            assert len(ax.get_lines()) == 3  # one mean curve per method
            assert sum(isinstance(c, PolyCollection) for c in ax.collections) == 3  # one band each
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    single = report.figure(_fake_report(models=("cnn",), seeds=1))
    assert all(not ax.collections for ax in single.axes)  # one seed: no band to draw
    import matplotlib.pyplot as plt

    plt.close(single)


def test_plot_tells_eleven_methods_apart_shows_every_epoch_and_flags_failed_runs():
    """Every method of the table has its own colour
    and its own (line style, marker) pair; the epoch axis has whole-number ticks; the classifier's
    bottom panel (test error, log scale) shows every epoch's point, the first included; a failed
    seed is not in the mean: it is drawn apart (dotted) and the legend counts it."""
    plt = pytest.importorskip("matplotlib.pyplot")
    looks = [report.style_of(entry.name) for entry in METHODS]
    assert len(METHODS) >= 11
    assert len({colour for colour, _, _ in looks}) == len(looks)
    assert len({(style, marker) for _, style, marker in looks}) == len(looks)
    fake = _fake_report(models=("mlp",), epochs=20)
    first = [r for r in fake["runs"] if r["method"] == "adam"]
    for r in first:
        r["epoch_test_accuracy"][0] = 0.2  # a slow first epoch, far below the others
    collapsed = next(r for r in fake["runs"] if r["method"] == "agd" and r["seed"] == 2)
    collapsed.update(final_train_loss=2.31, test_accuracy=0.1, epoch_train_loss=[2.3] * 20)
    fig = report.figure(fake)
    try:
        fig.canvas.draw()
        loss_ax, error_ax = fig.axes[0], fig.axes[1]
        for ax in (loss_ax, error_ax):
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert ticks and all(float(t).is_integer() for t in ticks)
        low, high = error_ax.get_ylim()
        errors = [100 * (1 - a) for r in fake["runs"] for a in r["epoch_test_accuracy"]]
        assert low <= min(errors) and high >= max(errors) == pytest.approx(80.0)
        texts = [t.get_text() for t in error_ax.get_legend().get_texts()]
        assert "AGD (lr 0.01), 1 of 3 seeds failed" in texts
        agd_colour = report.style_of("agd")[0]
        agd_lines = [line for line in loss_ax.get_lines() if line.get_color() == agd_colour]
        assert len(agd_lines) == 2  # the mean of the two good seeds, and the failed seed apart
        mean = next(line for line in agd_lines if line.get_linestyle() == "-")
        assert max(mean.get_ydata()) < 2.0  # the collapsed seed's 2.3 is not in the mean
    finally:
        plt.close(fig)


_WITHOUT_NUMPY = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('numpy', 'sklearn'):
            raise ImportError(f'No module named {name!r}')
sys.meta_path.insert(0, Block())
from precond_ref.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize(
    "argv, expected, code",
    [
        (["compare", "--help"], "--tune-epochs", 0),
        (["compare", "--epochs", "1"], 'pip install -e ".[compare]"', 2),
        (["bench", "--quick"], 'pip install -e ".[compare,torch]"', 2),
        (["bench", "--help"], 'pip install -e ".[compare,torch]"', 0),
    ],
)
def test_commands_name_their_extra_without_numpy(argv, expected, code):
    """Without the compare extra, compare still lists its options and every command says what to install."""
    result = subprocess.run([sys.executable, "-c", _WITHOUT_NUMPY, *argv], capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == code, output
    assert expected in output.replace("\n", " ").replace("  ", " ") and "Traceback" not in output
    assert "unrecognized arguments" not in output


def test_timing_explains_a_wall_time_longer_than_the_cpu_time_needs():
    """No contradictory numbers: a run on a busy machine prints a wall time far
    above its idle-core estimate; the line then says why, instead of leaving two numbers that disagree."""
    base = {"job_count": 3, "settings": {"jobs": 2}}
    busy = report.timing({**base, "total_s": 1900.0, "cpu_s": {"main": 1.0, "workers": 380.0, "quiet_wall_estimate": 191.0}})
    quiet = report.timing({**base, "total_s": 200.0, "cpu_s": {"main": 1.0, "workers": 380.0, "quiet_wall_estimate": 191.0}})
    assert "busy with other work" in busy and "busy" not in quiet
    small = report.timing({**base, "total_s": 14.0, "cpu_s": {"main": 1.0, "workers": 6.0, "quiet_wall_estimate": 4.0}})
    assert "busy" not in small and "start-up" in small  # 10 s of process start-up is not load
    assert "3.2 min on 2 otherwise idle cores" in busy
