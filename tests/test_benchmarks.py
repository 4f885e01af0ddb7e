"""``python -m precond_ref bench``: tiny cases and models; the numbers' bookkeeping is checked, not the speed."""

from __future__ import annotations

import json
import math
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")

from precond_ref import cli
from precond_ref.benchmarks import allocator, common, layers, models, report
from precond_ref.compare.methods import entry_by_name

ROOT_FLAGS = ["--quick", "--no-progress", "--malloc", "system"]  # keep: one run in a process of its own (below)


def _bench(tmp_path, *argv):
    code = cli.main(["bench", *ROOT_FLAGS, "--out", str(tmp_path), *argv])
    return code, json.loads((tmp_path / "bench.json").read_text()) if (tmp_path / "bench.json").exists() else None


def _by(rows):
    return {(r["framework"], r["label"]): r for r in rows}


def test_layer_cases_give_ratios_to_every_baseline_of_their_framework(tmp_path):
    """Torch rows are quoted against Adam(foreach) and Adam(fused), core rows against torch Adam on
    the same device; RF-AdamW (a bench-only entry) runs; a transformer stack is one param group."""
    code, data = _bench(tmp_path, "--methods", "agd,rf_adamw", "--frameworks", "torch,numpy", "--cases", "24x16,tf1x8")
    assert code == 0
    rows = data["results"]["24x16"]
    by = _by(rows)
    assert set(by) == {
        ("torch", "torch Adam(foreach)"), ("torch", "torch Adam(fused)"), ("torch", "AGD"), ("torch", "RF-AdamW"),
        ("numpy", "torch Adam(foreach)"), ("numpy", "AGD"), ("numpy", "RF-AdamW"),
    }
    agd, foreach, fused = by["torch", "AGD"], by["torch", "torch Adam(foreach)"], by["torch", "torch Adam(fused)"]
    assert agd["ratios"] == pytest.approx({foreach["label"]: agd["median_ms"] / foreach["median_ms"], fused["label"]: agd["median_ms"] / fused["median_ms"]})
    assert agd["mean_ratios"][foreach["label"]] == pytest.approx(agd["mean_ms"] / foreach["mean_ms"])
    # AGD keeps two moments per parameter, as Adam does: the same state up to step counters.
    assert agd["state_ratio"] == pytest.approx(1.0, abs=0.02)
    assert agd["reference_ratio"] == pytest.approx(agd["mean_ms"] / data["reference"]["mean_ms"])
    assert "reference_ratio" not in by["numpy", "AGD"]  # the eigh yardstick is for the torch adapter
    assert agd["steps"] == 3 and len(agd["times_ms"]) == 3 and agd["first_step_ms"] > 0
    for name in ("agd", "rf_adamw"):
        assert data["settings"]["hyperparameters"][name] == entry_by_name(name).bench_kwargs()
    stack = {r["label"] for r in data["results"]["tf1x8"] if "median_ms" in r}
    assert {"AGD", "RF-AdamW"} <= stack
    assert data["machine"]["torch_threads"] >= 1 and data["machine"]["processor"]


def test_jax_layer_rows_time_the_jitted_update(tmp_path):
    pytest.importorskip("optax")
    code, data = _bench(tmp_path, "--methods", "agd", "--frameworks", "jax", "--cases", "24x16")
    assert code == 0
    by = _by(data["results"]["24x16"])
    agd = by["jax", "AGD"]
    assert agd["ratios"] == pytest.approx({"optax.adam (jit)": agd["median_ms"] / by["jax", "optax.adam (jit)"]["median_ms"]})
    assert data["machine"]["jax"] and data["reference"] is None


@pytest.mark.parametrize("model, frameworks", [("gpt", "torch,jax"), ("resnet", "torch")])
def test_model_bench_times_whole_training_steps(model, frameworks, tmp_path, capsys):
    """Torch rows against AdamW fused and foreach, JAX rows against optax.adamw; the loss after the
    steps is recorded; B is the examples the loss averages (tokens for the GPT). Every torch row,
    the baselines too, counts the operations of a step after its window (one step with --quick),
    with a GPU's grouping on a CPU: fused AdamW fewer than foreach; the table prints the column."""
    if "jax" in frameworks:
        pytest.importorskip("optax")
    code, data = _bench(tmp_path, "--model", model, "--methods", "rf_adamw", "--frameworks", frameworks)
    assert code == 0
    rows = data["results"][model]
    by = _by(rows)
    mine = by["torch", "RF-AdamW"]
    assert set(mine["ratios"]) == {"torch AdamW(fused)", "torch AdamW(foreach)"}
    assert math.isfinite(mine["last_loss"])
    size = models.SIZES[model]["tiny"]
    assert data["settings"]["size"] == "tiny" and data["settings"]["model"] == json.loads(json.dumps(size))
    assert data["settings"]["batch_size_for_root_free"] == (size["batch"] * size["seq"] if model == "gpt" else size["batch"])
    if "jax" in frameworks:
        assert set(by["jax", "RF-AdamW"]["ratios"]) == {"optax.adamw (jit)"}
        assert math.isfinite(by["jax", "RF-AdamW"]["last_loss"])
        assert "operations" not in by["jax", "RF-AdamW"]
    for label in ("torch AdamW(fused)", "torch AdamW(foreach)", "RF-AdamW"):
        row = by["torch", label]
        ops = row["operations"]
        assert ops["grouping"] == "gpu" and ops["steps"] == [ops["mean"]] and ops["mean"] >= 1, (label, ops)
        assert ops["first_step"] == row["warmup_steps"] + row["steps"]
    assert by["torch", "torch AdamW(fused)"]["operations"]["mean"] < by["torch", "torch AdamW(foreach)"]["operations"]["mean"]
    assert "| ops / step |" in capsys.readouterr().out


