"""MBFCAP diagnostics: capture of linalg.inverse(..., symmetric_positive_definite=True) on CUDA stacks; eager timings."""
import sys, time
import torch
import array_api_compat.torch as xp
from precond_ref import linalg

def spd(shape, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    b = torch.randn(*shape[:-1], 2 * shape[-1], generator=g, device="cuda")
    return b @ b.mT / (2 * shape[-1]) + 0.1 * torch.eye(shape[-1], device="cuda")

def captured(fn, a):
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn(a)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn(a)
    g.replay(); torch.cuda.synchronize()
    return out

def ms(fn, a, reps=20):
    fn(a); torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn(a)
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t) / reps

spd_inv = lambda x: linalg.inverse(xp, x, symmetric_positive_definite=True)
lu_inv = lambda x: linalg.inverse(xp, x)
mode = sys.argv[1]
shapes = [(17, 32, 32), (64, 128, 128), (3, 128, 128), (128, 128), (12, 600, 600), (300, 25, 25)]
if mode == "spd":
    print("torch", torch.__version__, torch.cuda.get_device_name())
    for sh in shapes:
        a = spd(sh)
        try:
            out = captured(spd_inv, a)
            ref = torch.linalg.inv(a.double())
            err = float((out.double() - ref).norm() / ref.norm())
            print(f"spd capture {sh}: OK rel err vs float64 inv {err:.2e}")
        except Exception as e:
            print(f"spd capture {sh}: FAILED {type(e).__name__}: {str(e)[:200]}")
            break
    for sh in [(17, 32, 32), (64, 128, 128), (300, 25, 25), (12, 600, 600)]:
        a = spd(sh)
        print(f"eager ms {sh}: LU inv_ex {ms(lu_inv, a):.3f}  spd {ms(spd_inv, a):.3f}")
else:
    for sh in [(17, 32, 32)]:
        try:
            captured(lu_inv, spd(sh))
            print(f"LU capture {sh}: OK (captured)")
        except Exception as e:
            print(f"LU capture {sh}: FAILED as expected: {type(e).__name__}: {str(e)[:160]}")
