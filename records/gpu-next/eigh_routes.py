"""Batched symmetric eigendecomposition routes for Sketchy's FD cores, timed on one device.

Sketchy's GPU step on the reference GPT (bench settings: rank 256, blocks of 1024) is, counted on a CPU under the
GPU's grouping (records/traffic-2026-11-29b/sketchy_linalg.txt), about 15 float64 `eigh` of order 768 (the incremental
cores) and 13 float32 `eigh` of order 512 (the d x d Gram of the 512-long axes, where k + m >= d) a step, plus 15
float32 QR of 1024 x 512 (the incremental path's residuals), which torch runs as cuSOLVER calls matrix after
matrix, reading each `eigh` status on the host (no CUDA graph).
This script times the routes that could do a stack of same-shaped cores in one call, and says which capture:

  1. torch.linalg.eigh on the stack (one call) and in a Python loop over its matrices;
  2. cuSOLVER's cusolverDnXsyevBatched called through ctypes on torch tensors (one handle, workspace a torch
     tensor, status left on the device), then captured in a torch.cuda.CUDAGraph and replayed;
  3. cupy.linalg.eigh on the stack, then a CuPy stream capture;
  4. jax.lax.linalg.eigh under jax.jit with implementation QR and JACOBI (float64 with jax x64 enabled);
  5. float32 eigh of the rounded float64 matrix, then one Ogita-Aishima refinement step in float64
     (matrix products and element-wise operations only, so it stays batched and capturable).

They run in the order 1, 2, 5, 3, 4 (5 reuses 2's solver). Test matrices are shaped like FD cores: X X^T for
a random (n, n + 8) matrix whose rows decay by exp(-2 i / n), symmetrised (their condition numbers are printed).
Every call includes the copy of the input that the routine overwrites. Each line: ms per call and per matrix (median of 5 synchronised
calls after a warm-up call), then the accuracy against float64 LAPACK eigenvalues of the same float64 matrix:
  eig   max |w - w_ref| / max |w_ref|      orth  max |V^T V - I|      res  ||A V - V diag(w)||_F / ||A||_F
(the largest over the stack's matrices; A is the float64 matrix also for the float32 routes).

Environment: DEV=cuda|cpu (cpu: a dry run of the same code, CUDA-only routes skipped with a reason),
SIZE=reference|small (default: reference on cuda, small on cpu), END_S (seconds; routes stop early after it),
SKIP=cusolver (leaves out the ctypes route and its capture, e.g. after it crashed the process).
Captures run last: a failed capture cannot disturb the eager timings."""
import ctypes, ctypes.util, glob, os, sys, time
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
import numpy as np
import torch

DEV = os.environ.get("DEV", "cuda")
SIZE = os.environ.get("SIZE", "reference" if DEV == "cuda" else "small")
END = time.perf_counter() + float(os.environ.get("END_S", "170"))
REPS = 5
# (batch, order, dtype): the incremental FD cores of rank 256 (768 = 256 + a 512-column block), the Gram path's
# float32 statistics of the 512-long axes, the 768 stack in float32, and the subspace path's Rayleigh-Ritz core
# (order 288 = 256 + 32 oversampling columns).
CASES = {"reference": [(15, 768, "float64"), (13, 512, "float32"), (15, 768, "float32"), (20, 288, "float64")],
         "small": [(3, 48, "float64"), (2, 32, "float32"), (3, 48, "float32"), (4, 24, "float64")]}[SIZE]
CUDA = DEV == "cuda"
SKIP = os.environ.get("SKIP", "").split(",")


def say(*parts):
    print(*parts, flush=True)


def left():
    return END - time.perf_counter()


def sync(_=None):
    if CUDA:
        torch.cuda.synchronize()


def fd_core(rng, b, n):
    """A stack of b float64 Grams X X^T, X of shape (n, n + 8) with rows scaled by exp(-2 i / n)."""
    x = rng.standard_normal((b, n, n + 8)) * np.exp(-2.0 * np.arange(n) / n)[:, None]
    g = x @ x.transpose(0, 2, 1)
    return (g + g.transpose(0, 2, 1)) / 2


