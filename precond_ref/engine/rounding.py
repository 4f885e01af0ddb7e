"""Stochastic rounding, pure and reproducible: float32 values stored into bfloat16 with the expected
value kept, the random bits a hash of the step and the element's place (no PRNG state).

:func:`round_stochastic` rounds; :func:`rounding_key` and :func:`place_keys` key its bits
(:func:`place_noise`: the bits themselves, made once and sliced for any number of places). A
counter-based hash (lowbias32, an integer mix of xorshifts and multiplies, in 32-bit arithmetic)
gives the same bits on every backend, eagerly, under ``jax.jit`` or ``torch.compile``, with no
host data, no host randomness and no state to save.
"""

from __future__ import annotations

import sys
from typing import Any

from array_api_compat import is_cupy_namespace, is_jax_namespace

from .._backend import is_numpy_namespace, is_torch_namespace

__all__ = ["round_stochastic", "rounded_with_noise", "rounding_key", "place_keys", "place_noise", "is_bfloat16"]

Array = Any

_MASK = 0xFFFFFFFF
_JAX_UINT32 = "uint32"  # compared with a dtype: JAX's dtypes equal their names


def _uint32_dtype(xp):
    """The integer dtype the hash computes in: uint32 on JAX (no int64 without x64), else int64 with
    every result masked to 32 bits (torch's CPU has no uint32 multiply or shift). Both give the same
    values: every operation below is exact modulo 2^32 in either."""
    return xp.uint32 if is_jax_namespace(xp) else xp.int64


def _low32(x: Array) -> Array:
    """``x mod 2^32``: a mask in int64, nothing in uint32 (where JAX refuses 2^32 - 1 as an operand)."""
    return x & _MASK if x.dtype != _JAX_UINT32 else x


def _mix32(x: Array) -> Array:
    """lowbias32 with C. Wellons' 2022 constants (hash-prospector): a bijection of 32-bit integers
    whose every output bit depends on every input bit. Both multipliers are below 2^31, so for
    ``x < 2^32`` a product stays below 2^63: exact in int64, then taken modulo 2^32."""
    x = x ^ (x >> 16)
    x = _low32(x * 0x21F0AAAD)
    x = x ^ (x >> 15)
    x = _low32(x * 0x735A2D97)
    return x ^ (x >> 15)


def rounding_key(xp, counter: Any, device: Any) -> Array:
    """The step's key of :func:`place_keys`: ``mix(counter)``, a 0-D integer of [0, 2^32) in the
    dtype of :func:`_uint32_dtype`. ``counter``: a Python int or a 0-D integer array (the step
    count, possibly traced)."""
    dtype = _uint32_dtype(xp)
    if isinstance(counter, int):
        return _mix32(xp.asarray(counter & _MASK, dtype=dtype, device=device))
    return _mix32(_low32(xp.astype(counter, dtype)))


def place_keys(xp, key: Array, size: int, device: Any) -> Array:
    """The bits' keys of ``size`` places (shape (size,)): ``mix(place + key)``, ``key`` the step's
    :func:`rounding_key`."""
    return _mix32(_low32(xp.arange(size, dtype=_uint32_dtype(xp), device=device) + key))


def place_noise(xp, keys: Array) -> Array:
    """The 16 random bits of each place, the high half of its key (:func:`place_keys`), as the
    int32 that :func:`rounded_with_noise` adds: ``noise[:n]`` is the noise of the first ``n``
    places, so one array made for the most places of a step serves every smaller rounding of it."""
    return xp.astype(keys >> 16, xp.int32)


def _bitcast(xp, x: Array, dtype) -> Array:
    """``x``'s bits read as ``dtype`` of the same width (no conversion)."""
    if is_torch_namespace(xp) or is_numpy_namespace(xp) or is_cupy_namespace(xp):
        return x.view(dtype)
    if is_jax_namespace(xp):
        return sys.modules["jax"].lax.bitcast_convert_type(x, dtype)
    raise TypeError(f"stochastic rounding needs a bitcast, which {getattr(xp, '__name__', xp)!r} does not offer")


def is_bfloat16(dtype) -> bool:
    """Whether ``dtype`` is bfloat16 (torch's, JAX's or ml_dtypes' for NumPy)."""
    return "bfloat16" in str(dtype)


def round_stochastic(xp, x: Array, dtype: Any, keys: Array) -> Array:
    """``x`` (float32; float64 is first rounded to nearest float32) as ``dtype`` (bfloat16), rounded
    stochastically: of the two bfloat16 neighbours ``down <= x <= up``, ``up`` with probability
    ``(x - down)/(up - down)`` and ``down`` otherwise, so ``E[result] = x`` over the steps; a
    representable ``x`` (``down = up``) is returned exactly, NaN and ±inf are kept (a finite ``x``
    above bfloat16's largest value may round to inf).

    Implemented on the bit pattern: 16 random bits added to ``x``'s float32 bits as an int32, and
    the low 16 bits cleared. The sign is a separate bit, so this rounds the magnitude: it carries
    into the kept bits with probability (low 16 bits of x) / 2^16, the distance to ``down`` in
    units of the gap. The random bits of an element are the high half of its ``keys``
    (:func:`place_keys`, broadcast against x's last axis), a hash of the step and the element's
    place: uniform over the steps, the same whichever arrays are rounded together (one process or a
    split over ranks) and unchanged by a rounding-level change of ``x`` (which flips a rounding only
    within one float32 ulp of its threshold). The addition wraps (two's complement) only for NaN
    patterns, which are put back.
    """
    return rounded_with_noise(xp, x, dtype, place_noise(xp, keys))


def rounded_with_noise(xp, x: Array, dtype: Any, noise: Array) -> Array:
    """:func:`round_stochastic` with the bits given as :func:`place_noise` of the keys (broadcast
    against x's last axis): ``round_stochastic(xp, x, dtype, keys) == rounded_with_noise(xp, x,
    dtype, place_noise(xp, keys))``, bit for bit."""
    x32 = xp.astype(x, xp.float32) if x.dtype != xp.float32 else x
    out = _bitcast(xp, (_bitcast(xp, x32, xp.int32) + noise) & -65536, xp.float32)  # the low 16 bits cleared
    out = xp.where(xp.isnan(x32), x32, out)  # a NaN's payload may carry into the exponent
    return xp.astype(out, dtype)
