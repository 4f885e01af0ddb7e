"""The command line a new user meets: help that states the product, names accepted in any case,
and a missing dependency named by the extra that installs it."""

from __future__ import annotations

import sys

import pytest

from precond_ref import cli


def _help(capsys, argv):
    with pytest.raises(SystemExit) as done:
        cli.main([*argv, "--help"])
    assert done.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_top_level_help_names_every_command(capsys):
    text = _help(capsys, [])
    assert "nine" in text
    for command in cli.COMMANDS:
        assert command in text.split("positional arguments")[0], command


def test_bench_help_states_the_sizes_not_their_history(capsys):
    text = _help(capsys, ["bench"])
    assert "issue" not in text
    assert "reference (sized for one GPU" in text


@pytest.mark.parametrize("missing, extra", [("torch", "torch"), ("optax", "jax")])
def test_bench_without_a_default_framework_names_the_extra(monkeypatch, missing, extra):
    """With the default frameworks (the user passed no --frameworks), a missing library is named
    with the pip extra that installs it, not as a flag the user never gave."""
    pytest.importorskip("numpy")
    from precond_ref.benchmarks import _check_frameworks

    monkeypatch.setitem(sys.modules, missing, None)  # import fails as if not installed
    with pytest.raises(cli.UserError) as err:
        _check_frameworks(None, "gpt")
    message = str(err.value)
    assert f'pip install -e ".[{extra}]"' in message and "--frameworks" in message
    assert not message.startswith("--frameworks")
    with pytest.raises(cli.UserError, match=rf"^--frameworks torch,jax needs|^--frameworks \w+ needs {missing}"):
        _check_frameworks("torch,jax", "gpt")


def test_bench_methods_offers_only_what_it_accepts(capsys):
    """The baselines always run and are not --methods names: neither the help nor the error for
    an unknown name offers them."""
    pytest.importorskip("numpy")
    from precond_ref.benchmarks.common import contenders

    for spec, offers in (("adam", "--methods takes: "), ("nope", "available: ")):
        with pytest.raises(cli.UserError) as err:
            contenders(spec, False)
        offered = str(err.value).split(offers)[1].split(", ")
        assert "adam" not in offered and "sgd_momentum" not in offered and "agd" in offered, spec
    assert "sgd_momentum" not in _help(capsys, ["bench"]).split("--methods METHODS")[1].split("--variants")[0]
    chosen, _ = contenders("AGD,rf-rmsprop", False)
    assert [c.entry.name for c in chosen] == ["agd", "rf_rmsprop"]


def test_reproduce_paper_in_any_case():
    pytest.importorskip("numpy")
    from precond_ref.compare.reproduce import resolve_papers

    assert resolve_papers("ASGO,Root-Free") == resolve_papers("root_free,asgo") == ["asgo", "root_free"]
    with pytest.raises(cli.UserError, match="unknown paper"):
        resolve_papers("adam")


def test_compare_list_honours_methods_and_models(capsys):
    pytest.importorskip("sklearn")
    assert cli.main(["compare", "--methods", "AGD", "--models", "mlp", "--list"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("- AGD: mlp:") and out.count("\n- ") == 0 and "cnn" not in out


def test_no_arguments_print_the_help(capsys):
    """``python -m precond_ref`` alone is a first try: it prints the help (every command) and exits 0."""
    assert cli.main([]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "usage: precond-ref" in out and all(command in out for command in cli.COMMANDS)


def test_trace_runs_at_its_defaults_on_jax(tmp_path, capsys):
    """``trace agd --backend jax`` at the default float64, in a fresh process (JAX at its default,
    no x64; this suite enables it), enables JAX's 64-bit mode itself (the advice to call
    jax.config.update cannot be followed from a command line) and writes the file --out defaults
    to, in float64."""
    import subprocess

    pytest.importorskip("jax")
    np = pytest.importorskip("numpy")
    done = subprocess.run([sys.executable, "-m", "precond_ref", "trace", "agd", "--backend", "jax", "--steps", "2"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "wrote agd-quadratic.npz" in done.stdout
    with np.load(tmp_path / "agd-quadratic.npz") as archive:
        assert all(archive[k].dtype == np.float64 for k in archive.files if k.startswith("params/"))
    assert "default: METHOD-PROBLEM.npz" in _help(capsys, ["trace"])


def test_install_hints_name_a_checkout_install():
    """No distribution named precond-ref is on an index: every install hint, in the package and
    in the docs, is the checkout's ``pip install -e ".[EXTRA]"``."""
    from pathlib import Path

    root = Path(cli.__file__).resolve().parent.parent
    assert cli.install_hint("compare").startswith('pip install -e ".[compare]"')
    pages = [*root.joinpath("precond_ref").rglob("*.py"), *root.joinpath("adapters").rglob("*.py"),
             *root.joinpath("docs").rglob("*.md"), root / "README.md"]
    offending = [str(p.relative_to(root)) for p in pages if "precond-ref[" in p.read_text(errors="replace")]
    assert offending == []


@pytest.mark.parametrize("command", [["trace", "agd"], ["compare"]])
def test_a_negative_seed_is_refused_by_every_command(command, capsys):
    """A seed is a non-negative integer (NumPy's generators refuse a negative one): ``trace`` and
    ``compare`` both refuse ``--seed -1`` at the command line, in the same words, before any run."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, "--seed", "-1"])
    assert exit_info.value.code == 2
    assert "argument --seed: expected a non-negative integer, got '-1'" in capsys.readouterr().err