def _inner_dimensions(model: str, size: dict, module) -> int:
    """Sum of the contraction lengths on the forward path: every weight's fan-in, plus attention's."""
    total = sum(math.prod(p.shape[1:]) for p in module.parameters() if p.ndim >= 2)
    if model == "gpt":
        total += size["layers"] * (size["width"] // size["heads"] + size["seq"])
    return total


@pytest.mark.parametrize("model", models.MODELS)
def test_jax_model_is_the_torch_model(model):
    """Same weights and batch -> the same loss in both frameworks, to float32 rounding.

    Bound (standard dot-product rounding model): each contraction of length n is off by at most
    n * eps relatively, so the loss by at most (sum of the contraction lengths on the forward
    path) * eps * |loss|. Checked to fail when the JAX attention drops its causal mask.
    """
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    size = models.SIZES[model]["tiny"]
    module = models.build_torch(model, size, torch.float32, "cpu")
    (inputs, targets), _ = models.random_batches(model, size, "cpu", torch.float32)
    with torch.no_grad():
        expected = float(models.torch_loss(model)(module, inputs, targets))
    params = models.nest({n: jnp.asarray(p.detach().numpy()) for n, p in module.named_parameters()})
    got = float(jax.jit(models.jax_loss(model, size))(params, jnp.asarray(inputs.numpy()), jnp.asarray(targets.numpy())))
    bound = _inner_dimensions(model, size, module) * float(jnp.finfo(jnp.float32).eps) * max(1.0, abs(expected))
    assert abs(got - expected) <= bound, (got, expected, bound)


def test_time_steps_first_step_apart_and_refresh_window(monkeypatch):
    """With a fake clock: the first step is reported apart, warm-up steps are not timed, the window
    is as long as the refresh period (so its mean includes the refresh step), and the budget cuts it."""
    clock = {"now": 0.0}

    def stepper(durations):
        def step(i):
            clock["now"] += durations(i)

        return step

    # steps 0 (compile), 1 (warm-up), then a window of max(3, 4) = 4 steps, one of them a refresh (i % 4 == 0).
    cost = lambda i: 5.0 if i == 0 else (0.4 if i % 4 == 0 else 0.1)  # noqa: E731
    result = common.time_steps(stepper(cost), lambda: None, warmup=2, repeats=3, period=4, clock=lambda: clock["now"])
    assert result["first_step_ms"] == pytest.approx(5000.0)
    assert result["warmup_ms"] == pytest.approx(5100.0) and result["warmup_steps"] == 2  # steps 0 and 1
    assert result["times_ms"] == pytest.approx([100.0, 100.0, 400.0, 100.0])
    assert result["median_ms"] == pytest.approx(100.0) and result["mean_ms"] == pytest.approx(175.0)
    assert result["covers_period"] and result["window"] == 4 and result["max_ms"] == pytest.approx(400.0)

    clock["now"] = 0.0
    cut = common.time_steps(stepper(lambda i: 0.6), lambda: None, warmup=1, repeats=2, period=100, budget_s=1.0, clock=lambda: clock["now"])
    assert cut["steps"] == 2 and cut["window"] == 100 and not cut["covers_period"]

    # min_window_s: short steps go on past `repeats`, by whole refresh periods, up to MAX_WINDOW_STEPS.
    clock["now"] = 0.0
    long = common.time_steps(stepper(lambda i: 0.1), lambda: None, warmup=1, repeats=3, period=4, min_window_s=1.0,
                             clock=lambda: clock["now"])
    assert long["steps"] == 12  # 10 steps reach 1 s; the period rounds up to 12
    monkeypatch.setattr(common, "MAX_WINDOW_STEPS", 8)
    clock["now"] = 0.0
    capped = common.time_steps(stepper(lambda i: 0.1), lambda: None, warmup=1, repeats=3, period=4, min_window_s=1.0,
                               clock=lambda: clock["now"])
    assert capped["steps"] == 8


def test_refresh_period_reads_every_interval_with_the_factory_defaults():
    variants = {c.variant: c for c in common.contenders("mbf,if_shampoo,agd,sketchy", with_variants=True)[0]}
    assert common.refresh_period(entry_by_name("mbf")) == 100  # statistics every 10, inverses every 100
    assert common.refresh_period(entry_by_name("if_shampoo")) == 2
    assert common.refresh_period(entry_by_name("agd")) == 1
    assert common.refresh_period(variants["every 10"].entry) == 10


def test_variants_and_their_dtype_names():
    chosen, _ = common.contenders("if_shampoo,sketchy", with_variants=True)
    keys = [c.key for c in chosen]
    assert keys[0] == "if_shampoo" and "if_shampoo[bf16 factors]" in keys and "sketchy[faithful]" in keys
    bf16 = next(c for c in chosen if c.variant == "bf16 factors")
    assert common.core_kwargs_for(bf16.entry, torch, "torch")["factor_dtype"] is torch.bfloat16
    import numpy as np

    with pytest.raises(ValueError, match="numpy has no bfloat16"):
        common.core_kwargs_for(bf16.entry, np, "numpy")
    faithful = next(c for c in chosen if c.key == "sketchy[faithful]")
    assert faithful.entry.bench_kwargs()["block_size"] is None and faithful.label == "Sketchy (faithful)"
    assert [c.key for c in common.contenders("if_shampoo", with_variants=False)[0]] == ["if_shampoo"]


def test_torch_compile_flag_reaches_the_adapters(monkeypatch):
    """--torch-compile on/off passes compile=True/False; default passes nothing; an adapter without
    the option is a clear error, not a silent fallback."""
    seen = []

    def fake(entry, named, kwargs, options=None):
        seen.append(options)
        return object(), []

    monkeypatch.setattr("precond_ref.compare.training.make_torch_optimizer", fake)
    (agd,), _ = common.contenders("agd", with_variants=False)
    for flag in ("default", "on", "off"):
        common.torch_optimizer(agd, [], flag)
    assert seen == [{}, {"compile": True}, {"compile": False}]

    def refuses(entry, named, kwargs, options=None):
        raise TypeError("AGD.__init__() got an unexpected keyword argument 'compile'")

    monkeypatch.setattr("precond_ref.compare.training.make_torch_optimizer", refuses)
    with pytest.raises(cli.UserError, match="--torch-compile on: AGD does not take compile="):
        common.torch_optimizer(agd, [], "on")


def test_adapter_options_propagate_instead_of_falling_back():
    from precond_ref.compare.training import make_torch_optimizer

    p = torch.nn.Parameter(torch.zeros(3, 2))
    with pytest.raises(TypeError, match="no_such_option"):
        make_torch_optimizer(entry_by_name("agd"), [("w", p)], entry_by_name("agd").bench_kwargs(), {"no_such_option": 1})


def test_authors_code_side_by_side(tmp_path, monkeypatch, capsys):
    """The authors' ASGO from --authors-path at our entry's settings, with the authors' trainer's
    split (matrices to it, the rest to Adam); SIRFShampoo where installed, else a skip note."""
    package = tmp_path / "checkout" / "optimizers"
    (package / "utils").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "utils" / "__init__.py").write_text("")
    (package / "utils" / "utils.py").write_text("from optimizers.asgo import asgo\n")
    (package / "asgo.py").write_text(textwrap.dedent("""
        import torch
        CALLS = []
        class asgo(torch.optim.SGD):
            def __init__(self, params, learning_rate, momentum, weight_decay, beta2):
                params = list(params)
                CALLS.append({"shapes": [tuple(p.shape) for p in params], "learning_rate": learning_rate,
                              "momentum": momentum, "weight_decay": weight_decay, "beta2": beta2})
                super().__init__(params, lr=learning_rate)
    """))
    monkeypatch.setattr(sys, "path", sys.path[:])  # --authors-path extends it for the rest of the process
    code, data = _bench(tmp_path / "out", "--methods", "asgo,if_shampoo", "--frameworks", "torch", "--cases", "8x4",
                        "--authors-path", str(tmp_path / "checkout"))
    assert code == 0
    by = _by(data["results"]["8x4"])
    assert by["torch", "asgo (authors)"]["ratios"]["torch Adam(foreach)"] > 0
    import optimizers.asgo as fake

    kwargs = entry_by_name("asgo").bench_kwargs()
    assert fake.CALLS[-1] == {"shapes": [(8, 4)], "learning_rate": kwargs["learning_rate"], "momentum": kwargs["b1"],
                              "weight_decay": kwargs["weight_decay"], "beta2": kwargs["b2"]}
    try:
        import sirfshampoo  # noqa: F401
    except ImportError:
        assert any("sirfshampoo" in s["reason"] for s in data["skipped"])
    else:
        assert by["torch", "SIRFShampoo (authors)"]["median_ms"] > 0
    for name in [m for m in sys.modules if m == "optimizers" or m.startswith("optimizers.")]:
        del sys.modules[name]


