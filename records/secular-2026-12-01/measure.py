"""The secular solve (precond_ref.linalg.rank_one_update_eigh) as a step issues it: operations per call
(counted as a GPU gets them), eager torch time per call on this CPU, and its accuracy against eigh
(the largest error of each kind over the test file's problems, in units of n u ||A||)."""
import sys
import time

import numpy as np
import torch

sys.path.insert(0, "tests")
from test_linalg_secular import _cases  # noqa: E402

from precond_ref.benchmarks.counting import count_step, gpu_grouping  # noqa: E402
from precond_ref.linalg import rank_one_update_eigh  # noqa: E402

torch.set_num_threads(1)
rng = np.random.default_rng(0)
for batch, n in ((1, 129), (38, 129), (16, 33)):
    d = torch.from_numpy(np.sort(rng.random((batch, n)), axis=-1).astype(np.float32))
    z = torch.from_numpy(rng.standard_normal((batch, n)).astype(np.float32))
    with gpu_grouping():
        ops = count_step(lambda: rank_one_update_eigh(d, z))["operations"]
    rank_one_update_eigh(d, z)
    best = min(_timed for _timed in (
        (lambda t: (rank_one_update_eigh(d, z), time.perf_counter() - t)[1])(time.perf_counter()) for _ in range(5)))
    print(f"stack ({batch}, {n}) float32: {ops} operations a call, {best * 1e3:.2f} ms a call (eager torch, 1 thread)")

worst = {"values": 0.0, "reconstruction": 0.0, "orthogonality": 0.0}
for n in (4, 17, 65, 129):
    for name, (d, z) in _cases(n, np.random.default_rng(n)).items():
        values, vectors = rank_one_update_eigh(d, z)
        a = np.diag(d) + np.outer(z, z)
        unit = n * np.finfo(np.float64).eps / 2
        norm = max(np.linalg.norm(a, 2), np.finfo(np.float64).tiny)
        worst["values"] = max(worst["values"], np.max(np.abs(values - np.linalg.eigvalsh(a))) / (unit * norm))
        worst["reconstruction"] = max(worst["reconstruction"],
                                      np.linalg.norm(vectors @ np.diag(values) @ vectors.T - a, 2) / (unit * norm))
        worst["orthogonality"] = max(worst["orthogonality"], np.linalg.norm(vectors.T @ vectors - np.eye(n), 2) / unit)
print("largest errors over the test problems (n = 4, 17, 65, 129), in n u ||A|| (orthogonality: n u):",
      ", ".join(f"{k} {v:.3f}" for k, v in worst.items()))
