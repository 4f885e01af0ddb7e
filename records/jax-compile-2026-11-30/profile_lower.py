"""cProfile of one method's lowering (trace + MLIR) as compile_step.py makes it:
`python profile_lower.py SIZE METHOD [N]` prints the N (30) functions of most cumulative time."""
import cProfile
import pstats
import sys

from update_case import case

f, arguments = case(sys.argv[1], sys.argv[2], due=False)
prof = cProfile.Profile()
prof.enable()
f.lower(*arguments)
prof.disable()
n = int(sys.argv[3]) if len(sys.argv) > 3 else 30
pstats.Stats(prof).sort_stats("cumulative").print_stats(n)
pstats.Stats(prof).sort_stats("tottime").print_stats(n)