def test_layer_cases():
    assert layers.CASES["1024x1024"] == ("linear", 1024, 1024) and layers.CASES["4096x1024"] == ("linear", 4096, 1024)
    assert layers.CASES["conv64-64-3x3"] == ("conv", 64, 64, 3, 3)
    assert layers.parse_cases("tf3x64,12x4,8x4x3x3") == {"tf3x64": ("tf", 3, 64), "12x4": ("linear", 12, 4), "8x4x3x3": ("conv", 8, 4, 3, 3)}
    stack = layers.case_module(("tf", 3, 64), torch.float32, "cpu")
    shapes = [tuple(p.shape) for p in stack.parameters()]
    assert len(shapes) == 3 * 12 and shapes.count((256, 64)) == 3  # each block's fc: equal shapes repeat


def test_tables_and_readme_block_from_the_report():
    rows = [
        {"framework": "torch", "method": "baseline", "variant": None, "label": "B", "first_step_ms": 2.0, "median_ms": 1.0,
         "mean_ms": 1.0, "steps": 3, "period": 1, "covers_period": True, "state_bytes": 2**20},
        {"framework": "torch", "method": "mbf", "variant": None, "label": "MBF", "first_step_ms": 9.0, "warmup_ms": 2.5e5,
         "warmup_steps": 201, "median_ms": 2.0, "mean_ms": 3.0, "steps": 3, "period": 100, "covers_period": False,
         "state_bytes": 2**21},
        {"framework": "torch", "method": "x", "variant": None, "label": "X", "error": "ValueError: no"},
    ]
    from precond_ref.benchmarks.measure import add_ratios

    add_ratios(rows)
    table = report.format_table("case", rows)
    assert "| torch | MBF | 9 | 250 (201) | 2 | 3 (3 < period 100) | 2.00x | 3.00x | - | 2.00 | 2.00x |" in table
    assert "| torch | X | error |" in table
    data = {"argv": ["--model", "gpt"], "machine": {"processor": "CPU", "cpu_count": 2, "torch": "2", "torch_threads": 2},
            "settings": {"dtype": "float32", "repeats": 3, "warmup": 1, "model_description": "gpt: tiny"}, "total_s": 5.0,
            "results": {"gpt": rows}}
    block = report.detail_section({"gpt": data})
    assert block.startswith(report.DETAIL_BEGIN) and block.endswith(report.DETAIL_END)
    assert "| MBF | 2 | 2.00x | 3.00x | 0.01 |" in block and "`python -m precond_ref bench --model gpt` on CPU (2 usable CPUs)" in block
    for x64, label in ((False, ", jax 0.9:"), (True, ", jax 0.9 (x64):")):  # JAX rows say whether float64 was enabled
        jax_data = {**data, "machine": {**data["machine"], "jax": "0.9", "jax_x64": x64}}
        assert f"torch 2 (2 threads){label}" in report.summary_line(jax_data)
    text = f"intro\n{report.DETAIL_BEGIN}\nold\n{report.DETAIL_END}\nrest"
    assert report.replace_readme_section(text, block) == f"intro\n{block}\nrest"
    with pytest.raises(ValueError):
        report.replace_readme_section("no block", block)


