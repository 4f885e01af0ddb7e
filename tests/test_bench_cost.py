"""The cost model of ``bench`` (precond_ref.benchmarks.cost) against counts done by hand on small shapes.

Every expected number below is written out from the conventions of the module docstring (a product
of m x k by k x n is 2mnk flops, eigh 9k^3, LU inverse 2n^3, a pass over an n-element array is n
elements of traffic, a part refreshed every T steps counts 1/T in the mean); they are exact
integers or ratios, so the comparisons are exact up to float64 rounding of sums of a few terms.
"""

from __future__ import annotations

import math

import pytest

from precond_ref.benchmarks import cost


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)


def test_adamw_and_elementwise_methods_count_seven_passes():
    params = [("w", (3, 4)), ("b", (3,))]
    for fn in (cost.adamw, cost.agd, cost.rf_adamw, cost.dasgo):
        c = fn(params, 4)
        assert c.flops == 0.0 and c.bytes == 7 * 4 * 15, fn.__name__
    assert cost.rf_rmsprop(params, 8, momentum=0.0).bytes == 5 * 8 * 15
    assert cost.rf_rmsprop(params, 8, momentum=0.9).bytes == 7 * 8 * 15


def test_asgo_counts_products_root_and_passes():
    # (2, 5): left side k = 2, other side 5. Statistic 2*2*2*5 = 40, direction 40, eigh 9*8 = 72.
    c = cost.asgo([("w", (2, 5))], 4, precondition_every=1)
    assert close(c.flops, 40 + 40 + 72)
    assert close(c.bytes, 5 * 4 * 4 + 4 * 4 * 4 + 8 * 10 * 4)  # statistic, root, element-wise
    c4 = cost.asgo([("w", (2, 5)), ("b", (2,))], 4, precondition_every=4)
    assert close(c4.flops, 80 + 72 / 4)
    assert close(c4.bytes, 80 + 320 + 64 / 4 + 7 * 2 * 4)  # + the bias's fallback AdamW
    assert c4.period == 4 and close(c4.peak_flops, 152)


def test_asgo_blocks_and_gpu_iteration():
    # (5, 7), block 2: k = 5 in chunks 2, 2, 1 against the other side 7.
    c = cost.asgo([("w", (5, 7))], 4, block_size=2)
    assert close(c.parts["statistic X X^T"][1], 2 * 7 * (4 + 4 + 1))
    assert close(c.parts["root (eigh)"][1], 9 * (8 + 8 + 1))
    # On a GPU, float32: 10 Polar-Express steps of 3 products of 2 b^3.
    g = cost.asgo([("w", (2, 5))], 4, device="cuda")
    assert close(g.parts["root (iteration)"][1], 10 * 3 * 2 * 8)
    # float64 roots by eigh on every device.
    assert "root (eigh)" in cost.asgo([("w", (2, 5))], 8, device="cuda").parts
    # The factory's default (None): auto in principled mode, Polar-Express in faithful mode.
    assert "root (eigh)" in cost.asgo([("w", (2, 5))], 4, root_method=None).parts
    assert "root (iteration)" in cost.asgo([("w", (2, 5))], 4, root_method=None, mode="faithful").parts
    from precond_ref.compare.methods import entry_by_name

    assert "root (eigh)" in cost.method_cost(entry_by_name("asgo"), [("w", (2, 5))], 4, "cpu").parts


