import jax, jax.numpy as jnp, optax
jax.config.update("jax_enable_x64", True)
from precond_ref.adapters import jax as pj
import precond_ref as pr
names = ["agd","asgo","dasgo","sketchy","s_adagrad","rf_rmsprop","rf_adamw","if_shampoo","mbf"]
params = {"w": jax.random.normal(jax.random.PRNGKey(0), (6, 4)), "b": jnp.ones(4)}
x = jax.random.normal(jax.random.PRNGKey(1), (8, 6))
def loss(p): return jnp.mean((x @ p["w"] + p["b"])**2)
for n in names:
    try:
        kw = {"batch_size": 8} if n.startswith("rf") or n in ("if_shampoo",) else {}
        tx = getattr(pj, n)(**kw) if hasattr(pj, n) else getattr(pr, n)(**kw)
        def meta(p):
            s = tx.init(p)
            q = p
            for i in range(2):
                g = jax.grad(loss)(q)
                u, s = tx.update(g, s, q)
                q = optax.apply_updates(q, u)
            return loss(q)
        g = jax.grad(meta)(params)
        print(n, all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(g)))
    except Exception as e:
        print(n, "ERR", type(e).__name__, str(e)[:200])
