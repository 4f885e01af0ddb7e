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