def as_torch(x):
    """A torch tensor of a torch, CuPy (copied through the host) or JAX/NumPy array."""
    if isinstance(x, torch.Tensor):
        return x
    return torch.as_tensor(x.get() if hasattr(x, "get") and not isinstance(x, np.ndarray) else np.array(x))


def accuracy(a64, w_ref, w, v):
    """The three accuracy figures of one route's (w, v) on the float64 stack a64, as a string."""
    w, v = (as_torch(t).to(a64.device, torch.float64) for t in (w, v))
    eye = torch.eye(a64.shape[-1], dtype=torch.float64, device=a64.device)
    eig = ((w - w_ref).abs().amax(-1) / w_ref.abs().amax(-1)).max().item()
    orth = (v.mT @ v - eye).abs().max().item()
    res = (torch.linalg.matrix_norm(a64 @ v - v * w[..., None, :]) / torch.linalg.matrix_norm(a64)).max().item()
    return f"eig {eig:.1e} orth {orth:.1e} res {res:.1e}"


def timed(fn, block=sync):
    """Median ms of up to REPS synchronised calls after a warm-up call (fewer when the deadline is near)."""
    t = time.perf_counter(); out = fn(); block(out); warm = time.perf_counter() - t
    reps = max(1, min(REPS, int((left() - 5) / max(warm, 1e-6))))
    ts = []
    for _ in range(reps):
        block(None); t = time.perf_counter(); out = fn(); block(out); ts.append(time.perf_counter() - t)
    return 1e3 * float(np.median(ts)), out, reps


def report(name, case, fn, a64, w_ref, block=sync, note=""):
    """Time fn() (returning (w, v) with v's columns the eigenvectors) and print one line; errors in one line."""
    b, n, dt = case
    label = f"{name:34s} ({b},{n},{n}) {dt}"
    if left() < 5:
        say(f"{label}: skipped, deadline"); return None
    try:
        ms, (w, v), reps = timed(fn, block)
        say(f"{label}: {ms:9.2f} ms/call {ms / b:8.3f} ms/matrix | {accuracy(a64, w_ref, w, v)}"
            + (f" | median of {reps}" if reps < REPS else "") + (f" | {note}" if note else ""))
        return w, v
    except Exception as err:
        say(f"{label}: error {type(err).__name__}: {' '.join(str(err).split())[:160]}")
        return None


# ---- cuSOLVER's batched syev through ctypes ------------------------------------------------------------------
CUSOLVER_EIG_MODE_VECTOR = 1   # cusolverEigMode_t (cusolver_common.h)
CUBLAS_FILL_MODE_LOWER = 0     # cublasFillMode_t (cublas_api.h)
CUDA_R = {torch.float32: 0, torch.float64: 1}   # cudaDataType CUDA_R_32F, CUDA_R_64F (library_types.h)
_p, _i, _i64, _sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_size_t


def load_cusolver():
    """The libcusolver torch already loaded (after one CUDA eigh), else the one in site-packages, else the system's."""
    torch.linalg.eigh(torch.eye(40, device="cuda", dtype=torch.float64))
    with open("/proc/self/maps") as maps:
        loaded = sorted({line.split()[-1] for line in maps if "/libcusolver.so" in line})
    found = loaded or sorted(p for d in sys.path for p in glob.glob(f"{d}/nvidia/**/libcusolver.so*", recursive=True))
    path = found[0] if found else ctypes.util.find_library("cusolver")
    lib = ctypes.CDLL(path)
    sig = {"cusolverGetVersion": [ctypes.POINTER(_i)],
           "cusolverDnCreate": [ctypes.POINTER(_p)], "cusolverDnDestroy": [_p],
           "cusolverDnCreateParams": [ctypes.POINTER(_p)], "cusolverDnDestroyParams": [_p],
           "cusolverDnSetStream": [_p, _p],
           "cusolverDnXsyevBatched_bufferSize": [_p, _p, _i, _i, _i64, _i, _p, _i64, _i, _p, _i,
                                                 ctypes.POINTER(_sz), ctypes.POINTER(_sz), _i64],
           "cusolverDnXsyevBatched": [_p, _p, _i, _i, _i64, _i, _p, _i64, _i, _p, _i,
                                      _p, _sz, _p, _sz, _p, _i64]}
    for name, args in sig.items():
        fn = getattr(lib, name)   # AttributeError names a missing symbol (cuSOLVER older than CUDA 12.6 update 2)
        fn.argtypes, fn.restype = args, _i
    version = _i()
    lib.cusolverGetVersion(ctypes.byref(version))
    return lib, path, version.value


