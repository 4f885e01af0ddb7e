"""Which operation refuses CuPy stream capture, per method: a 1024x1024 float32 layer and its bias, the bench's
settings, 12 captured steps; every failed capture's exception with the last frames of precond_ref code."""
import sys, traceback, warnings
import numpy as np, cupy
import precond_ref
from precond_ref.adapters import cupy as pc
from precond_ref.benchmarks.common import contenders, core_kwargs_for, update_extra

class Diag(pc.CupyGraphs):
    def capture(self, device, fn):
        try:
            return super().capture(device, fn)
        except Exception as err:
            frames = [f for f in traceback.extract_tb(err.__traceback__) if "precond_ref" in f.filename or "cupy" in f.filename]
            print(f"  {type(err).__name__}: {str(err)[:120]}")
            for f in frames[-5:]:
                print(f"    {f.filename.split('site-packages/')[-1].split('/site/')[-1]}:{f.lineno} {f.name}: {f.line}")
            raise

rng = np.random.default_rng(0)
cs, _ = contenders(sys.argv[1] if len(sys.argv) > 1 else "all", False)
for c in cs:
    print(c.entry.name, flush=True)
    params = {"w": cupy.asarray(rng.standard_normal((1024, 1024)), dtype=cupy.float32), "b": cupy.zeros((1024,), cupy.float32)}
    t = pc.CapturedTransform(getattr(precond_ref, c.entry.factory)(**core_kwargs_for(c.entry, cupy, "cupy")), graphs=Diag())
    print("  table:", t.refusal or "captures")
    t.refusal = None  # try every method, the refused ones too: what the capture refuses now
    s = t.init(params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(12):
            g = {k: cupy.asarray(rng.standard_normal(v.shape) * 1e-2, dtype=cupy.float32) for k, v in params.items()}
            try:
                u, s = t.update(g, s, params, **update_extra(c, 64))
            except Exception as err:
                print("  update failed:", type(err).__name__, str(err)[:200]); break
            params = {k: params[k] + u[k] for k in params}
    print(f"  graphs {t.graph_count}, failed {t.failed_captures}, capturing {t.capturing}", flush=True)
