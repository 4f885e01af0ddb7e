"""compare_trajectories: the first diverging step, parameter and index, and by how much."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import precond_ref.testing as prt


@pytest.fixture(scope="module")
def reference():
    return prt.reference_trajectory("agd", "mlp", 5, {"learning_rate": 1e-2})


def _numpy_copy(traj):
    return [copy.deepcopy(p) for p in traj.params]


def test_identical_trajectories_agree(reference):
    comparison = prt.compare_trajectories(reference, _numpy_copy(reference))
    assert comparison.ok and bool(comparison) and comparison.first_divergence is None
    assert comparison.max_abs_error == [0.0] * 6
    assert "agree on 6 parameter sets" in str(comparison)


def test_reports_first_step_leaf_and_index(reference):
    candidate = _numpy_copy(reference)
    for t in range(3, 6):  # a perturbation introduced at step 3 that persists
        candidate[t]["fc2"]["weight"][1, 7] += 1e-3
        candidate[t]["fc1"]["bias"][2] -= 1e-3 if t > 3 else 0.0
    comparison = prt.compare_trajectories(reference, candidate)
    d = comparison.first_divergence
    assert not comparison.ok
    assert (d.step, d.path, d.index) == (3, "fc2/weight", (1, 7))
    assert d.count == 1
    assert d.abs_error == pytest.approx(1e-3, rel=1e-6)
    assert d.reference == reference.params[3]["fc2"]["weight"][1, 7]
    text = str(comparison)
    assert "step 3 (after update 3): parameter 'fc2/weight' at index (1, 7)" in text
    assert "<- first divergence" in text
    assert comparison.max_abs_error[2] == 0.0 and comparison.max_abs_error[3] == pytest.approx(1e-3, rel=1e-6)


def test_leaf_order_decides_within_a_step(reference):
    candidate = _numpy_copy(reference)
    candidate[2]["fc2"]["bias"][0] += 1.0
    candidate[2]["fc1"]["weight"][3, 1] += 1.0
    d = prt.compare_trajectories(reference, candidate).first_divergence
    assert (d.step, d.path, d.index, d.count) == (2, "fc1/weight", (3, 1), 2)


def test_tolerances(reference):
    candidate = _numpy_copy(reference)
    candidate[1]["fc1"]["weight"] *= 1 + 1e-8
    assert not prt.compare_trajectories(reference, candidate).ok  # float64 default rtol 1e-10
    assert prt.compare_trajectories(reference, candidate, rtol=1e-7).ok
    assert prt.default_tolerances("float32") == (1e-5, 1e-7)


def test_nonfinite_candidate_diverges(reference):
    candidate = _numpy_copy(reference)
    candidate[4]["fc1"]["weight"][0, 0] = np.nan
    d = prt.compare_trajectories(reference, candidate).first_divergence
    assert (d.step, d.path, d.index) == (4, "fc1/weight", (0, 0))
    same = _numpy_copy(reference)
    assert prt.compare_trajectories(same, same).ok


def test_matching_nonfinite_elements_count_as_no_difference():
    """An element that is the same NaN or infinity in both trajectories (parameter or loss) agrees and
    counts as difference 0 in the report; one that is not finite in one run only counts as infinite."""
    traj = [{"w": np.array([1.0, 2.0])}, {"w": np.array([1.1, np.inf])}, {"w": np.array([1.2, np.nan])}]
    same = prt.compare_trajectories(traj, traj, rtol=0, atol=0)
    assert same.ok and same.max_abs_error == [0.0, 0.0, 0.0] and same.max_rel_error == [0.0, 0.0, 0.0]
    assert "max relative difference 0.000e+00" in str(same) and "inf" not in str(same)
    finite = [{"w": np.array([1.0, 2.0])}, {"w": np.array([1.1, 3.0])}, {"w": np.array([1.2, 4.0])}]
    mismatch = prt.compare_trajectories(traj, finite)
    assert not mismatch.ok and mismatch.first_divergence.step == 1
    assert mismatch.max_abs_error[1:] == [np.inf, np.inf] and mismatch.max_rel_error[1:] == [np.inf, np.inf]
    reference = prt.reference_trajectory("agd", "quadratic", 2, {"learning_rate": 1e-2})
    with_nan = prt.Trajectory(**{**vars(reference), "losses": [reference.losses[0], np.nan, np.inf]})
    assert prt.compare_trajectories(with_nan, with_nan).loss_abs_error == [0.0, 0.0, 0.0]
    assert prt.compare_trajectories(reference, with_nan).loss_abs_error[1:] == [np.inf, np.inf]


def test_length_and_structure_mismatches(reference):
    short = _numpy_copy(reference)[:3]
    comparison = prt.compare_trajectories(reference, short)
    assert not comparison.ok and comparison.first_divergence is None and comparison.steps_compared == 3
    assert "lengths differ: reference has 6 parameter sets, candidate 3" in str(comparison)
    with pytest.raises(ValueError, match="different parameters"):
        prt.compare_trajectories(reference, [{"w": np.zeros(2)}])
    bad = _numpy_copy(reference)
    bad[0]["fc1"]["weight"] = np.zeros(3)
    with pytest.raises(ValueError, match="has shape"):
        prt.compare_trajectories(reference, bad)
    with pytest.raises(TypeError, match="sequence of parameter trees"):
        prt.compare_trajectories(reference, 3)


def test_assert_raises_with_the_report(reference):
    candidate = _numpy_copy(reference)
    candidate[5]["fc2"]["bias"][1] = 7.0
    with pytest.raises(AssertionError, match=r"step 5 \(after update 5\): parameter 'fc2/bias' at index \(1,\)"):
        prt.assert_trajectories_close(reference, candidate)


def test_backend_arrays_are_accepted(reference, backend):
    traj = prt.reference_trajectory("agd", "mlp", 5, {"learning_rate": 1e-2}, xp=backend.xp)
    comparison = prt.compare_trajectories(reference, traj.params)
    assert comparison.ok, str(comparison)
