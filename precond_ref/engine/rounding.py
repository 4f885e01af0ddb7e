"""Stochastic rounding, pure and reproducible: float32 values stored into bfloat16 with the expected
value kept, the random bits a hash of the step, the element and the array (no PRNG state).

:func:`round_stochastic` rounds; :func:`hash_bits` makes its bits. A counter-based hash (lowbias32, an
integer mix of xorshifts and multiplies, in 32-bit arithmetic) of (the step counter, the element's
index in its array, a salt naming the array) gives the same bits on every backend, eagerly, under
``jax.jit`` or ``torch.compile``, with no host randomness and no state to save.
"""

from __future__ import annotations

import sys
from typing import Any

from array_api_compat import is_jax_namespace

from .._backend import is_numpy_namespace, is_torch_namespace

__all__ = ["round_stochastic", "hash_bits", "is_bfloat16"]

Array = Any

_MASK = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9  # 2^32 / golden ratio: spreads consecutive counters and salts apart
_JAX_UINT32 = "uint32"  # compared with a dtype: JAX's dtypes equal their names


def _uint32_dtype(xp):
    """The integer dtype the hash computes in: uint32 on JAX (no int64 without x64), else int64 with
    every result masked to 32 bits (torch's CPU has no uint32 multiply or shift). Both give the same
    values: every operation below is exact modulo 2^32 in either."""
    return xp.uint32 if is_jax_namespace(xp) else xp.int64


def _low32(x: Array) -> Array:
    """``x mod 2^32``: a mask in int64, nothing in uint32 (where JAX refuses 2^32 - 1 as an operand)."""
    return x & _MASK if x.dtype != _JAX_UINT32 else x


def _mul32(x: Array, c: int) -> Array:
    """``x * c mod 2^32`` for ``0 <= x < 2^32``: in two 16-bit halves of ``c``, so that no product
    exceeds 2^48 (exact in int64; modulo 2^32 in uint32, as wanted)."""
    low = x * (c & 0xFFFF)
    high = ((x * (c >> 16)) & 0xFFFF) << 16
    return _low32(low + high)


def _mix32(x: Array) -> Array:
    """lowbias32 (C. Wellons' hash-prospector): a bijection of 32-bit integers whose every output
    bit depends on every input bit."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def hash_bits(xp, counter: Any, salt: int, shape: tuple, device: Any) -> Array:
    """32 random bits per element of an array of ``shape``: ``mix(mix(index + key))`` with ``index``
    the element's row-major index and ``key = mix(counter * φ + salt)`` (φ = 0x9E3779B9), in the
    integer dtype of :func:`_uint32_dtype` (values in [0, 2^32)). ``counter``: a Python int or a 0-D
    integer array (the step count, possibly traced); ``salt``: a Python int naming the array."""
    dtype = _uint32_dtype(xp)
    if isinstance(counter, int):
        key = xp.asarray(counter & _MASK, dtype=dtype, device=device)
    else:
        key = _low32(xp.astype(counter, dtype))
    key = _mix32(_low32(_mul32(key, _GOLDEN) + xp.asarray(salt & _MASK, dtype=dtype, device=device)))
    size = 1
    for d in shape:
        size *= d
    index = xp.reshape(xp.arange(size, dtype=dtype, device=device), shape)
    return _mix32(_mix32(_low32(index + key)))


def _bitcast(xp, x: Array, dtype) -> Array:
    """``x``'s bits read as ``dtype`` of the same width (no conversion)."""
    if is_torch_namespace(xp) or is_numpy_namespace(xp) or getattr(xp, "__name__", "").endswith("cupy"):
        return x.view(dtype)
    if is_jax_namespace(xp):
        return sys.modules["jax"].lax.bitcast_convert_type(x, dtype)
    raise TypeError(f"stochastic rounding needs a bitcast, which {getattr(xp, '__name__', xp)!r} does not offer")


def is_bfloat16(dtype) -> bool:
    """Whether ``dtype`` is bfloat16 (torch's, JAX's or ml_dtypes' for NumPy)."""
    return "bfloat16" in str(dtype)


def round_stochastic(xp, x: Array, dtype: Any, bits: Array) -> Array:
    """``x`` (float32; float64 is first rounded to nearest float32) as ``dtype`` (bfloat16), rounded
    stochastically: of the two bfloat16 neighbours ``down <= x <= up``, ``up`` with probability
    ``(x - down)/(up - down)`` and ``down`` otherwise, so ``E[result] = x``; a representable ``x``
    (``down = up``) is returned exactly, NaN and ±inf are kept.

    Implemented on the bit pattern: the low 16 bits of ``bits`` (32 random bits per element,
    :func:`hash_bits`) added to ``x``'s float32 bits as an integer, and the low 16 bits cleared.
    The sign is a separate bit, so this rounds the magnitude: it carries into the kept bits with
    probability (low 16 bits of x) / 2^16, the distance to ``down`` in units of the gap.
    """
    x32 = xp.astype(x, xp.float32) if x.dtype != xp.float32 else x
    wide = bits.dtype == xp.int64  # int64 holding 32-bit values; else uint32 (JAX)
    raw = xp.astype(_bitcast(xp, x32, xp.int32), xp.int64) & _MASK if wide else _bitcast(xp, x32, xp.uint32)
    rounded = _low32(((raw + (bits & 0xFFFF)) >> 16) << 16)  # bits 16..31 only: a carry out of bit 31 dropped
    if wide:  # back to int32's range (two's complement) before the bitcast
        rounded = xp.astype(xp.where(rounded >= 0x80000000, rounded - 0x100000000, rounded), xp.int32)
    out = _bitcast(xp, rounded, xp.float32)
    out = xp.where(xp.isnan(x32), x32, out)  # a NaN's payload may carry into the exponent
    return xp.astype(out, dtype)
