"""Eager multi-device programs dispatched faster than a loaded CPU runs them."""
import os, sys, time
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax, jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
mesh = Mesh(jax.devices(), ("x",))
x = jax.device_put(jnp.ones((64, 16)), NamedSharding(mesh, P("x", None)))
y = jax.device_put(jnp.ones((16, 16)), NamedSharding(mesh, P()))
t = time.time()
n = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
for i in range(n):
    x = x * 0.999 + 0.001
    s = jnp.sum(x)           # all-reduce across the 4 devices
    y = y + s * 1e-6
    x = x @ (y / jnp.linalg.norm(y))
print("ok", float(jnp.sum(y)), round(time.time() - t, 1), flush=True)