def test_readme_from_stores_a_gpu_run_beside_the_cpu_one_and_refuses_what_is_not_a_finished_report(tmp_path, monkeypatch, capsys):
    """``bench --readme-from JSON`` measures nothing: it stores a finished run's report (a GPU
    machine's, whose ``bench.json`` came back as a file) under its kind, "gpt on a GPU" beside
    "gpt", and renders the block from the stored reports; a file that is not a finished report is a
    clear error that leaves README and data untouched."""
    def report_of(gpu: bool, ms: float) -> dict:
        rows = [{"framework": "torch", "method": "baseline", "variant": None, "label": "torch AdamW(fused)",
                 "first_step_ms": 1.0, "median_ms": 2.0, "mean_ms": 2.0, "steps": 3, "state_bytes": 8},
                {"framework": "torch", "method": "mbf", "variant": None, "label": "MBF",
                 "first_step_ms": 1.0, "median_ms": ms, "mean_ms": ms, "steps": 3, "state_bytes": 8}]
        from precond_ref.benchmarks.measure import add_ratios

        add_ratios(rows)
        machine = {"processor": "CPU", "cpu_count": 2, "torch": "2", "torch_threads": 2, **({"gpu": "Some GPU"} if gpu else {})}
        return {"argv": ["--model", "gpt"], "machine": machine, "complete": True, "total_s": 5.0, "results": {"gpt": rows},
                "settings": {"kind": "gpt", "dtype": "float32", "repeats": 3, "warmup": 1, "model_description": "gpt: tiny"}}

    monkeypatch.chdir(tmp_path)
    (tmp_path / "records").mkdir(parents=True)
    (tmp_path / "records" / "bench.json").write_text(json.dumps({"gpt": report_of(False, 3.0)}))
    (tmp_path / "README.md").write_text(f"intro\n{report.README_BEGIN}\nold\n{report.README_END}\nrest\n")
    (tmp_path / "gpu.json").write_text(json.dumps(report_of(True, 5.0)))
    assert cli.main(["bench", "--readme-from", "gpu.json"]) == 0
    stored = json.loads((tmp_path / "records" / "bench.json").read_text())
    assert list(stored) == ["gpt", "gpt on a GPU"] and stored["gpt on a GPU"]["machine"]["gpu"] == "Some GPU"
    readme = (tmp_path / "README.md").read_text()
    assert readme == f"intro\n{report.readme_section(stored)}\nrest\n"
    assert "| method | 2 CPU cores: step x AdamW(fused) | 2 CPU cores: first step s | Some GPU: step x AdamW(fused) |" in readme
    assert "| MBF | 1.50x | 0.0 | 2.50x | 0.0 |" in readme and "- Some GPU: `python -m precond_ref bench --model gpt`" in readme
    unfinished = {**report_of(True, 7.0), "complete": False}
    for name, text, message in (
        ("missing.json", None, "cannot read a JSON report"),
        ("garbage.json", "{not json", "cannot read a JSON report"),
        ("other.json", json.dumps({"seeds": [1]}), "not a report written by bench"),
        ("partial.json", json.dumps(unfinished), "the run that wrote it did not finish"),
    ):
        if text is not None:
            (tmp_path / name).write_text(text)
        capsys.readouterr()
        assert cli.main(["bench", "--readme-from", name]) == 2
        err = capsys.readouterr().err
        assert f"--readme-from {name!r}: {message}" in err and "Traceback" not in err
    assert (tmp_path / "README.md").read_text() == readme
    assert json.loads((tmp_path / "records" / "bench.json").read_text()) == stored
    (tmp_path / "README.md").unlink()
    assert cli.main(["bench", "--readme-from", "gpu.json"]) == 2
    assert "run it from the repository root" in capsys.readouterr().err


def _gpt_report(size: str, gpu: str, ms: float, peak_gib: float) -> dict:
    """A finished ``bench --model gpt --size SIZE`` report on ``gpu`` (synthetic): AdamW(fused) at
    2 ms a step, MBF at ``ms``, MBF's peak at ``peak_gib`` GiB."""
    from precond_ref.benchmarks.measure import add_ratios

    rows = [{"framework": "torch", "method": "baseline", "variant": None, "label": "torch AdamW(fused)", "first_step_ms": 100.0,
             "median_ms": 2.0, "mean_ms": 2.0, "steps": 3, "state_bytes": 8, "peak_bytes": 2**30},
            {"framework": "torch", "method": "mbf", "variant": None, "label": "MBF", "first_step_ms": 200.0,
             "median_ms": ms, "mean_ms": ms, "steps": 3, "state_bytes": 8, "peak_bytes": int(peak_gib * 2**30)}]
    add_ratios(rows)
    machine = {"processor": "CPU", "cpu_count": 16, "torch": "2.x+cu", "torch_threads": 16, "gpu": gpu}
    return {"argv": ["--model", "gpt", "--size", size, "--out", "/tmp/x"], "machine": machine, "complete": True, "total_s": 5.0,
            "results": {"gpt": rows}, "settings": {"kind": "gpt", "size": size, "dtype": "float32", "repeats": 3, "warmup": 1,
                                                    "model_description": f"gpt: {size}"}}


