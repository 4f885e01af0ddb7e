"""precond_ref.engine.rounding: stochastic rounding of float32 into bfloat16 with hashed bits."""

import numpy as np
import pytest

from precond_ref.engine.rounding import place_keys, place_noise, round_stochastic, rounded_with_noise, rounding_key

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


def _round(x: np.ndarray, counter: int = 0, offset: int = 0) -> np.ndarray:
    """``x`` (1-D) rounded at step ``counter``, its elements at places ``offset``, ``offset + 1``, ..."""
    t = torch.from_numpy(x)
    key = rounding_key(XT, torch.tensor(counter, dtype=torch.int32), t.device)
    keys = place_keys(XT, key, offset + t.shape[0], t.device)[offset:]
    out = round_stochastic(XT, t, torch.bfloat16, keys)
    assert out.dtype == torch.bfloat16
    return out.float().numpy()


def test_rounding_is_the_same_on_numpy_torch_and_jax():
    """The hash is integer arithmetic modulo 2^32 (int64 masked, or uint32 on JAX), so every backend
    rounds the same float32 values to the same bf16 values for the same step and places, a traced
    counter under ``jax.jit`` too; the step changes them; a row's rounding does not depend on the
    rows rounded with it."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = np.random.default_rng(3).normal(size=(4, 300)).astype(np.float32)
    xn = array_namespace(x)
    want = round_stochastic(xn, x, ml_dtypes.bfloat16, place_keys(xn, rounding_key(xn, np.int32(123456), None), 300, None))
    want = want.astype(np.float32)
    key = rounding_key(XT, torch.tensor(123456, dtype=torch.int32), None)
    got = round_stochastic(XT, torch.from_numpy(x), torch.bfloat16, place_keys(XT, key, 300, None)).float().numpy()
    np.testing.assert_array_equal(got, want)
    alone = round_stochastic(XT, torch.from_numpy(x[2:3]), torch.bfloat16, place_keys(XT, key, 300, None)).float().numpy()
    np.testing.assert_array_equal(alone[0], want[2])
    other = round_stochastic(XT, torch.from_numpy(x), torch.bfloat16, place_keys(XT, rounding_key(XT, 7, None), 300, None))
    assert np.mean(other.float().numpy() != want) > 0.2
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    jitted = jax.jit(lambda c, v: round_stochastic(jnp, v, jnp.bfloat16, place_keys(jnp, rounding_key(jnp, c, None), 300, None)))
    np.testing.assert_array_equal(np.asarray(jitted(jnp.int32(123456), jnp.asarray(x)).astype(jnp.float32)), want)


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
        by_counter = [np.concatenate([_round(np.array([x0], np.float32), counter=c, offset=5) for c in range(512)])
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
    got = round_stochastic(XT, torch.from_numpy(x), torch.bfloat16, place_keys(XT, rounding_key(XT, 3, None), 1000, None))
    down, up = _neighbours(x.astype(np.float32))
    got = got.float().numpy()
    assert np.all((got == down) | (got == up))


def test_noise_of_the_most_places_sliced_is_the_noise_of_fewer():
    """The engine makes a step's bits once, for the most places any tile stores, and rounds every
    batch with its first places: ``place_noise(place_keys(key, N))[:n]`` gives the rounding of
    ``round_stochastic`` with the keys of ``n`` places, bit for bit (a place's key depends on the
    step and the place alone, engine/rounding.py)."""
    x = torch.from_numpy(np.random.default_rng(5).normal(size=(3, 70)).astype(np.float32))
    key = rounding_key(XT, torch.tensor(99, dtype=torch.int32), None)
    want = round_stochastic(XT, x, torch.bfloat16, place_keys(XT, key, 70, None))
    noise = place_noise(XT, place_keys(XT, key, 5000, None))
    got = rounded_with_noise(XT, x, torch.bfloat16, noise[:70])
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    assert not torch.equal(rounded_with_noise(XT, x, torch.bfloat16, noise[1:71]).view(torch.int16), want.view(torch.int16))
