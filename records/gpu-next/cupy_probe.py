"""What CuPy 14 lets a stream capture hold: cupy.matmul (cuBLAS), cupy.einsum, cuTENSOR's contraction, with and
without CUPY_ACCELERATORS=cutensor; eigh (cuSOLVER). Each probe: capture on a non-blocking stream, replay, compare."""
import os, sys, cupy, numpy as np
print("cupy", cupy.__version__, "accelerators", cupy._core.get_routine_accelerators(), cupy._core.get_reduction_accelerators(), flush=True)
try:
    from cupy_backends.cuda.libs import cutensor as _ct  # noqa: F401
    import cupyx.cutensor as ct
    print("cutensor available:", ct.check_availability() if hasattr(ct, "check_availability") else True, flush=True)
except Exception as err:
    ct = None; print("cutensor: not available:", type(err).__name__, str(err)[:150], flush=True)
a = cupy.random.standard_normal((8, 64, 64), dtype=cupy.float32); b = cupy.random.standard_normal((8, 64, 64), dtype=cupy.float32)
ref = cupy.asnumpy(a @ b)
def probe(name, fn):
    s = cupy.cuda.Stream(non_blocking=True)
    with s:
        try:
            s.begin_capture(); out = fn(); g = s.end_capture(); g.launch(s); s.synchronize()
            err = float(np.max(np.abs(cupy.asnumpy(out) - ref))) if out.shape == ref.shape else float("nan")
            print(f"  {name}: captured, max diff {err:.2e}", flush=True)
        except Exception as e:
            try: s.end_capture()
            except Exception: pass
            print(f"  {name}: {type(e).__name__}: {str(e)[:150]}", flush=True)
for acc in ([], ["cutensor"], ["cub", "cutensor"]):
    try:
        cupy._core.set_routine_accelerators(acc); cupy._core.set_reduction_accelerators(acc)
    except Exception as e:
        print("set accelerators", acc, "failed:", e); continue
    print("accelerators", acc, flush=True)
    probe("matmul", lambda: a @ b)
    probe("einsum", lambda: cupy.einsum("bij,bjk->bik", a, b))
    probe("tensordot-sum", lambda: cupy.sum(a[:, :, :, None] * b[:, None, :, :], axis=2))
    if ct is not None:
        def contr():
            c = cupy.zeros_like(a)
            return ct.contraction(1.0, a, "bij", b, "bjk", 0.0, c, "bik")
        probe("cutensor.contraction", contr)
cupy._core.set_routine_accelerators([])
probe_e = lambda: cupy.linalg.eigh(a @ a.transpose(0, 2, 1))[0]
s = cupy.cuda.Stream(non_blocking=True)
with s:
    try:
        s.begin_capture(); probe_e(); s.end_capture(); print("  eigh: captured")
    except Exception as e:
        try: s.end_capture()
        except Exception: pass
        print(f"  eigh: {type(e).__name__}: {str(e)[:150]}")