def test_readme_gpu_block_keeps_the_reference_gpt_and_gpt2_small_each_under_its_own_key(tmp_path, monkeypatch):
    """``--readme-from`` stores a GPT-2-small GPU report under "gpt2 on a GPU" beside the
    reference GPT's "gpt on a GPU" (storing either keeps the other), and the README's block shows
    a column group for each: the reference's step ratio and first step, GPT-2-small's step ratio
    and peak GiB, and a "measured by" line per run naming its command, GPU, torch and the commit
    measured where the report names it. Checked to
    fail when the key ignores the size (the GPT-2-small report then replaces the reference one)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "records").mkdir()
    (tmp_path / "README.md").write_text(f"intro\n{report.README_BEGIN}\nold\n{report.README_END}\nrest\n")
    reports = {"ref.json": _gpt_report("reference", "GPU A", 3.0, 1.0), "gpt2.json": _gpt_report("gpt2", "GPU B", 5.0, 12.3),
               "ref2.json": _gpt_report("reference", "GPU C", 4.0, 1.0)}
    reports["gpt2.json"]["machine"]["precond_ref"] = "0.2.0 at abc1234"  # what the bench records (source_version)
    for name, data in reports.items():
        (tmp_path / name).write_text(json.dumps(data))
    assert cli.main(["bench", "--readme-from", "ref.json"]) == 0
    assert cli.main(["bench", "--readme-from", "gpt2.json"]) == 0
    stored = json.loads((tmp_path / "records" / "bench.json").read_text())
    assert list(stored) == ["gpt on a GPU", "gpt2 on a GPU"]
    assert stored["gpt on a GPU"]["machine"]["gpu"] == "GPU A" and stored["gpt2 on a GPU"]["machine"]["gpu"] == "GPU B"
    readme = (tmp_path / "README.md").read_text()
    assert readme == f"intro\n{report.readme_section(stored)}\nrest\n"
    assert ("| method | GPU A: step x AdamW(fused) | GPU A: first step s | GPU B, GPT-2-small: step x AdamW(fused) "
            "| GPU B, GPT-2-small: peak GiB |") in readme
    assert "| torch AdamW(fused) | 1.00x | 0.1 | 1.00x | 1.0 |" in readme and "| MBF | 1.50x | 0.2 | 2.50x | 12.3 |" in readme
    assert "- GPU A: `python -m precond_ref bench --model gpt --size reference` (gpt: reference; torch 2.x+cu)" in readme
    assert ("- GPU B, GPT-2-small: `python -m precond_ref bench --model gpt --size gpt2` (gpt: gpt2; torch 2.x+cu; "
            "precond_ref 0.2.0 at abc1234)") in readme
    assert report.PEAK_LEGEND in readme
    assert cli.main(["bench", "--readme-from", "ref2.json"]) == 0  # a new reference run keeps GPT-2-small's
    stored = json.loads((tmp_path / "records" / "bench.json").read_text())
    assert [stored[k]["machine"]["gpu"] for k in stored] == ["GPU C", "GPU B"]
    assert "| MBF | 2.00x | 0.2 | 2.50x | 12.3 |" in (tmp_path / "README.md").read_text()


def test_gpt2_size_is_gpt2_smalls_shapes_with_an_untied_head():
    """``--size gpt2`` builds (on the meta device: no memory) GPT-2-small's tensors in torch's
    ``Linear`` layout (transformers' ``Conv1D`` weights transposed) plus the untied output head:
    124,439,808 + 50257 x 768 = 163,037,184 parameters in 149 tensors."""
    from precond_ref.benchmarks.scale import gpt2_small_shapes

    size = models.SIZES["gpt"]["gpt2"]
    with torch.device("meta"):
        module = models.build_torch("gpt", size, torch.float32, "meta")
    shapes = sorted(tuple(p.shape) for p in module.parameters())
    linear = ("c_attn.weight", "c_proj.weight", "c_fc.weight")
    gpt2 = [s[::-1] if name.endswith(linear) else s for name, s in gpt2_small_shapes()]
    assert shapes == sorted(gpt2 + [(50257, 768)])
    assert models.parameter_count(module) == 124_439_808 + 50257 * 768 == 163_037_184
    assert models.describe("gpt", size, module).endswith("batch 8x1024 tokens; 163.04M parameters")
    assert models.batch_size_of("gpt", size) == 8 * 1024


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--frameworks", "tensorflow"], "unknown framework(s) 'tensorflow'"),
        (["--cases", "12by4"], "unknown layer case '12by4'"),
        (["--methods", "nope"], "unknown method(s) 'nope'"),
        (["--methods", "adam"], "--methods adam: a baseline, not a method to time"),
        (["--model", "gpt", "--frameworks", "numpy"], "--frameworks numpy times the core on layer cases only"),
        (["--model", "gpt", "--cases", "8x4"], "--cases chooses layer cases"),
        (["--size", "small"], "--size chooses the model of --model gpt|resnet"),
        (["--model", "resnet", "--size", "gpt2"], "--size gpt2: --model resnet has the sizes auto, tiny, small, reference"),
        (["--authors-path", "/nonexistent/dir"], "--authors-path '/nonexistent/dir' is not a directory"),
    ],
)
def test_bench_user_errors(argv, message, tmp_path, capsys):
    assert cli.main(["bench", "--quick", "--methods", "agd", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bench_unwritable_output_bad_flags_and_readme_outside_the_repository(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli.main(["bench", "--quick", "--methods", "agd", "--out", str(blocker / "x")]) == 2
    assert "cannot write to output directory" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", "--quick", "--methods", "agd", "--readme"]) == 2
    assert "run it from the repository root" in capsys.readouterr().err
    for flags in (["--repeats", "0"], ["--budget", "0"], ["--torch-compile", "maybe"], ["--model", "vgg"], ["--malloc", "jemalloc"]):
        with pytest.raises(SystemExit) as info:
            cli.main(["bench", *flags])
        assert info.value.code == 2


def test_rounds_keep_each_rows_lowest_median_and_its_first_compile():
    """``--rounds N``: every row is measured N times in turn (baselines and contenders alike) and
    keeps the round of its lowest median, with the first round's first step (the compiling one);
    a skipped contender is not measured, and an error of one round is replaced by a success.
    Operations are counted in the first round only, and the row keeps that count."""
    from precond_ref.benchmarks import measure
    from precond_ref.benchmarks.common import contenders
    from precond_ref.benchmarks.measure import section_rows

    (agd, dasgo), _ = contenders("agd,dasgo", False)
    medians = {"base": [3.0, 2.0, 4.0], "agd": [5.0, 6.0, 1.0]}
    calls = {"base": 0, "agd": 0, "dasgo": 0}

    def fake(name):
        i = calls[name]
        calls[name] += 1
        if name == "dasgo":
            if i == 0:
                raise RuntimeError("first round fails")
            return {"median_ms": 7.0, "first_step_ms": 70.0}
        counted = measure._COUNT_OPERATIONS[-1]
        assert counted == (i == 0), (name, i)
        return {"median_ms": medians[name][i], "first_step_ms": 100.0 * (i + 1), **({"operations": {"mean": 5.0}} if counted else {})}

    rows = section_rows("torch", [("base", lambda: fake("base"))], [agd, dasgo], lambda c: fake(c.entry.name), rounds=3)
    assert calls == {"base": 3, "agd": 3, "dasgo": 3}
    base, row_agd, row_dasgo = rows
    assert (base["median_ms"], base["first_step_ms"], base["operations"]) == (2.0, 100.0, {"mean": 5.0})
    assert (row_agd["median_ms"], row_agd["first_step_ms"], row_agd["operations"]) == (1.0, 100.0, {"mean": 5.0})
    assert measure._COUNT_OPERATIONS == [True]
    assert row_dasgo["median_ms"] == 7.0 and "error" not in row_dasgo
    skipped = section_rows("torch", [], [agd], lambda c: fake(c.entry.name), skip=lambda c: "too large", rounds=2)
    assert skipped[0]["skipped"] == "too large" and calls["agd"] == 3


def test_bench_takes_compares_device_option(tmp_path, capsys):
    """``bench --device`` is accepted (it used to be refused by the top-level
    parser) and checked like ``compare --device``: a CUDA device on a machine without one is a
    one-line error, and ``--device cpu`` keeps the torch rows on the CPU even where a GPU exists."""
    import torch

    if not torch.cuda.is_available():
        assert cli.main(["bench", "--quick", "--methods", "agd", "--device", "cuda", "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert "--device cuda needs CUDA" in err and "Traceback" not in err and "unrecognized" not in err
    assert cli.main(["bench", "--quick", "--methods", "agd", "--device", "nonsense", "--out", str(tmp_path)]) == 2
    assert "is not a torch device" in capsys.readouterr().err
    code, data = _bench(tmp_path, "--methods", "agd", "--frameworks", "torch", "--cases", "8x4", "--device", "cpu")
    assert code == 0
    assert data["machine"]["torch_device"] == "cpu"


# ---------------------------------------------------------------------------------------------
# --malloc (precond_ref.benchmarks.allocator): mallopt lasts for the process, so in processes of their own

_FAULTS = """
import resource
import torch
from precond_ref.benchmarks import allocator
def fewest_faults_of_arrays_3_to_8():
    faults = []
    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        a = torch.ones(2**24, dtype=torch.float32)  # 64 MiB: above glibc's largest dynamic mmap threshold (32 MiB)
        del a
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return min(faults[2:])
system = fewest_faults_of_arrays_3_to_8()  # glibc's defaults: nothing set yet in this process
kept = allocator.keep_freed_memory()
print(system, kept is not None, fewest_faults_of_arrays_3_to_8())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or allocator.glibc() is None,
                    reason="mallopt is glibc's")
