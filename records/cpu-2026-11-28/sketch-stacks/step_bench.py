"""The optimizer step alone (CPU ms, 1 thread) of a method with the bench's hyperparameters
(`compare.methods`: Sketchy rank 256, block 1024; S-AdaGrad rank 16, block 4096) on the small GPT:
`python step_bench.py METHOD BLOCKS PERIOD`, i.e. ../../cpu-2026-11-27/steady-step/step.py with its
torch class replaced by the bench's optimizer of METHOD."""
import pathlib
import runpy
import sys

import precond_ref.adapters.torch as T
from precond_ref.benchmarks.common import contenders, torch_optimizer

method = sys.argv[1]
(contender,), _ = contenders(method, False)
setattr(T, method, lambda named, **_: torch_optimizer(contender, named, "off")[0])
sys.argv = [sys.argv[0], method, *sys.argv[2:], "1"]
runpy.run_path(str(pathlib.Path(__file__).parents[2] / "cpu-2026-11-27" / "steady-step" / "step.py"), run_name="__main__")
