"""The defaults test's shares (tests/test_defaults_train.py) as one table: each torch class and each core factory
at its defaults, share of torch.optim.Adam's progress on digits_mlp (150 steps, seed 0). Run from the repository root."""
import sys
sys.path.insert(0, "tests")  # test_defaults_train and its helpers
import torch
import test_defaults_train as T
torch.set_num_threads(1)
problem = T.SWEEP.Problem(T.PROBLEM, 0)
sa = T.SWEEP.start_and_adam(T.PROBLEM, 0)
print("| method | torch class at defaults | core factory at defaults |\n|---|---:|---:|")
for m in T.SWEEP.METHODS:
    cls = T._share(T.SWEEP.final_loss(problem, lambda mod: T.SWEEP.optimizer_of(m, mod, problem.batch_size)), sa)
    f = T.FACTORIES[m]; kw = {"batch_size": problem.batch_size} if m in T.SWEEP.NEEDS_BATCH_SIZE else {}
    core = T._share(T.SWEEP.final_loss(problem, lambda mod: T._CoreOptimizer(list(mod.named_parameters()), f(**kw))), sa)
    print(f"| {m} | {cls:.3f} | {core:.3f} |")
