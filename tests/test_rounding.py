"""precond_ref.engine.rounding: stochastic rounding of float32 into bfloat16 with hashed bits."""

import numpy as np
import pytest

from precond_ref.engine.rounding import hash_bits, round_stochastic, rounding_key, salts

torch = pytest.importorskip("torch")

from array_api_compat import array_namespace  # noqa: E402

XT = array_namespace(torch.zeros(1))


def _neighbours(x: np.ndarray) -> tuple:
    """The bfloat16 values ``down``, ``up`` (float32) whose magnitudes bracket ``|x|``: the float32
    bits truncated to their upper 16, and the next bfloat16 away from zero."""
    bits = x.view(np.uint32)
    down = (bits & np.uint32(0xFFFF0000)).view(np.float32)
    up = ((bits & np.uint32(0xFFFF0000)) + np.uint32(0x10000)).view(np.float32)
    return down, up


def _round(x: np.ndarray, counter: int = 0, salt: int = 0) -> np.ndarray:
    t = torch.from_numpy(x)
    key = rounding_key(XT, torch.tensor(counter, dtype=torch.int32), t.device)
    bits = hash_bits(XT, key, salts(XT, [f"x{salt}"], t.device), t.numel(), t.device).reshape(t.shape)
    out = round_stochastic(XT, t, torch.bfloat16, bits)
    assert out.dtype == torch.bfloat16
    return out.float().numpy()


def test_bits_are_the_same_on_numpy_torch_and_jax():
    """The hash is integer arithmetic modulo 2^32 (int64 masked, or uint32 on JAX), so every backend
    gives the same 16-bit values for the same (counter, array name, place), a traced counter under
    ``jax.jit`` too; counter, name and place each change them, and an array's row does not depend
    on the arrays hashed with it."""
    names, size = ["a#0", "a#1", "b#0"], 35
    xn = array_namespace(np.zeros(1))
    want = hash_bits(xn, rounding_key(xn, np.int32(123456), None), salts(xn, names, None), size, None)
    assert want.dtype == np.int32 and want.shape == (3, size) and want.min() >= 0 and want.max() < 2**16
    key = rounding_key(XT, torch.tensor(123456, dtype=torch.int32), torch.device("cpu"))
    got = hash_bits(XT, key, salts(XT, names, torch.device("cpu")), size, torch.device("cpu"))
    np.testing.assert_array_equal(got.numpy(), want)
    np.testing.assert_array_equal(hash_bits(XT, rounding_key(XT, 123456, None), salts(XT, names, None), size, None), want)
    alone = hash_bits(XT, key, salts(XT, names[1:2], None), size, None)
    np.testing.assert_array_equal(alone.numpy()[0], want[1])
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    jitted = jax.jit(lambda c: hash_bits(jnp, rounding_key(jnp, c, None), salts(jnp, names, None), size, None))
    np.testing.assert_array_equal(np.asarray(jitted(jnp.int32(123456))), want)
    other = hash_bits(XT, rounding_key(XT, 123457, None), salts(XT, names, None), size, None).numpy()
    assert np.mean(other == want) < 0.02 and np.mean(want[0] == want[1]) < 0.02
    assert len(np.unique(want)) > 0.9 * want.size


def test_rounds_to_a_neighbour_and_keeps_the_mean():
    """round_stochastic's definition: the result is ``down`` or ``up`` (the bfloat16 neighbours of
    x), ``up`` with probability p = (x - down)/(up - down), so E[result] = x. Over n = 2^16 draws
    (one per element, hashed from its index) the share of ``up`` is within 5 binomial standard
    deviations of p, and the mean within 5 standard deviations of x; so over 512 step counters for
    one element of two of the values (the counter's hash alone varies the bits)."""
    rng = np.random.default_rng(0)
    for x0 in np.float32([1.001, -1.001, 3.14159e-3, 1 + 2.0**-9, 7.7e30, -2.5e-30]):
        down, up = _neighbours(np.array([x0], np.float32))
        p = float((np.float64(x0) - down[0]) / (np.float64(up[0]) - down[0]))
        by_counter = [np.concatenate([_round(np.array([x0], np.float32), counter=c, salt=5) for c in range(512)])
                      ] if x0 in (np.float32(1.001), np.float32(-2.5e-30)) else []
        for draws in [_round(np.full(2**16, x0, np.float32), counter=int(rng.integers(2**31)))] + by_counter:
            n = draws.size
            assert np.all((draws == down[0]) | (draws == up[0])), x0
            share = np.mean(draws == up[0])
            sd = np.sqrt(p * (1 - p) / n)
            assert abs(share - p) <= 5 * sd + 1 / n, (x0, share, p)
            gap = abs(np.float64(up[0]) - down[0])
            assert abs(np.mean(draws.astype(np.float64)) - x0) <= 5 * gap * sd + gap / n, x0


def test_representable_values_nan_and_infinities_are_kept():
    """A value that is a bfloat16 already (down = up) comes back exactly, signed zeros and
    subnormals included; ±inf stay; NaN stays NaN (its payload may not carry into the exponent)."""
    exact = np.array([0.0, -0.0, 1.0, -2.0, 0.5, 3.0, 2.0**-130, np.finfo(np.float32).tiny, 65536.0], np.float32)
    exact = _neighbours(exact)[0]
    for counter in range(20):
        got = _round(exact, counter)
        np.testing.assert_array_equal(got.view(np.uint32), exact.view(np.uint32))
    special = np.array([np.inf, -np.inf, np.nan, np.uint32(0x7F800001).view(np.float32),
                        np.uint32(0xFFFFFFFF).view(np.float32)], np.float32)
    for counter in range(20):
        got = _round(special, counter)
        assert got[0] == np.inf and got[1] == -np.inf and np.all(np.isnan(got[2:]))


def test_float64_values_round_from_their_nearest_float32():
    """float64 input is rounded to nearest float32 first, then stochastically: the result is a
    neighbour of that float32."""
    x = np.random.default_rng(1).normal(size=1000)
    t = torch.from_numpy(x)
    bits = hash_bits(XT, rounding_key(XT, 3, None), salts(XT, ["x"], None), 1000, None)[0]
    got = round_stochastic(XT, t, torch.bfloat16, bits).float().numpy()
    down, up = _neighbours(x.astype(np.float32))
    assert np.all((got == down) | (got == up))