def check(status, what):
    if status != 0:
        raise RuntimeError(f"{what} returned cusolverStatus {status}")


class SyevBatched:
    """Eigendecomposition of a (b, n, n) symmetric stack by cusolverDnXsyevBatched, one handle and workspace.

    cuSOLVER reads column-major matrices: a C-order symmetric matrix is its own transpose, so the stack goes in
    as it is; the eigenvectors come back column-major in place, i.e. the C-order buffer holds V^T per matrix.
    The status array stays on the device (nothing read on the host in a call)."""

    def __init__(self, lib, b, n, dtype):
        self.lib, self.b, self.n, self.dt = lib, b, n, CUDA_R[dtype]
        self.handle, self.params = _p(), _p()
        check(lib.cusolverDnCreate(ctypes.byref(self.handle)), "cusolverDnCreate")
        check(lib.cusolverDnCreateParams(ctypes.byref(self.params)), "cusolverDnCreateParams")
        self.a = torch.empty(b, n, n, dtype=dtype, device="cuda")
        self.w = torch.empty(b, n, dtype=dtype, device="cuda")
        self.info = torch.zeros(b, dtype=torch.int32, device="cuda")
        dev, host = _sz(), _sz()
        check(lib.cusolverDnXsyevBatched_bufferSize(
            self.handle, self.params, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n, self.dt,
            self.a.data_ptr(), n, self.dt, self.w.data_ptr(), self.dt, ctypes.byref(dev), ctypes.byref(host), b),
            "cusolverDnXsyevBatched_bufferSize")
        self.device_bytes, self.host_bytes = dev.value, host.value
        self.work = torch.empty(max(dev.value, 1), dtype=torch.uint8, device="cuda")
        self.host_work = ctypes.create_string_buffer(max(host.value, 1))

    def __call__(self, a):
        """(w, V) of the stack a; views of this object's buffers, overwritten by the next call."""
        self.a.copy_(a)
        check(self.lib.cusolverDnSetStream(self.handle, torch.cuda.current_stream().cuda_stream), "cusolverDnSetStream")
        check(self.lib.cusolverDnXsyevBatched(
            self.handle, self.params, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, self.n, self.dt,
            self.a.data_ptr(), self.n, self.dt, self.w.data_ptr(), self.dt, self.work.data_ptr(), self.device_bytes,
            ctypes.addressof(self.host_work), self.host_bytes, self.info.data_ptr(), self.b), "cusolverDnXsyevBatched")
        return self.w, self.a.mT

    def close(self):
        self.lib.cusolverDnDestroyParams(self.params)
        self.lib.cusolverDnDestroy(self.handle)


# ---- route 5: one refinement step ----------------------------------------------------------------------------
def refine(a, v):
    """One Ogita-Aishima step (Ogita and Aishima 2018, RefSyEv) from approximate eigenvectors v of the float64
    symmetric stack a: R = I - V^T V, S = V^T A V, w_i = s_ii / (1 - r_ii); for well-separated pairs
    E_ij = (s_ij + w_j r_ij) / (w_j - w_i), within a cluster (gap <= delta) E_ij = r_ij / 2; V' = V + V E.
    delta = 2 (||S - diag(w)|| + ||A|| ||R||) with Frobenius norms (upper bounds of the paper's 2-norms, so the
    step stays orthogonality-safe). Pairs closer than delta keep about their float32 accuracy after one step."""
    v = v.to(torch.float64)
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    r = eye - v.mT @ v
    s = v.mT @ (a @ v)
    w = s.diagonal(dim1=-2, dim2=-1) / (1 - r.diagonal(dim1=-2, dim2=-1))
    fro = torch.linalg.matrix_norm
    delta = 2 * (fro(s - torch.diag_embed(w)) + fro(a) * fro(r))[..., None, None]
    gap = w[..., None, :] - w[..., :, None]   # [i, j] = w_j - w_i
    separated = gap.abs() > delta
    e = torch.where(separated, (s + w[..., None, :] * r) / torch.where(separated, gap, torch.ones_like(gap)), r / 2)
    return w, v + v @ e


