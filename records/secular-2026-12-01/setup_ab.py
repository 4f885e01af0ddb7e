"""A call of linalg.rank_one_update_eigh as a transform's step makes it (constants kept), best of 150 calls, one thread."""
import time, torch, numpy as np
from precond_ref.linalg import rank_one_update_eigh
from precond_ref._backend import keeping_constants
torch.set_num_threads(1)
rng = np.random.default_rng(0)
kept = {}
out = []
for b, n in ((1, 17), (1, 129)):
    d = torch.from_numpy(np.sort(rng.random((b, n)), -1).astype(np.float32)); z = torch.from_numpy(rng.standard_normal((b, n)).astype(np.float32))
    with keeping_constants(kept):
        rank_one_update_eigh(d, z)
        best = min((lambda t: (rank_one_update_eigh(d, z), time.perf_counter() - t)[1])(time.perf_counter()) for _ in range(150))
    out.append(f"({b},{n}) {best*1e3:.2f} ms")
print(", ".join(out))