def test_if_shampoo_dense_and_diagonal_axes():
    # (3, 4), refresh every 2: precondition 4*3*12 + 4*4*12 = 336; factor step (4*3*12 + 4*27) + (4*4*12 + 4*64) = 700.
    c = cost.if_shampoo([("w", (3, 4))], 4, precondition_every=2)
    assert close(c.flops, 336 + 700 / 2)
    assert close(c.bytes, 8 * (9 + 16) * 4 / 2 + 11 * 12 * 4)
    d = cost.if_shampoo([("w", (3, 4))], 4, precondition_every=2, max_dense_dim=3)  # axis 4 diagonal
    assert close(d.flops, 4 * 3 * 12 + (4 * 3 * 12 + 4 * 27) / 2)
    assert close(d.bytes, 8 * 9 * 4 / 2 + 2 * 12 * 4 + (2 * 12 + 8 * 4) * 4 / 2 + 11 * 12 * 4)
    # bf16 factors halve the factor traffic only.
    h = cost.if_shampoo([("w", (3, 4))], 4, precondition_every=2, factor_itemsize=2)
    assert close(h.bytes, 8 * 25 * 2 / 2 + 11 * 12 * 4) and close(h.flops, c.flops)


def test_mbf_fc_with_bias_and_conv_blocks():
    # FC (3, 4) + bias: block (3, 5). Direction 2*9*5 = 90, statistic 90 every 2, inverse 2*27 every 4.
    c = cost.mbf([("fc.weight", (3, 4)), ("fc.bias", (3,))], 4, statistics_every=2, precondition_every=4)
    assert close(c.flops, 90 + 90 / 2 + 54 / 4)
    assert close(c.bytes, 3 * 9 * 4 / 2 + 6 * 9 * 4 / 4 + 7 * 15 * 4)
    # Conv (2, 3, 2, 2): 6 blocks of 4 x 4.
    k = cost.mbf([("conv.weight", (2, 3, 2, 2))], 4, statistics_every=2, precondition_every=4)
    assert close(k.flops, 6 * 2 * 64 / 4)
    assert close(k.bytes, 6 * 16 * 4 + 3 * 96 * 4 / 2 + 6 * 96 * 4 / 4 + 7 * 24 * 4)
    # Faithful mode has no KL clip: 5 passes; a LayerNorm weight takes the diagonal rule (7 passes).
    f = cost.mbf([("ln.weight", (3,))], 4, mode="faithful")
    assert f.bytes == 7 * 3 * 4 and f.flops == 0


def test_fd_update_paths():
    # incremental (k + m < d): d 10, k 2, m 3
    qr = 2 * 10 * 9 - 2 * 27 / 3
    svd = 6 * 5 * 25 + 20 * 125
    assert close(cost.fd_update_flops(10, 2, 3, "auto"), 8 * 10 * 2 * 3 + qr + svd + 2 * 10 * 5 * 2)
    # gram (k + m >= d, short axis): d 4, k 2, m 3
    assert close(cost.fd_update_flops(4, 2, 3, "auto"), 2 * 16 * 5 + 9 * 64)
    # subspace (long axis): d 300, k 8, m 400, width 12
    d, k, m, w = 300, 8, 400, 12
    expected = (2 * d * m * (w - k) + 4 * d * k * w + 4 * d * m * w + (2 * d * w * w - 2 * w**3 / 3) + 2 * d * k * w
                + 2 * d * m * w + 2 * w * w * (k + m) + 9 * w**3 + 2 * d * w * k)
    assert close(cost.fd_update_flops(d, k, m, "auto"), expected)
    # the authors' thin SVD of d x (k+m)
    assert close(cost.fd_update_flops(4, 2, 3, "svd"), 6 * 5 * 16 + 20 * 64)
    # incremental_gram: the core's Gram (2 * 5^3) and eigh (9 * 5^3) in place of its SVD; where
    # k + m >= d it is the Gram path, as "incremental" is the SVD there
    assert close(cost.fd_update_flops(10, 2, 3, "incremental_gram"), 8 * 10 * 2 * 3 + qr + 2 * 125 + 9 * 125 + 2 * 10 * 5 * 2)
    assert close(cost.fd_update_flops(4, 2, 3, "incremental_gram"), cost.fd_update_flops(4, 2, 3, "gram"))
    assert close(cost.fd_update_flops(4, 2, 3, "incremental"), cost.fd_update_flops(4, 2, 3, "svd"))


