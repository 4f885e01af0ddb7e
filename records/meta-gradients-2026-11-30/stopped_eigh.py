import jax, jax.numpy as jnp, optax, sys
jax.config.update("jax_enable_x64", True)
import precond_ref as pr, precond_ref.linalg as L, precond_ref.sketch as S
mode = sys.argv[1]
if mode == "stop":
    for name in ["symmetric_eigh", "eigh_widened"]:
        f = getattr(L, name)
        def g(*a, _f=f, **k):
            return jax.tree.map(jax.lax.stop_gradient, _f(*a, **k))
        setattr(L, name, g)
        if hasattr(S, name): setattr(S, name, g)
params = {"w": jax.random.normal(jax.random.PRNGKey(0), (6, 4)), "b": jnp.ones(4)}
x = jax.random.normal(jax.random.PRNGKey(1), (8, 6))
def loss(p): return jnp.mean((x @ p["w"] + p["b"])**2)
for n in ["sketchy", "s_adagrad"]:
    tx = getattr(pr, n)()
    def meta(p):
        s = tx.init(p); q = p
        for i in range(2):
            u, s = tx.update(jax.grad(loss)(q), s, q); q = optax.apply_updates(q, u)
        return loss(q)
    g = jax.grad(meta)(params)
    print(mode, n, all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(g)))
