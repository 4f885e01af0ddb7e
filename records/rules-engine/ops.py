"""Operations (kernel launches) one eager torch step issues, per method, on the small GPT's parameter shapes
(the bench's ``--model gpt``), on this CPU and with a GPU's grouping (the CPU's rule that keeps large
leaves out of joins switched off, and no device value read on the host, as for a CUDA tensor).
Usage: ``python ops.py [cpu|gpu] [method,...] [-v]``; prints ``method count`` lines (the mean of 6
steps after 12, compilation off). The counting is ``precond_ref.benchmarks.operations``, which
``bench``'s ``ops / step`` column uses too."""
import sys

from precond_ref.benchmarks.operations import main

sys.exit(main())
