"""The Python calls one torch eager step of the small GPT makes: steptime.py's set-up and warm-up (run from the
repository root), then cProfile over 20 steps. Usage: ``python calls.py METHOD``."""
import cProfile
import pstats
import runpy
import sys

method = sys.argv[1]
sys.argv = [sys.argv[0], method, "1"]  # steptime.py: its set-up, 10 warm-up steps and one timed step
step = runpy.run_path("records/cpu-2026-11-29b/steptime.py")["step"]
profile = cProfile.Profile()
profile.enable()
for i in range(20, 40):
    step(i)
profile.disable()
print(method, "calls/step", pstats.Stats(profile).total_calls // 20)
