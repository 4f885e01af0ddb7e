"""Where XLA's compilation of one method's jitted update goes: `python compile_profile.py SIZE METHOD`
compiles it (lowered as compile_step.py does; AS_GPU=1, DUE as there) under jax.profiler.trace and
prints the profiler's XLA events (passes, code generation) with the most total time."""
import collections
import glob
import gzip
import json
import os
import sys
import tempfile
import time

import jax

from update_case import case

update, arguments = case(sys.argv[1], sys.argv[2])
lowered = update.lower(*arguments)
out = tempfile.mkdtemp()
t0 = time.process_time()
with jax.profiler.trace(out, create_perfetto_trace=True):
    lowered.compile()
print(f"compile {time.process_time() - t0:.1f} cpu s (profiled)")
path = glob.glob(os.path.join(out, "**", "*.trace.json.gz"), recursive=True)[0]
events = json.load(gzip.open(path))
events = events["traceEvents"] if isinstance(events, dict) else events
total, count = collections.Counter(), collections.Counter()
for e in events:
    if e.get("ph") == "X":
        total[e["name"]] += e.get("dur", 0) / 1e6
        count[e["name"]] += 1
for name, secs in total.most_common(int(os.environ.get("TOP", "45"))):
    print(f"{secs:8.2f} s {count[name]:6d}x  {name[:150]}")