def test_keep_freed_memory_reuses_a_freed_block_instead_of_faulting_in_fresh_pages():
    """allocator.keep_freed_memory's docstring: with it, a 64 MiB torch array made after equal ones
    were freed reuses their memory (from the third on here: no 4 KiB page faulted in again); with
    glibc's defaults such a block goes back to the operating system when freed and each of its
    16384 pages faults on first touch, every time.

    The fewest faults of arrays 3 to 8 is compared: on a loaded machine the kernel may reclaim
    some of the kept, idle pages between two arrays (one failure under a parallel valgrind run),
    which faults them in again, but not on every one of six arrays; without the setting every
    array faults in all its pages.

    One interpreter measures both: first with glibc's defaults (nothing set yet), then after the
    setting (a setting cannot be undone, so the defaults come first)."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True, timeout=120, check=True)
    system, kept, faults = out.stdout.split()
    assert int(system) >= 2**14 * 9 // 10
    assert kept == "True" and int(faults) < 2**14 // 100


def test_bench_keeps_freed_memory_by_default_and_says_so(tmp_path):
    """``--malloc keep`` (the default) reaches the allocator and the run's machine line names it."""
    import subprocess

    argv = ["bench", "--quick", "--no-progress", "--methods", "agd", "--frameworks", "torch", "--cases", "8x4", "--out", str(tmp_path)]
    subprocess.run([sys.executable, "-m", "precond_ref", *argv], capture_output=True, text=True, timeout=300, check=True)
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["settings"]["malloc"] == "keep"
    if allocator.glibc() is None:
        assert data["machine"]["malloc"] is None
    else:
        assert data["machine"]["malloc"].startswith("glibc") and "(--malloc keep)" in report.summary_line(data)


# The cost model's columns (precond_ref.benchmarks.cost) and the peers (--peers)


def test_cost_columns_follow_the_model_and_the_measured_rates(tmp_path):
    """Each row's cost is cost.method_cost of the case's or model's parameters (AdamW's for the
    baselines; the forward and backward added for a model) on the device the run recorded,
    limit_ms = flops / matmul rate + bytes / copy rate with the rates the run measured (each the
    higher of its measurements at the start and at the end, cost.faster_rates), efficiency =
    limit_ms / mean_ms.

    The device matters: ASGO's ``root_method="auto"`` is eigh on a CPU and Polar-Express on a GPU
    in float32, two different costs, so the expectation is computed for the device in the JSON."""
    from precond_ref.benchmarks import cost

    code, data = _bench(tmp_path, "--model", "gpt", "--methods", "asgo", "--frameworks", "torch")
    assert code == 0
    rates = data["rates"]
    assert rates["matmul_flops_per_s"] > 0 and rates["copy_bytes_per_s"] > 0 and rates["measured"] == 2
    device = data["machine"]["torch_device"]
    assert rates["device"] == device
    size = models.SIZES["gpt"]["tiny"]
    shapes = [(n, tuple(p.shape)) for n, p in models.build_torch("gpt", size, torch.float32, "cpu").named_parameters()]
    fwd_bwd = cost.forward_backward("gpt", size, 4)
    asgo = cost.method_cost(entry_by_name("asgo"), shapes, 4, device)
    assert asgo.flops != cost.method_cost(entry_by_name("asgo"), shapes, 4, "cuda" if device == "cpu" else "cpu").flops
    by = _by(data["results"]["gpt"])
    for label, expected in (("ASGO", asgo), ("torch AdamW(fused)", cost.adamw(shapes, 4))):
        row = by["torch", label]["cost"]
        assert row["flops"] == pytest.approx(expected.flops, rel=1e-12) and row["bytes"] == pytest.approx(expected.bytes, rel=1e-12)
        assert row["fwd_bwd_flops"] == pytest.approx(fwd_bwd.flops, rel=1e-12)
        limit = (expected.flops + fwd_bwd.flops) / rates["matmul_flops_per_s"] + (expected.bytes + fwd_bwd.bytes) / rates["copy_bytes_per_s"]
        assert row["limit_ms"] == pytest.approx(1e3 * limit, rel=1e-12)
        assert row["efficiency"] == pytest.approx(row["limit_ms"] / by["torch", label]["mean_ms"], rel=1e-12)
    assert by["torch", "ASGO"]["cost"]["flops"] > 0
    table = report.format_table("gpt", data["results"]["gpt"])
    assert "| opt GFLOP | opt MB | limit ms | limit / mean |" in table
    block = report.detail_section({"gpt": data})
    assert "torch limit / mean" in block and "Cost model rates:" in block


