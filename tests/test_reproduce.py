"""``python -m precond_ref reproduce``: the verdict rules, the measurements and baselines they read,
every paper's experiment at ``--quick`` size, and the committed report (docs/reproduce.md)."""

from __future__ import annotations

import json
import math
import os
import pathlib
import shlex
import subprocess
import sys

import pytest

from precond_ref.compare.reproduce import verdicts as V

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Verdict rules (pure Python)


def test_t_quantile_matches_the_tables_and_the_expansion_joins_them():
    """t(0.975, df): 12.706 at df 1, 2.776 at df 4 (any t table); above df 30 the Cornish-Fisher
    expansion continues the table (at df 30 it gives 2.042 to 1e-3) and tends to the normal 1.96."""
    assert V.t_quantile(1) == 12.706 and V.t_quantile(4) == 2.776
    z = V._Z975
    expansion_at_30 = z + (z**3 + z) / 120 + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * 900)
    assert abs(expansion_at_30 - V.t_quantile(30)) < 1e-3
    assert V.t_quantile(31) < V.t_quantile(30) and abs(V.t_quantile(10**6) - 1.96) < 1e-3


def test_interval_is_the_t_interval_of_the_mean():
    """mean +- t(0.975, n-1) s / sqrt(n); one value has no interval (infinite)."""
    mean, low, high = V.interval([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.776 * math.sqrt(2.5) / math.sqrt(5)
    assert mean == 3.0 and low == pytest.approx(3.0 - half, rel=1e-12) and high == pytest.approx(3.0 + half, rel=1e-12)
    assert V.interval([2.0])[1:] == (-math.inf, math.inf)


def test_ordering_holds_does_not_hold_or_is_inconclusive_by_the_paired_interval():
    """Holds when the interval of the paired gains is above 0, does not hold when below, else
    inconclusive. Pairing: a bad seed for both sides cancels in the difference."""
    rule = V.Ordering("a", "b")
    # a is lower by 0.1 in every seed although the seeds differ by far more than 0.1 (pairing).
    base = [1.0, 3.0, 0.5, 2.0, 5.0]
    assert rule.decide([x - 0.1 for x in base], [x + 0.001 * i for i, x in enumerate(base)]) == V.HOLDS
    assert rule.decide([x + 0.1 for x in base], base) == V.FAILS
    assert rule.decide([1.0, 1.2, 0.9, 1.1, 1.0], [1.05, 1.0, 1.0, 1.05, 0.95]) == V.INCONCLUSIVE  # gains straddle 0
    assert rule.decide([1.0, 2.0], [2.0, 1.0]) == V.INCONCLUSIVE
    assert rule.decide([0.0], [5.0]) == V.INCONCLUSIVE  # one seed: no interval
    higher = V.Ordering("a", "b", lower_is_better=False)
    assert higher.decide([0.9, 0.91, 0.92, 0.9, 0.93], [0.5, 0.52, 0.51, 0.5, 0.49]) == V.HOLDS
    verdict, evidence = rule.assess([x - 0.1 for x in base], base)
    assert verdict == V.HOLDS and evidence["n"] == 5 and evidence["mean"] == pytest.approx(0.1, rel=1e-12)


def test_matches_or_beats_is_a_non_inferiority_test_of_the_shortfall():
    """Holds when the shortfall's interval is below the tolerance, does not hold when above it,
    inconclusive when it straddles it."""
    rule = V.MatchesOrBeats("a", "b", 0.01)  # 1% of b's mean
    b = [1.0, 1.0, 1.0, 1.0, 1.0]
    assert rule.decide([1.005, 1.004, 1.006, 1.005, 1.003], b) == V.HOLDS
    assert rule.decide([0.5, 0.6, 0.55, 0.5, 0.52], b) == V.HOLDS  # beating is matching
    assert rule.decide([1.2, 1.21, 1.19, 1.2, 1.22], b) == V.FAILS
    # Shortfall 0.01 +- 0.0044: straddles the tolerance, and its half-width is below it.
    assert rule.decide([1.005, 1.01, 1.015, 1.01, 1.01], b) == V.INCONCLUSIVE
    # Shortfall 0.008 +- t(4) * 0.0164 / sqrt(5) = 0.0204: a half-width above the tolerance (0.01)
    # cannot tell a match from a miss of that size: underpowered, with that half-width as evidence.
    verdict, evidence = rule.assess([1.0, 1.03, 0.99, 1.02, 1.0], b)
    half = 2.776 * V.spread([0.0, 0.03, -0.01, 0.02, 0.0]) / math.sqrt(5)
    assert verdict == V.UNDERPOWERED and evidence["detectable"] == pytest.approx(half, rel=1e-9)
    accuracy = V.MatchesOrBeats("a", "b", 0.01, relative=False, lower_is_better=False)
    assert accuracy.decide([0.80, 0.81, 0.80, 0.82, 0.8], [0.95, 0.95, 0.96, 0.95, 0.95]) == V.FAILS
    assert accuracy.decide([0.95, 0.955, 0.95, 0.96, 0.95], [0.955, 0.95, 0.96, 0.955, 0.95]) == V.HOLDS


def test_ordering_with_a_claimed_effect_is_underpowered_when_the_interval_is_wider():
    """An ordering whose claim states its gain is underpowered when the interval's half-width
    exceeds that gain; without a stated gain the same numbers are inconclusive; a decided verdict
    is never turned into underpowered."""
    gains_a, base = [1.0, 1.2, 0.9, 1.1, 1.0], [1.05, 1.0, 1.0, 1.05, 0.95]
    assert V.Ordering("a", "b", effect=0.01).decide(gains_a, base) == V.UNDERPOWERED
    assert V.Ordering("a", "b", effect=1.0).decide(gains_a, base) == V.INCONCLUSIVE
    assert V.Ordering("a", "b").decide(gains_a, base) == V.INCONCLUSIVE
    assert V.Ordering("a", "b", effect=1e-9).decide([x - 0.1 for x in base], base) == V.HOLDS
    assert V.combine([V.HOLDS, V.UNDERPOWERED, V.INCONCLUSIVE]) == V.UNDERPOWERED
    assert V.combine([V.FAILS, V.UNDERPOWERED]) == V.FAILS


def test_threshold_both_sides():
    below = V.Threshold("x", 0.1, below=True)
    assert below.decide([0.02, 0.03, 0.05, 0.04, 0.03]) == V.HOLDS
    assert below.decide([0.5, 0.4, 0.6, 0.5, 0.45]) == V.FAILS
    assert below.decide([0.09, 0.11, 0.1, 0.1, 0.12]) == V.INCONCLUSIVE
    assert V.Threshold("x", 0.8, below=False).decide([0.9, 0.95, 0.92, 0.91, 0.9]) == V.HOLDS


def test_gpu_time_claims_are_not_testable_off_a_gpu():
    """The fourth verdict: a claim about GPU time on a CPU run is not testable, whatever the numbers;
    on a cuda device the wrapped rule decides."""
    rule = V.OnHardware(V.Threshold("step time ratio", 2.0))
    fast = [1.1, 1.2, 1.1, 1.15, 1.2]
    assert rule.decide("cpu", fast) == V.NOT_TESTABLE
    assert rule.decide("cuda", fast) == V.HOLDS and rule.decide("cuda:0", [3.0, 3.1, 3.2, 3.0, 3.1]) == V.FAILS
    assert "not testable on this hardware unless" in rule.describe()


def test_combine_needs_every_part():
    assert V.combine([V.HOLDS, V.HOLDS]) == V.HOLDS
    assert V.combine([V.HOLDS, V.INCONCLUSIVE]) == V.INCONCLUSIVE
    assert V.combine([V.HOLDS, V.INCONCLUSIVE, V.FAILS]) == V.FAILS
    assert V.combine([V.FAILS, V.NOT_TESTABLE]) == V.NOT_TESTABLE
    with pytest.raises(ValueError, match="unknown verdict"):
        V.combine(["maybe"])


def test_rules_reject_bad_input_naming_the_side():
    with pytest.raises(ValueError, match="'?b'? has 2 seeds|b has 2 seeds|has 3 seeds and b 2"):
        V.Ordering("a", "b").decide([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="x: non-finite"):
        V.Threshold("x", 1.0).decide([1.0, math.nan])
    with pytest.raises(ValueError, match="no values"):
        V.Threshold("x", 1.0).decide([])


def test_a_diverged_run_decides_without_an_interval():
    """A diverged run's loss is +inf and leaves no interval: the claimed method diverging in any seed
    does not hold; a baseline diverging in every seed (the claimed method wins each one) holds; a
    baseline diverging in some seeds only is inconclusive."""
    papers = pytest.importorskip("precond_ref.compare.reproduce.papers")
    inf, ok = math.inf, [1.0, 1.1, 0.9, 1.0, 1.2]
    rule = V.MatchesOrBeats("a", "b", 0.01)
    assert papers._judge([(rule, ok, [inf] * 5)])[0] == V.HOLDS
    assert papers._judge([(rule, [inf, 1.0, 1.0, 1.0, 1.0], ok)])[0] == V.FAILS
    assert papers._judge([(rule, ok, [inf, 1.0, 1.0, 1.0, 1.0])])[0] == V.INCONCLUSIVE
    hardware = V.OnHardware(V.Ordering("a", "b"))
    assert papers._judge([(hardware, "cuda", ok, [inf] * 5)])[0] == V.HOLDS


def test_rule_text_is_what_decides():
    """The report prints ``describe()`` of the rule object that decided: its parameters appear in it."""
    text = V.MatchesOrBeats("ASGO", "AdamW", 0.01).describe()
    assert "ASGO" in text and "AdamW" in text and "1%" in text and "95% t-interval" in text


# ---------------------------------------------------------------------------------------------
# Measurements and reference baselines


def test_spectral_measurements_on_known_matrices():
    """stable rank of a rank-1 matrix is 1 and of I_n is n; the top-k trace fraction of diag(4,1,...)
    is exact; the subspace distance is 0 for the same span and 1 for orthogonal spans."""
    np = pytest.importorskip("numpy")
    harness = pytest.importorskip("precond_ref.compare.reproduce.harness")
    u = np.arange(1.0, 6.0)[:, None]
    assert harness.stable_rank(u @ u.T) == pytest.approx(1.0, rel=1e-12)
    assert harness.stable_rank(np.eye(7)) == pytest.approx(7.0, rel=1e-12)
    assert harness.top_fraction(np.diag([4.0, 1.0, 1.0, 1.0, 1.0]), 1) == pytest.approx(0.5, rel=1e-12)
    e = np.eye(4)
    assert harness.subspace_distance(e[:, :2], e[:, [1, 0]]) == pytest.approx(0.0, abs=1e-12)
    assert harness.subspace_distance(e[:, :2], e[:, 2:]) == pytest.approx(1.0, abs=1e-12)


def test_full_matrix_adagrad_equals_diagonal_on_axis_aligned_gradients():
    """With one-hot features every gradient lies on a coordinate axis, so sum g g^T is diagonal and
    full-matrix AdaGrad (pseudo-inverse root) takes exactly diagonal AdaGrad's steps (Duchi et al. 2011)."""
    np = pytest.importorskip("numpy")
    from precond_ref.compare.reproduce.baselines import oco_adagrad

    rng = np.random.default_rng(0)
    features = np.eye(6)[rng.integers(0, 6, size=40)]
    labels = np.where(rng.random(40) < 0.5, -1.0, 1.0)
    full = oco_adagrad(features, labels, 0.5, full=True)
    diag = oco_adagrad(features, labels, 0.5, full=False)
    # The two differ only by eigh's rounding of a diagonal matrix: a few ulps of the losses.
    np.testing.assert_allclose(full, diag, rtol=64 * np.finfo(float).eps, atol=0)


def test_shampoo_reference_step_has_adams_norm():
    """Grafting: every matrix step of the reference Shampoo has the Frobenius norm lr * ||Adam update||."""
    torch = pytest.importorskip("torch")
    from precond_ref.compare.reproduce.baselines import ShampooReference

    for sides in (1, 2):
        w = torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(sides)))
        start = w.detach().clone()
        opt = ShampooReference([w], lr=0.1, sides=sides)
        w.grad = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
        opt.step()
        # First Adam step: m_hat / (sqrt(v_hat) + eps) = g / (|g| + eps), entries ~ +-1.
        g = w.grad
        adam = g / (g.abs() + 1e-8)
        assert float((w.detach() - start).norm()) == pytest.approx(0.1 * float(adam.norm()), rel=1e-12)


def test_shampoo_reference_summed_form_is_gupta_et_al():
    """Gupta et al.'s Shampoo (summed factors, powers -1/4, no momentum, no graft): the first step
    is ``-lr (G G^T)^(-1/4) G (G^T G)^(-1/4)``, which for a rank-one G = s u v^T is ``-lr u v^T``
    (the damping, 1e-6 of the mean eigenvalue, moves it by about that fraction)."""
    torch = pytest.importorskip("torch")
    from precond_ref.compare.reproduce.baselines import ShampooReference

    u, v = torch.tensor([0.6, 0.8, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    w = torch.nn.Parameter(torch.zeros(3, 2, dtype=torch.float64))
    opt = ShampooReference([w], lr=0.1, sides=2, b2=1.0, momentum=0.0, graft=False, accumulate="sum", eps=1e-12)
    w.grad = 5.0 * torch.outer(u, v)
    opt.step()
    assert torch.allclose(w.detach(), -0.1 * torch.outer(u, v), atol=1e-6)
    w.grad = 5.0 * torch.outer(u, v)
    opt.step()  # summed: the factors are now 2 G G^T and 2 G^T G, so the step is the first over sqrt(2)
    assert torch.allclose(w.detach(), -0.1 * (1 + 2**-0.5) * torch.outer(u, v), atol=1e-6)


def test_rmsprop_baseline_is_rf_rmsprops_rule_with_the_root():
    """The RMSProp baseline is RF-RMSProp's own rule with the root put back: without the root it
    steps exactly as the library's RF-RMSProp (the same operations in the same order); with it the
    first step is ``-lr g / (sqrt(s_1) + lambda)``."""
    torch = pytest.importorskip("torch")
    from precond_ref.compare.reproduce import baselines
    from precond_ref.compare.reproduce.harness import OPTS

    kw = dict(b2=0.99, damping=1e-3, momentum=0.9, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(0)
    w1 = torch.randn(5, 3, generator=gen).requires_grad_(True)
    w2 = w1.detach().clone().requires_grad_(True)
    library = OPTS["rf_rmsprop"].build([("w", w1)], 0.01, "cnn", **kw)
    mine = baselines.RootRMSPropReference([("w", w2)], lr=0.01, root=False, **kw)
    for _ in range(4):
        x = torch.randn(4, 5, generator=gen)
        for w, opt in ((w1, library), (w2, mine)):
            opt.zero_grad()
            (x @ w).pow(2).mean().backward()
            opt.step(batch_size=4)
    assert torch.equal(w1.detach(), w2.detach())
    w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    rooted = baselines.RootRMSPropReference([w], lr=0.1, b2=0.9, damping=1e-3, batch_size=4)
    w.grad = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    rooted.step()
    s = 0.9 + 0.1 * 4 * w.grad**2
    assert torch.allclose(w.detach(), -0.1 * w.grad / (s.sqrt() + 1e-3), rtol=1e-12)


def test_shampoo_reference_newton_root_is_the_inverse_root():
    """The coupled Newton iteration (Guo and Higham 2006) converges to (F + damping I)^(-1/p): in
    float64 it agrees with the eigendecomposition root to rounding (a few hundred ulps times the
    condition number of this well-conditioned factor), for p = 2 and p = 4."""
    torch = pytest.importorskip("torch")
    from precond_ref.compare.reproduce.baselines import ShampooReference

    g = torch.randn(12, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    factor = g @ g.T / 40
    eigenvalues = torch.linalg.eigvalsh(factor)
    condition = float(eigenvalues[-1] / eigenvalues[0])
    for power in (0.5, 0.25):
        exact = ShampooReference._root(factor, power, 1e-6)
        newton = ShampooReference._newton_root(factor, power, 1e-6, 40)
        error = float((exact - newton).norm() / exact.norm())
        assert error < 256 * condition * torch.finfo(torch.float64).eps, (power, error)


def test_muon_reference_step_is_the_scaled_orthogonal_factor():
    """Muon (Jordan et al. 2024): the quintic Newton-Schulz iteration is an odd matrix polynomial, so
    it keeps the singular vectors of its input exactly (U^T O V diagonal to rounding: a few ulps times
    the iteration's growth) and maps the singular values into about [0.5, 1.5] (its coefficients'
    design); the first step moves a matrix by -lr * rms * sqrt(max(m, n)) times that factor of the
    Nesterov momentum g + 0.95 g (the buffer is the gradient), after decoupled decay;
    embeddings and the read-out take AdamW's step (first step: -lr * g / (|g| + eps))."""
    torch = pytest.importorskip("torch")
    from precond_ref.compare.reproduce import harness
    from precond_ref.compare.reproduce.baselines import MuonReference, orthogonalize

    g = torch.randn(7, 19, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    for matrix in (g, g.T):
        u, sv, vh = torch.linalg.svd(matrix, full_matrices=False)
        core = u.T @ orthogonalize(matrix) @ vh.T
        off = core - torch.diag(torch.diagonal(core))
        assert float(off.abs().max()) < 1e3 * torch.finfo(torch.float64).eps
        assert 0.5 < float(torch.diagonal(core).min()) and float(torch.diagonal(core).max()) < 1.5
    w = torch.nn.Parameter(torch.randn(7, 19, dtype=torch.float64, generator=torch.Generator().manual_seed(5)))
    head = torch.nn.Parameter(torch.randn(3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(6)))
    start, head_start = w.detach().clone(), head.detach().clone()
    opt = MuonReference([("blocks.w", w), ("head.weight", head)], lr=0.1, weight_decay=0.01, adam_filter=harness._muon_excluded)
    w.grad, head.grad = g.clone(), torch.ones(3, 7, dtype=torch.float64)
    opt.step()
    expected = start * (1 - 0.1 * 0.01) - 0.1 * 0.2 * 19**0.5 * orthogonalize(g + 0.95 * g)
    assert torch.allclose(w.detach(), expected, rtol=0, atol=1e3 * torch.finfo(torch.float64).eps)
    assert torch.allclose(head.detach(), head_start * (1 - 0.1 * 0.01) - 0.1 / (1 + 1e-8), rtol=0, atol=1e-15)


def test_second_moment_bytes_count_statistics_only():
    """Adam's second moment is its v (one value per parameter); the reference Shampoo's its two
    Kronecker factors (m^2 + n^2); Sketchy's its rank-k FD sketches, about k (m + n) values for an
    m x n matrix: below the parameter count when k << m, n (the paper's sub-linear memory). Momentum,
    grafting buffers and cached roots are not counted."""
    torch = pytest.importorskip("torch")
    from precond_ref.compare.reproduce import harness

    for name, low, high in (("adam", 256 * 256, 256 * 256), ("shampoo2", 2 * 256 * 256, 2 * 256 * 256),
                            ("sketchy", 16 * 512, 256 * 256 // 4)):
        w = torch.nn.Parameter(torch.zeros(256, 256, dtype=torch.float32))
        opt = harness.OPTS[name].build([("fc.weight", w)], 1e-3, "mlp", **({"rank": 16} if name == "sketchy" else {}))
        w.grad = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
        opt.step()
        counted = harness.second_moment_bytes(opt) // 4
        assert low <= counted <= high, (name, counted)
    assert harness.second_moment_bytes(torch.optim.SGD([w], lr=0.1)) is None


def test_tuning_extends_until_both_edges_are_worse_and_keeps_every_score():
    """The sweep: a grid of powers of sqrt(10) around the centre, scored as the mean over the
    tuning seeds; while the best rate sits at an edge, one more rate beyond it, and while every
    rate diverged one below the lowest (at most ``extend`` in all); a rate where a seed diverged
    scores +inf; ``edge`` says the best is still at the edge."""
    harness = pytest.importorskip("precond_ref.compare.reproduce.harness")
    calls = []

    def quadratic(optimum):
        def run(lr, seed):
            calls.append((lr, seed))
            value = (math.log10(lr) - math.log10(optimum)) ** 2 + 0.01 * seed
            return {"diverged": lr > 1.0, "score": None if lr > 1.0 else value}
        return run

    runner = harness.Runner()
    inside = runner.tune("t", "adam", 1e-2, 5, [0, 1], quadratic(1e-2), "score")
    assert inside["lr"] == pytest.approx(1e-2) and not inside["edge"] and inside["extended"] == 0
    assert len(inside["scores"]) == 5 and all(len(v) == 2 for v in inside["scores"].values())
    beyond = runner.tune("t2", "adam", 1e-2, 5, [0, 1], quadratic(1e-4), "score", extend=3)
    assert beyond["lr"] == pytest.approx(1e-4, rel=1e-9) and beyond["extended"] == 3 and not beyond["edge"]  # 1e-4 confirmed by 3e-5
    far = runner.tune("t3", "adam", 1e-2, 5, [0, 1], quadratic(1e-9), "score", extend=2)
    assert far["edge"] and far["extended"] == 2 and len(far["scores"]) == 7
    diverging = runner.tune("t4", "adam", 1e-1, 5, [0], quadratic(10.0), "score", extend=3)
    assert diverging["scores"]["3.16"] == [None] and diverging["lr"] == pytest.approx(1.0, rel=1e-9) and not diverging["edge"]
    everything = runner.tune("t5", "adam", 1e2, 3, [0], quadratic(1e-3), "score", extend=12)
    # 31.6, 100 and 316 diverge; the sweep walks down (10 rates) until 1e-3 beats both neighbours.
    assert everything["lr"] == pytest.approx(1e-3, rel=1e-9) and not everything["edge"] and everything["extended"] == 10
    assert min(float(r) for r in everything["scores"]) == pytest.approx(10 ** -3.5, rel=1e-3)
    n = len(calls)
    assert runner.tune("t", "adam", 1e-2, 5, [0, 1], quadratic(1e-2), "score") is inside and len(calls) == n  # cached


# ---------------------------------------------------------------------------------------------
# The char-LM text (package data)


def test_packaged_corpus_is_the_text_of_the_committed_report():
    """The packaged text has the length the committed report's run recorded (corpus_characters in
    records/reproduce.json): the report's char-LM numbers come from this text, whatever the
    documentation says today."""
    from precond_ref.compare.reproduce import corpus

    data = json.loads((ROOT / "records" / "reproduce.json").read_text())
    text = corpus.text()
    assert len(text) == data["corpus_characters"]
    assert "precond" in text and "\r" not in text


def test_packaged_corpus_is_readme_and_docs_at_the_pinned_commit():
    """``corpus.txt.gz`` is exactly README.md and docs/**/*.md (less docs/reproduce.md) of
    ``corpus.REVISION``, joined as the experiments joined them: the file is what its docstring says,
    and ``python -m precond_ref.compare.reproduce.corpus`` would write it again unchanged. Needs
    this repository's git history (skipped in a shallow clone or outside a checkout)."""
    import shutil
    import subprocess

    from precond_ref.compare.reproduce import corpus

    if shutil.which("git") is None:
        pytest.skip("no git")
    found = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{corpus.REVISION}^{{commit}}"], capture_output=True)
    if found.returncode != 0:
        pytest.skip(f"commit {corpus.REVISION[:12]} is not in this checkout's history")
    assert corpus.text() == corpus.from_git(ROOT)


# ---------------------------------------------------------------------------------------------
# The command at --quick size (every paper's experiment)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    from precond_ref.cli import main

    out = tmp_path_factory.mktemp("reproduce")
    assert main(["reproduce", "--quick", "--out", str(out), "--no-progress"]) == 0
    return out, json.loads((out / "reproduce.json").read_text())


def test_quick_run_covers_every_paper_with_a_verdict_per_claim(quick_run):
    from precond_ref.compare.reproduce import PAPER_NAMES, corpus

    out, data = quick_run
    assert list(data["papers"]) == list(PAPER_NAMES)
    assert data["corpus_characters"] == len(corpus.text())  # the char LM read the packaged text
    for name, paper in data["papers"].items():
        assert paper["claims"], name
        for claim in paper["claims"]:
            assert claim["verdict"] in V.VERDICTS, claim
            assert claim["source"] and claim["paper_figure"] and claim["ours"] and claim["rule"], claim
        assert paper["hyperparameters"], name
        assert (out / f"reproduce_{name}.png").stat().st_size > 1000


def test_quick_run_verdicts_follow_from_the_stored_numbers(quick_run):
    """Re-deciding single-rule claims from the JSON's per-seed values gives the stored verdicts; the
    GPU-time claims are not testable on the CPU run."""
    _, data = quick_run
    seeds = len(data["settings"]["seeds"])
    asgo1 = data["papers"]["asgo"]["claims"][0]
    assert len(asgo1["values"]["per_seed"]) == len(data["settings"]["lm_seeds"])
    rule = V.Threshold("the median (over checkpoints and block weights) of stable rank / min(m, n)", 0.1, below=True)
    assert asgo1["rule"] == rule.describe() and rule.decide(asgo1["values"]["per_seed"]) == asgo1["verdict"]
    assert asgo1["premise"]
    sk4 = next(c for c in data["papers"]["sketchy"]["claims"] if c["id"] == "Sketchy-4")
    ordering = V.Ordering(f"S-AdaGrad (rank {data['settings']['config']['oco_rank']})", "diagonal AdaGrad")
    assert sk4["rule"] == ordering.describe()
    assert ordering.decide(sk4["values"]["s_adagrad"], sk4["values"]["diag"]) == sk4["verdict"]
    assert sk4["evidence"][0]["n"] == seeds
    sk7 = next(c for c in data["papers"]["sketchy"]["claims"] if c["id"] == "Sketchy-7")
    memory, loss = sk7["values"]["second_moment_bytes"], sk7["values"]["test_loss"]
    ranks = sorted(int(k.split()[-1]) for k in memory if k.startswith("sketchy rank"))
    # The matched-memory rank is the one whose sketches are closest in bytes to one-sided Shampoo's factors.
    matched = min(ranks, key=lambda k: abs(memory[f"sketchy rank {k}"] - memory["shampoo1"]))
    assert sk7["values"]["matched_rank"] == matched and len(ranks) >= 2
    parts = [(V.Ordering(f"Sketchy rank {ranks[-1]}", f"Sketchy rank {ranks[0]}"), loss[f"sketchy rank {ranks[-1]}"],
              loss[f"sketchy rank {ranks[0]}"]),
             (V.MatchesOrBeats(f"Sketchy rank {matched}", "one-sided Shampoo", 0.02), loss[f"sketchy rank {matched}"],
              loss["shampoo1"])]
    assert sk7["rule"] == "every part: " + "; ".join(rule.describe() for rule, *_ in parts)
    assert V.combine([rule.decide(*values) for rule, *values in parts]) == sk7["verdict"]
    sk3 = next(c for c in data["papers"]["sketchy"]["claims"] if c["id"] == "Sketchy-3")
    assert all(len(sk3["values"][k]) == seeds for k in ("s_adagrad", "full", "diag"))
    claims = {c["id"]: c for paper in data["papers"].values() for c in paper["claims"]}
    for cid in ("MBF-2", "MBF-3"):  # the better first-order baseline (by median) matched within 5%
        values = claims[cid]["values"]
        best = min(("adam", "sgd_momentum"), key=lambda m: sorted(values[m])[len(values[m]) // 2] if len(values[m]) % 2
                   else sum(sorted(values[m])[len(values[m]) // 2 - 1 : len(values[m]) // 2 + 1]) / 2)
        label = {"adam": "Adam", "sgd_momentum": "SGD-momentum"}[best]
        rule = V.MatchesOrBeats("MBF", f"the better of Adam and SGD-m ({label})", 0.05)
        assert claims[cid]["rule"] == rule.describe(), cid
        assert all(len(values["failed"][m]) == seeds for m in ("mbf", "adam", "sgd_momentum")), cid
        if all(v is not None and math.isfinite(v) for side in (values["mbf"], values[best]) for v in side):
            assert rule.decide(values["mbf"], values[best]) == claims[cid]["verdict"], cid
    for cid in ("ASGO-3", "MBF-1", "MBF-4"):
        assert claims[cid]["verdict"] == V.NOT_TESTABLE, cid
    for cid, claim in claims.items():
        assert claim["caveat"], cid
        assert "specs/" not in claim["source"] + claim["paper_figure"] + claim["ours"], cid


def test_cuda_device_is_refused_clearly_without_cuda(capsys):
    """``--device cuda`` on a machine without CUDA stops before any work with one line naming the
    device and the fix (``--device cpu``); with CUDA it is accepted (the GPU-time claims then run)."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: --device cuda is accepted")
    from precond_ref.cli import main

    assert main(["reproduce", "--quick", "--device", "cuda", "--out", "/nonexistent-not-written"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda needs CUDA" in err and "Traceback" not in err
    assert main(["reproduce", "--size", "large", "--out", "/nonexistent-not-written"]) == 2
    assert "pass --device cpu" in capsys.readouterr().err


def test_quick_run_markdown_is_the_rendering_of_its_json(quick_run):
    from precond_ref.compare.reproduce import report

    out, data = quick_run
    json_path = str(out / "reproduce.json")
    page = (out / "reproduce.md").read_text()
    assert page == report.render(data, "", json_path)
    assert f"Every number above is in `{json_path}`" in page and "is in `records/reproduce.json`" not in page


def test_quick_run_says_first_that_its_verdicts_are_a_smoke_test(quick_run):
    """A --quick run's verdicts come from seconds of training: what it prints above them says so."""
    from precond_ref.compare.reproduce import report

    _, data = quick_run
    lines = report.summary_lines(data)
    assert lines[0] == report.QUICK_NOTE and "smoke test" in lines[0] and "mean nothing" in lines[0]
    assert all("quick" not in line for line in report.summary_lines({**data, "settings": {**data["settings"], "size": "default"}}))


def test_bad_paper_name_is_a_one_line_error(capsys):
    from precond_ref.cli import main

    assert main(["reproduce", "--paper", "adam"]) == 2
    err = capsys.readouterr().err
    assert "unknown paper(s) 'adam'" in err and "asgo" in err and "Traceback" not in err


def test_missing_torch_names_the_extras(monkeypatch, capsys, tmp_path):
    """Without torch the command stops before any work with the install command (no traceback)."""
    import sys

    from precond_ref.cli import main

    for module in ("numpy", "sklearn", "tqdm", "threadpoolctl", "matplotlib"):  # present: only torch is missing
        pytest.importorskip(module)
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    assert main(["reproduce", "--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "needs torch" in err and 'pip install -e ".[compare,torch]"' in err


# ---------------------------------------------------------------------------------------------
# The committed report


def test_committed_report_is_the_rendering_of_the_committed_json():
    """docs/reproduce.md is exactly what ``reproduce --docs`` renders from records/reproduce.json,
    from the default command (its output folder and progress display aside: neither changes a
    number); the run time it states is the one the run measured."""
    import argparse

    from precond_ref.compare.reproduce import PAPER_NAMES, add_arguments, report

    data = json.loads((ROOT / "records" / "reproduce.json").read_text())
    assert (ROOT / "docs" / "reproduce.md").read_text() == report.render(data, "images/")
    argv = shlex.split(data["command_line"])
    assert argv[:4] == ["python", "-m", "precond_ref", "reproduce"]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args, defaults = vars(parser.parse_args(argv[4:])), vars(parser.parse_args([]))
    output_only = ("docs", "out", "no_progress")
    assert args["docs"] and {k: v for k, v in args.items() if k not in output_only} == {
        k: v for k, v in defaults.items() if k not in output_only
    }
    assert list(data["papers"]) == list(PAPER_NAMES) and data["settings"]["size"] == "default"
    assert data["settings"]["threads"] == 1
    page = (ROOT / "docs" / "reproduce.md").read_text()
    assert f"{data['wall_s'] / 60:.1f} minutes of wall time" in page and "30 minutes" not in page
    for name in PAPER_NAMES:
        assert (ROOT / "docs" / "images" / f"reproduce_{name}.png").exists()


def test_committed_report_meets_the_evidence_standard():
    """The evidence standard: every verdict's rule reads a paired interval over >= 20 seeds (char LM
    >= 8); every tuned rate comes from >= 3 grid points scored over tuning seeds that are no
    evaluation seed, with every score kept, and ends inside its grid or is flagged on the page;
    every claim cites its paper's abstract or is marked secondary; no source points outside the
    repository."""
    data = json.loads((ROOT / "records" / "reproduce.json").read_text())
    page = (ROOT / "docs" / "reproduce.md").read_text()
    settings = data["settings"]
    assert len(settings["seeds"]) >= 20 and len(settings["lm_seeds"]) >= 8
    evaluated = set(settings["seeds"]) | set(settings["lm_seeds"])
    for paper in data["papers"].values():
        for claim in paper["claims"]:
            # The paper's own words (its abstract, checked), unless the claim is marked secondary.
            assert claim["secondary"] or "abstract" in claim["source"], claim["id"]
            for part in claim["evidence"]:
                if part["verdict"] != V.NOT_TESTABLE and "n" in part:
                    assert part["n"] >= (8 if claim["lm"] else 20), claim["id"]
        for record in paper["tuning"]:
            assert record["tuned"] and len(record["scores"]) >= 3 and not set(record["seeds"]) & evaluated, record
            assert all(len(v) == len(record["seeds"]) for v in record["scores"].values())
            if record["edge"]:
                assert f"{record['lr']:.3g} ⚠ at the edge" in page
    assert "specs/" not in page


def test_committed_json_is_fresh():
    """Freshness: each evaluated configuration's fingerprint in records/reproduce.json (its first
    seed's first losses, rerun in float64 where the run is float32, 12 significant digits) is what the
    code computes now, within the rounding model's tolerance (``harness.fingerprint_tolerance``; the
    losses rounding cannot decide, test below); otherwise the claims to regenerate are named.
    float64, so that it holds on every CPU: a float32 run's first losses move by up to 1e-2 between
    two CPUs' BLAS kernels (``harness.fingerprint_dtype``)."""
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    from precond_ref.compare.reproduce import papers

    data = json.loads((ROOT / "records" / "reproduce.json").read_text())
    assert data.get("fingerprints"), "records/reproduce.json has no fingerprints: regenerate it (reproduce --docs)"
    moved = papers.stale(data)
    claims = sorted({c["id"] for record, _ in moved for name in record["papers"] for c in data["papers"][name]["claims"]})
    assert not moved, (f"the code's numbers moved for {len(moved)} configuration(s) "
                       f"({', '.join(sorted({r['opt'] + ' on ' + r['task'] for r, _ in moved}))}): regenerate "
                       f"{', '.join(claims)} (python -m precond_ref reproduce --docs)")


def test_committed_json_is_fresh_with_torch_kernels_for_a_cpu_without_avx2():
    """The freshness test's check with torch's kernels for an x86-64 CPU without AVX2
    (``ATEN_CPU_CAPABILITY=default``, in a fresh interpreter): the JSON holds there too. torch's
    float32 normal and uniform draws are computed by other kernels there than on an AVX2 CPU, a
    rounding unit apart, and the runs' initial parameters and synthetic inputs drawn so moved the
    float64 fingerprints of twelve configurations (the char LM's and the synthetic problems') by up
    to 3.6e-6, beyond the tolerance: the runs draw in float64 and round to float32
    (``harness._cpu_independent``)."""
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    code = (
        "import json, sys, torch\n"
        "from precond_ref.compare.reproduce import papers\n"
        "moved = papers.stale(json.loads(open(sys.argv[1]).read()))\n"
        "print(json.dumps([torch.backends.cpu.get_cpu_capability(), sorted(f\"{r['opt']} on {r['task']}\" for r, _ in moved)]))\n"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    run = subprocess.run([sys.executable, "-c", code, str(ROOT / "records" / "reproduce.json")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    capability, moved = json.loads(run.stdout.splitlines()[-1])
    assert capability == "DEFAULT"
    assert moved == [], f"the code's numbers moved with torch's kernels for a CPU without AVX2: {moved}"


def test_freshness_compares_the_losses_that_rounding_cannot_decide(monkeypatch):
    """A float64 fingerprint whose recomputation differs is compared again on its leading losses
    that a one-unit nudge of the learning rate moves by at most the tolerance over
    ``config.NUDGE_MARGIN`` (``papers.conditioned_steps``): past them a configuration amplifies
    rounding so much that another CPU's kernels decide the digits (ASGO's Algorithm 1 did so on a
    sample of the rank-1 problem: its fifth loss moved by 5e-8 between BLAS kernels, beyond the
    tolerance 1.5e-8). With a recomputation whose fifth loss the nudge moves by 1e-9, a 1e-7 move
    of that loss is not named, while a 1e-6 move of its first loss, and a 1e-7 move of the fifth
    loss of a run that the nudge leaves alone, are: a change of the code is named either way; so is
    a recomputation with fewer losses than were saved. On
    the committed JSON, the first loss of each of Algorithm 1's runs is compared."""
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    from precond_ref.compare.reproduce import papers

    data = json.loads((ROOT / "records" / "reproduce.json").read_text())
    theory = [r for r in data["fingerprints"] if r["opt"] == "asgo_theory"]
    assert theory and all(papers.conditioned_steps(r, papers.fingerprint(r)) >= 1 for r in theory)

    def recomputed(recipe: dict) -> list:
        """The losses the code computes for ``recipe``: its ``computed`` ones, the fifth moved by
        ``reach`` relative when the learning rate is nudged."""
        losses = list(recipe["computed"])
        if recipe["lr"] != theory[0]["lr"]:
            losses[4] *= 1 + recipe["reach"]
        return losses

    monkeypatch.setattr(papers, "fingerprint", recomputed)
    computed = [float(v) for v in theory[0]["losses"]]
    ill = {**theory[0], "computed": computed, "reach": 1e-9}
    well = {**ill, "reach": 0.0}
    assert papers.conditioned_steps(ill, computed) == 4 and papers.conditioned_steps(well, computed) == 5

    def moved(record: dict, step: int, by: float) -> dict:
        losses = list(record["losses"])
        losses[step] *= 1 + by
        return {**record, "losses": losses}

    def named(*records: dict) -> list:
        return [record["losses"] for record, _ in papers.stale({"fingerprints": list(records)})]

    assert named(ill, well) == []
    assert named(moved(ill, 4, 1e-7)) == []  # rounding's reach at that loss
    for record in (moved(ill, 0, 1e-6), moved(well, 4, 1e-7), moved(well, 0, 1e-6)):
        assert named(record) == [record["losses"]]
    short = {**well, "computed": computed[:-1]}  # the code computes fewer losses than were saved
    assert named(short) == [short["losses"]]


def test_claims_option_runs_only_the_named_claims_and_quick_says_smoke_first(tmp_path, capsys):
    """``--claims ASGO-4`` runs that claim alone; a ``--quick`` run's first printed line says its
    verdicts are a smoke test; an unknown claim id is a one-line error."""
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    from precond_ref.cli import main
    from precond_ref.compare.reproduce import SMOKE_LINE

    assert main(["reproduce", "--quick", "--claims", "asgo-4", "--out", str(tmp_path), "--no-progress", "--no-plot"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == SMOKE_LINE
    data = json.loads((tmp_path / "reproduce.json").read_text())
    assert list(data["papers"]) == ["asgo"] and [c["id"] for c in data["papers"]["asgo"]["claims"]] == ["ASGO-4"]
    assert (tmp_path / "reproduce.md").read_text().startswith("**SMOKE TEST")
    assert main(["reproduce", "--quick", "--claims", "ASGO-x", "--out", str(tmp_path)]) == 2
    assert "not a claim id" in capsys.readouterr().err


def _run_json(papers: dict, wall: float, cpu: float) -> dict:
    """A run's JSON with the fields ``--merge`` reads: ``papers`` maps a paper to its claim ids."""
    return {
        "command_line": "python -m precond_ref reproduce --claims " + ",".join(i for ids in papers.values() for i in ids),
        "settings": {"size": "default", "papers": list(papers), "claims": [i for ids in papers.values() for i in ids]},
        "versions": {}, "machine": {}, "wall_s": wall, "cpu_s": cpu, "corpus_characters": None,
        "papers": {name: {"claims": [{"id": i} for i in ids], "hyperparameters": ["shared", name + " " + ids[0]],
                          "tuning": [{"method": "Adam", "task": name}],
                          "panels": [{"title": name, "series": {"a": {"mean": [1.0] * len(ids)}}}],
                          "wall_s": wall, "cpu_s": cpu} for name, ids in papers.items()},
        "fingerprints": [{"task": "digits", "opt": "adam", "lr": 0.1, "losses": [1.0], "papers": list(papers)}],
    }


def test_merge_of_claim_groups_is_the_run_they_split():
    """``--merge``: runs of disjoint claim groups (one paper's claims split between two runs) merge
    into one run: claims in their order, each tuning record, hyperparameter line and fingerprint
    once, the fullest panel of a title, a paper's time the sum of its runs', the run's wall time
    the longest run's and its CPU time the sum; a claim in two runs is refused."""
    from precond_ref.cli import UserError
    from precond_ref.compare.reproduce import merge_shards

    first = _run_json({"asgo": ["ASGO-4"], "root_free": ["RootFree-4"]}, 10.0, 5.0)
    second = _run_json({"root_free": ["RootFree-1", "RootFree-2"], "agd": ["AGD-1"]}, 20.0, 7.0)
    merged = merge_shards([first, second])
    assert list(merged["papers"]) == ["asgo", "root_free", "agd"]
    root_free = merged["papers"]["root_free"]
    assert [c["id"] for c in root_free["claims"]] == ["RootFree-1", "RootFree-2", "RootFree-4"]
    assert root_free["tuning"] == [{"method": "Adam", "task": "root_free"}]
    assert root_free["hyperparameters"] == ["shared", "root_free RootFree-4", "root_free RootFree-1"]
    assert [p["series"]["a"]["mean"] for p in root_free["panels"]] == [[1.0, 1.0]]  # the fuller panel
    assert (root_free["wall_s"], root_free["cpu_s"]) == (30.0, 12.0)
    assert (merged["wall_s"], merged["cpu_s"]) == (20.0, 12.0) and len(merged["shards"]) == 2
    assert len(merged["fingerprints"]) == 1 and merged["fingerprints"][0]["papers"] == ["asgo", "root_free", "agd"]
    assert merged["command_line"] == "python -m precond_ref reproduce --docs"
    with pytest.raises(UserError, match="more than one run"):
        merge_shards([first, first])