def test_sketchy_and_s_adagrad():
    # (4, 6) kept as two axes (merge_dims 4): axis 0 d 4, m 6 -> gram; axis 1 d 6, m 4 -> gram.
    c = cost.sketchy([("w", (4, 6))], 4, rank=2, merge_dims=4)
    assert close(c.flops, (2 * 16 * 8 + 9 * 64) + (2 * 36 * 6 + 9 * 216) + 2 * (4 * 24 * 2))
    assert close(c.bytes, (11 + 3 * 2) * 24 * 4)
    assert cost.sketchy([("b", (4,))], 4, rank=2).flops == 0  # 1-D: graft only
    # S-AdaGrad: (3, 4) flattened to 12, rank 2, one column: incremental; the 12 x 2 basis read
    # or written 9 times (7 by the update, 2 by the apply) besides the 5 element-wise passes.
    s = cost.s_adagrad([("w", (3, 4))], 4, rank=2)
    inc = 8 * 12 * 2 + (2 * 12 - 2 / 3) + (6 * 27 + 20 * 27) + 2 * 12 * 3 * 2
    assert close(s.flops, inc + 4 * 12 * 2) and close(s.bytes, 5 * 12 * 4 + 9 * 12 * 2 * 4)
    # every 3 steps: the update's 7 passes a third of the steps, the apply's 2 every step
    assert close(cost.s_adagrad([("w", (3, 4))], 4, rank=2, precondition_every=3).bytes,
                 5 * 12 * 4 + (7 / 3 + 2) * 12 * 2 * 4)
    # faithful: the SVD path, its passes not counted; the apply's are
    assert close(cost.s_adagrad([("w", (3, 4))], 4, rank=2, mode="faithful").bytes, 5 * 12 * 4 + 2 * 12 * 2 * 4)


def test_forward_backward_gpt_tiny():
    size = {"layers": 1, "width": 16, "heads": 2, "vocab": 64, "batch": 2, "seq": 8}
    linear = 12 * 16 * 16 + 16 * 64
    forward = 2 * linear * 16 + 4 * 8 * 16 * 16
    assert close(cost.forward_backward("gpt", size).flops, 3 * forward)


def test_faster_rates_keep_each_rates_higher_measurement():
    """Load elsewhere can only lower a measured rate: of two measurements each rate keeps its higher
    (the matmul's from one, the copy's from the other), and says how many it is the best of."""
    first = {"matmul_flops_per_s": 1e11, "copy_bytes_per_s": 3e10, "matmul": "m", "copy": "c", "device": "cpu"}
    second = {**first, "matmul_flops_per_s": 2e11, "copy_bytes_per_s": 2e10}
    both = cost.faster_rates(first, second)
    assert (both["matmul_flops_per_s"], both["copy_bytes_per_s"], both["measured"]) == (2e11, 3e10, 2)
    assert both["matmul"] == "m" and cost.faster_rates(both, first)["measured"] == 3


def test_predicted_seconds_is_the_sum():
    c = cost.Cost({"a": (1, 2e9, 0.0), "b": (2, 0.0, 4e9)})
    assert close(cost.predicted_seconds(c, matmul_rate=1e9, copy_rate=1e9), 2.0 + 2.0)


def test_every_method_has_a_cost_with_its_bench_period():
    """The mean is over the method's longest interval: the same number bench's window uses."""
    from precond_ref.benchmarks.common import refresh_period
    from precond_ref.compare.methods import METHODS

    params = [("fc.weight", (8, 6)), ("fc.bias", (8,))]
    for entry in METHODS:
        if entry.is_baseline:
            continue
        c = cost.method_cost(entry, params, 4)
        assert c is not None, entry.name
        assert c.bytes > 0
        if entry.name in ("asgo", "if_shampoo", "mbf"):
            assert c.period == refresh_period(entry), entry.name


def test_unknown_method_has_no_cost():
    class Entry:
        name, factory = "nothing", "asgo"

    assert cost.method_cost(Entry(), [("w", (2, 2))], 4) is None
