"""The FD core's left singular pairs under jax.jit without x64 (JAX's default): the float32 SVD (the route before
widening) against the float64 Gram's eigh within a widening block, on stacks of the cores the bench's GPTs make."""
import sys, time
import jax, jax.numpy as jnp, numpy as np
from precond_ref import linalg
assert not jax.config.jax_enable_x64
rng = np.random.default_rng(0)
def timed(f, x, reps=5):
    f(x)[0].block_until_ready()
    best = []
    for _ in range(reps):
        t = time.perf_counter(); f(x)[0].block_until_ready(); best.append(time.perf_counter() - t)
    return 1e3 * min(best)
for shape in [(4, 384, 384), (8, 192, 192), (200, 17, 17), (2, 640, 640)]:
    a = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
    gram = jax.jit(linalg.left_singular)
    real = linalg._svd_by_float64_gram
    linalg._svd_by_float64_gram = lambda xp, a: False
    svd = jax.jit(lambda a: linalg.left_singular(a))
    svd_ms = timed(svd, a)
    linalg._svd_by_float64_gram = real
    gram_ms = timed(gram, a)
    print(f"{shape}: float32 svd {svd_ms:.1f} ms, float64 Gram eigh (widened) {gram_ms:.1f} ms", flush=True)