def differences(w, v, w0, v0):
    """'equal' when bitwise equal, else the largest element-wise differences of the eigenvalues and vectors."""
    if torch.equal(w, w0) and torch.equal(v, v0):
        return "equal"
    return f"max |dw| {(w - w0).abs().max().item():.1e}, max |dV| {(v - v0).abs().max().item():.1e}"


# ---- the measurement -----------------------------------------------------------------------------------------
def main():
    dev = torch.device(DEV)
    say(f"eigh routes on {torch.cuda.get_device_name() if CUDA else 'CPU (dry run of the script, not a GPU measurement)'}"
        f" | torch {torch.__version__} | numpy {np.__version__} | SIZE {SIZE} | deadline {left():.0f} s")
    rng = np.random.default_rng(0)
    stacks = {}
    for b, n, dt in CASES:
        if (b, n) not in stacks:
            g = fd_core(rng, b, n)
            stacks[b, n] = (torch.as_tensor(g, device=dev), torch.as_tensor(np.linalg.eigvalsh(g), device=dev))
    dtype = {"float64": torch.float64, "float32": torch.float32}
    say("condition numbers: " + ", ".join(f"({b},{n}) {float((w[:, -1] / w[:, 0]).max()):.1e}" for (b, n), (_, w) in stacks.items()))

    say("== 1. torch.linalg.eigh: the stack in one call, and a Python loop over its matrices")
    for case in CASES:
        a64, w_ref = stacks[case[:2]]
        a = a64.to(dtype[case[2]])
        report("torch eigh, stack", case, lambda: torch.linalg.eigh(a), a64, w_ref)
        report("torch eigh, loop", case, lambda: [torch.stack(t) for t in zip(*[torch.linalg.eigh(m) for m in a])], a64, w_ref)

    say("== 2. cusolverDnXsyevBatched through ctypes (workspace a torch tensor, status on the device)")
    lib = solvers = None
    if not CUDA:
        say("skipped: CUDA only (DEV=cpu)")
    elif "cusolver" in SKIP:
        say("skipped: SKIP=cusolver")
    else:
        try:
            lib, path, version = load_cusolver()
            say(f"libcusolver {path} (cusolverGetVersion {version})")
        except Exception as err:
            say(f"cusolver not loaded: {type(err).__name__}: {' '.join(str(err).split())[:200]}")
    if lib is not None:
        solvers = {}
        for case in CASES:
            a64, w_ref = stacks[case[:2]]
            a = a64.to(dtype[case[2]])
            try:
                solver = solvers[case] = SyevBatched(lib, case[0], case[1], dtype[case[2]])
            except Exception as err:
                say(f"{'syevBatched':34s} {case}: set-up error {type(err).__name__}: {str(err)[:160]}"); continue
            note = f"workspace device {solver.device_bytes} B, host {solver.host_bytes} B"
            if report("cusolver syevBatched", case, lambda: solver(a), a64, w_ref, note=note) is not None:
                bad = int((solver.info != 0).sum())   # read here, after the timing, not in a call
                if bad:
                    say(f"{'':34s} info != 0 for {bad} of {case[0]} matrices: {solver.info.tolist()}")

    say("== 5. float32 eigh of the rounded matrix + one Ogita-Aishima refinement step in float64 (batched)")
    for case in [c for c in CASES if c[2] == "float64"]:
        a64, w_ref = stacks[case[:2]]
        a32 = a64.float()
        report("torch eigh f32, no refinement", case, lambda: torch.linalg.eigh(a32), a64, w_ref)
        report("torch eigh f32 + refine", case, lambda: refine(a64, torch.linalg.eigh(a32)[1]), a64, w_ref)
        if solvers:
            try:
                f32 = SyevBatched(lib, case[0], case[1], torch.float32)
            except Exception as err:
                say(f"syevBatched f32 + refine {case}: set-up error {type(err).__name__}: {str(err)[:160]}"); continue
            report("syevBatched f32 + refine", case, lambda: refine(a64, f32(a32)[1]), a64, w_ref)
            f32.close()

    say("== 3. cupy.linalg.eigh on the stack")
    cupy = None
    if not CUDA:
        say("skipped: CUDA only (DEV=cpu)")
    else:
        try:
            import cupy
            say(f"cupy {cupy.__version__}")
        except Exception as err:
            say(f"cupy not imported: {type(err).__name__}: {str(err)[:160]}")
    if cupy is not None:
        cupy_sync = lambda _: cupy.cuda.Device().synchronize()
        for case in CASES:
            a64, w_ref = stacks[case[:2]]
            x = cupy.from_dlpack(a64.to(dtype[case[2]]).contiguous())
            report("cupy eigh, stack", case, lambda: cupy.linalg.eigh(x), a64, w_ref, block=cupy_sync)

    say("== 4. jax.lax.linalg.eigh under jax.jit, implementation QR and JACOBI (jax x64 enabled)")
    try:
        import jax
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp
        from jax import lax
        say(f"jax {jax.__version__} | {jax.default_backend()} | {jax.devices()[0]}")
        if CUDA and jax.default_backend() == "cpu":
            say("jax has no GPU backend here: its lines below are CPU figures")
        for impl in (lax.linalg.EighImplementation.QR, lax.linalg.EighImplementation.JACOBI):
            f = jax.jit(lambda x, impl=impl: lax.linalg.eigh(x, implementation=impl))
            for case in CASES:
                a64, w_ref = stacks[case[:2]]
                x = jnp.asarray(a64.cpu().numpy().astype(case[2]))
                t = time.perf_counter()
                try:
                    jax.block_until_ready(f(x))
                    note = f"first call (compile) {time.perf_counter() - t:.1f} s"
                except Exception:
                    note = ""
                report(f"jax eigh {impl.name}", case, lambda: f(x)[::-1], a64, w_ref,
                       block=lambda out: jax.block_until_ready(out), note=note)
    except Exception as err:
        say(f"jax: {type(err).__name__}: {' '.join(str(err).split())[:200]}")

    say("== captures: the batched syev in a torch.cuda.CUDAGraph, cupy.linalg.eigh in a CuPy stream capture")
    if not CUDA:
        say("skipped: CUDA only (DEV=cpu)")
    for case, solver in (solvers or {}).items():
        if left() < 5:
            say("captures skipped: deadline"); break
        a64, _ = stacks[case[:2]]
        x = a64.to(dtype[case[2]]).clone()   # the graph's input, overwritten below
        label = f"{'syevBatched captured':34s} ({case[0]},{case[1]},{case[1]}) {case[2]}"
        try:
            w0, v0 = (t.clone() for t in solver(x))
            w1, v1 = (t.clone() for t in solver(x.flip(0).contiguous()))
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                w, v = solver(x)
            graph.replay(); sync()
            same = differences(w, v, w0, v0)
            x.copy_(x.flip(0).clone()); graph.replay(); sync()
            same_new = differences(w, v, w1, v1)
            ms, _, _ = timed(lambda: graph.replay())
            say(f"{label}: captured; replay {ms:9.2f} ms/call {ms / case[0]:8.3f} ms/matrix | replay against eager: "
                f"{same} (same input), {same_new} (new input copied in) | host workspace {solver.host_bytes} B")
        except Exception as err:
            say(f"{label}: not captured: {type(err).__name__}: {' '.join(str(err).split())[:200]}")
    if cupy is not None and left() > 5:
        case = CASES[0]
        label = f"{'cupy eigh captured':34s} ({case[0]},{case[1]},{case[1]}) {case[2]}"
        try:
            x = cupy.asarray(stacks[case[:2]][0].cpu().numpy().astype(case[2]))
            stream = cupy.cuda.Stream(non_blocking=True)
            with stream:
                w0, v0 = cupy.linalg.eigh(x)
                stream.begin_capture()
                w, v = cupy.linalg.eigh(x)
                graph = stream.end_capture()
            graph.launch(stream); stream.synchronize()
            say(f"{label}: captured; replay against eager: {differences(*(as_torch(t) for t in (w, v, w0, v0)))}")
        except Exception as err:
            say(f"{label}: not captured: {type(err).__name__}: {' '.join(str(err).split())[:200]}")
    for solver in (solvers or {}).values():
        solver.close()
    say(f"== done, {left():.0f} s before the deadline")


if __name__ == "__main__":
    main()