def test_layer_rows_carry_the_optimizer_cost_alone(tmp_path):
    code, data = _bench(tmp_path, "--methods", "mbf", "--frameworks", "torch", "--cases", "8x4")
    assert code == 0
    from precond_ref.benchmarks import cost

    row = _by(data["results"]["8x4"])["torch", "MBF"]["cost"]
    expected = cost.method_cost(entry_by_name("mbf"), [("weight", (8, 4)), ("bias", (8,))], 4, data["machine"]["torch_device"])
    assert row["flops"] == pytest.approx(expected.flops, rel=1e-12) and "fwd_bwd_flops" not in row
    assert "GFLOP, MB, limit / mean" in report.detail_section({"layers": data})


def test_peers_without_the_extra_is_a_clean_message(tmp_path, capsys, monkeypatch):
    from precond_ref.benchmarks import peers

    monkeypatch.setattr(peers, "_import", lambda module: None)
    assert cli.main(["bench", "--quick", "--methods", "agd", "--peers", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--peers needs the optional extra 'peers'" in err and 'pip install -e ".[peers]"' in err and "Traceback" not in err
    assert cli.main(["bench", "--quick", "--methods", "agd", "--peers", "hb-nothing", "--out", str(tmp_path)]) == 2
    assert "unknown peer(s) 'hb-nothing'" in capsys.readouterr().err


def test_a_peer_that_crashes_is_its_row_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    """A peer raising inside its step gets 'crashes: <error type>'; the others are measured; exit 0."""
    import types

    from precond_ref.benchmarks import peers

    fake = types.ModuleType("fakepeerlib")

    class Crash(torch.optim.SGD):
        def step(self, closure=None):
            raise RuntimeError("inductor said no")

    fake.Crash, fake.Fine = Crash, torch.optim.SGD
    monkeypatch.setitem(sys.modules, "fakepeerlib", fake)
    monkeypatch.setattr(peers, "PEERS", (peers.PeerCode("f-crash", "Fake crash", "fakepeerlib", ("Crash",)),
                                         peers.PeerCode("f-fine", "Fake SGD", "fakepeerlib", ("Fine",))))
    code, data = _bench(tmp_path, "--model", "gpt", "--methods", "agd", "--frameworks", "torch", "--peers")
    assert code == 0
    by = _by(data["results"]["gpt"])
    assert by["torch", "Fake crash"]["crashed"] == "RuntimeError" and "median_ms" not in by["torch", "Fake crash"]
    assert by["torch", "Fake SGD"]["ratios"]["torch AdamW(fused)"] > 0 and "cost" not in by["torch", "Fake SGD"]
    out = capsys.readouterr().out
    assert "| torch | Fake crash | crashes: RuntimeError |" in out and "crashes: RuntimeError: inductor said no" in out
    assert data["settings"]["peers"] == {"peers": ["f-crash", "f-fine"], "compile": "library"}


def test_peers_with_the_extra_give_rows(tmp_path):
    """With HeavyBall installed, its AdamW and Muon run on the tiny GPT (eagerly: compiling takes minutes)."""
    pytest.importorskip("heavyball")
    code, data = _bench(tmp_path, "--model", "gpt", "--methods", "agd", "--frameworks", "torch",
                        "--peers", "hb-adamw,hb-muon", "--peer-compile", "off")
    assert code == 0
    by = _by(data["results"]["gpt"])
    for label in ("HeavyBall AdamW", "HeavyBall Muon"):
        row = by["torch", label]
        assert row["method"] == "peer" and row["library"].startswith("heavyball ")
        assert row["median_ms"] > 0 and row["ratios"]["torch AdamW(fused)"] > 0 and math.isfinite(row["last_loss"])


def test_a_run_stopped_after_its_first_case_leaves_that_case_in_bench_json(tmp_path, monkeypatch):
    """bench.json is rewritten after each layer case: a run interrupted while measuring its second
    case (as a timeout would) leaves a valid JSON with ``"complete": false``, the settings and the
    first case's rows, each with its cost; a run that finishes writes ``"complete": true``. Why: the
    GPU run killed by ``timeout`` left no bench.json at all when the file was written only at the end."""
    (tmp_path / "bench.json").write_text('{"stale": "an earlier run"}')
    measure = layers.bench_case
    cases_measured = []

    def stopped_at_the_second_case(*args, **kwargs):
        if cases_measured:
            raise KeyboardInterrupt  # Ctrl-C in the second case (a timeout's SIGTERM ends the process there)
        cases_measured.append(args[1])
        return measure(*args, **kwargs)

    monkeypatch.setattr(layers, "bench_case", stopped_at_the_second_case)
    code, data = _bench(tmp_path, "--methods", "agd", "--frameworks", "torch", "--cases", "8x4,16x8")
    assert code == 130 and cases_measured == [("linear", 8, 4)]
    assert data["complete"] is False and list(data["results"]) == ["8x4"]
    assert data["settings"]["cases"] == {"8x4": ["linear", 8, 4], "16x8": ["linear", 16, 8]}
    assert data["rates"]["matmul_flops_per_s"] > 0 and data["machine"]["torch_device"] == data["rates"]["device"]
    rows = _by(data["results"]["8x4"])
    assert rows["torch", "AGD"]["mean_ms"] > 0 and rows["torch", "AGD"]["cost"]["bytes"] > 0
    assert not (tmp_path / "bench.json.part").exists()

    monkeypatch.setattr(layers, "bench_case", measure)
    code, data = _bench(tmp_path, "--methods", "agd", "--frameworks", "torch", "--cases", "8x4,16x8")
    assert code == 0 and data["complete"] is True and list(data["results"]) == ["8x4", "16x8"]


def test_a_run_stopped_inside_a_model_keeps_the_rows_it_measured(tmp_path, monkeypatch):
    """bench.json is rewritten after each row: a ``--model`` run (one section) interrupted at its
    third row leaves the first two, measured, with ``"complete": false``. Why: a reference-GPT run
    on a GPU stopped by its ``timeout`` inside the section would otherwise leave ``"results": {}``
    after minutes of measurement."""
    from precond_ref.benchmarks import measure

    run_row = measure.run_row
    calls = []

    def stopped_at_the_third_row(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return run_row(*args, **kwargs)

    monkeypatch.setattr(measure, "run_row", stopped_at_the_third_row)
    code, data = _bench(tmp_path, "--model", "gpt", "--size", "tiny", "--methods", "agd,rf_rmsprop", "--frameworks", "torch")
    assert code == 130 and data["complete"] is False and list(data["results"]) == ["gpt"]
    rows = data["results"]["gpt"]
    assert [r["label"] for r in rows] == calls[:2] and all(r["median_ms"] > 0 for r in rows)


def test_compiled_torch_rows_warm_up_through_every_phase_graph():
    """A compiled step compiles one graph per recurring pattern of interval decisions
    (``Transform.due``; a pattern made once, the first call's, runs eagerly); with
    ``--torch-compile on`` a contender's warm-up runs until each pattern has occurred once, so
    that the window times compiled steps only: Sketchy's first call (every phase) and its 3 phases
    (4 steps), and MBF's inverse phases, which first fall due one by one after its
    warm-up of T2 = 100 calls (the last on call 200: 201 steps). Baselines and eager rows keep the
    given warm-up."""
    from precond_ref.benchmarks.measure import timing_for

    sketchy, mbf = common.Contender(entry_by_name("sketchy")), common.Contender(entry_by_name("mbf"))
    compiled, eager = timing_for(2, 10, 1.0, True, compiled=True), timing_for(2, 10, 1.0, True)
    assert common.steps_until_every_pattern(sketchy.entry) == 4
    assert compiled(sketchy)["warmup"] == 4
    assert compiled(mbf)["warmup"] == 201
    assert eager(sketchy)["warmup"] == 2 and eager(mbf)["warmup"] == 2
    assert compiled(None)["warmup"] == 2
    assert timing_for(6, 10, 1.0, True, compiled=True)(sketchy)["warmup"] == 6
    agd = common.Contender(entry_by_name("agd"))
    assert compiled(agd)["warmup"] == 2  # no intervals: one pattern


def test_scale_command_line_refuses_unknown_names_and_estimates_on_meta(capsys):
    """``python -m precond_ref.benchmarks.scale``: ``--help`` prints its usage, an unknown method or
    ``--estimate`` model is one line naming it and the choices (exit 2, before any process is
    started), and ``--estimate`` gives every method's state over its parameters from meta-device
    parameters (AGD keeps two moments: 2.0x; DASGO one and a short vector per matrix: about 1.0x)."""
    from precond_ref.benchmarks import scale

    assert scale.main(["--help"]) == 0 and "--estimate" in capsys.readouterr().out
    assert scale.main(["AGD", "Nope:rank=4"]) == 2
    err = capsys.readouterr().err
    assert "unknown method(s) Nope:rank=4" in err and "SAdaGrad" in err
    assert scale.main(["--estimate", "gpt3"]) == 2 and "unknown model(s) gpt3" in capsys.readouterr().err
    assert scale.main(["--estimate", "reference-gpt"]) == 0
    rows = {row["method"]: row for row in map(json.loads, capsys.readouterr().out.splitlines())}
    assert set(rows) == set(scale.METHODS[1:])
    assert rows["AGD"]["state_over_params"] == 2.0 and 1.0 <= rows["DASGO"]["state_over_params"] < 1.01


def test_quick_run_says_its_timings_are_not_comparable(tmp_path, capsys):
    """bench --quick times 1-3 steps without refresh windows: one refresh in or out of the window
    moves a row by orders of magnitude, so the run says first, and again under its tables, that
    its figures are a smoke test and not comparable."""
    from precond_ref import benchmarks

    code, _ = _bench(tmp_path, "--methods", "agd", "--frameworks", "torch", "--cases", "8x4")
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0] == benchmarks.QUICK_NOTE and "not comparable" in out[0]
    assert out.count(benchmarks.QUICK_NOTE) == 2


def test_the_bench_names_the_commit_it_measured(monkeypatch):
    """A bench report's machine record names the package's version and commit: ``PRECOND_REF_COMMIT``
    where set (a wheel on a GPU machine has no git checkout), else the checkout's ``git rev-parse``."""
    from precond_ref import __version__
    from precond_ref.benchmarks import common

    monkeypatch.setenv(common.COMMIT_VARIABLE, "abc1234")
    assert common.source_version() == f"{__version__} at abc1234"
    monkeypatch.setenv(common.COMMIT_VARIABLE, "")
    monkeypatch.setattr(common.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(OSError("no git")))
    assert common.source_version() == __version__
